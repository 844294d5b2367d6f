"""Evaluation of merged encoders: cached features and the paper's protocols."""
