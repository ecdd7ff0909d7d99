"""Evaluation: tasks, metrics, cost measurements and the compressed-inference pipeline."""
