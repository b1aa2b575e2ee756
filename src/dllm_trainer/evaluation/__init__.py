"""Evaluation: the Monte-Carlo likelihood bound (ELBO)."""
