"""Evaluation: identity metrics, the world identity reader and the benchmark."""
