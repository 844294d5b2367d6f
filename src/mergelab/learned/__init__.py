"""Data-dependent merging methods (methods that need activations of the fine-tuned models)."""
