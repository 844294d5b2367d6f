"""Task models (encoder + per-task head), Hugging Face adapters and content fingerprints.

Submodules are imported on use (``mergelab.models.hf`` imports transformers): ``task_model`` (TaskModel,
check_label_names), ``hf`` (load_task_model, load_encoder, TextEncoder), ``fingerprint`` (state_dict_fingerprint,
checkpoint_fingerprint).
"""
