"""Fine-tuning task experts (and the multi-task baseline) from a pretrained encoder."""
