"""Task models (encoder + per-task head), Hugging Face adapters, content fingerprints."""
