"""Fine-tuning task experts (cached by content) and the multi-task-learning baseline (``finetune.experts``)."""
