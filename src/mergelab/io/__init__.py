"""Checkpoint I/O: lazy per-tensor readers, key alignment, and an atomic sharded safetensors writer."""
