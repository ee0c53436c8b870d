"""Training: the hybrid objective, the optimisation loop, conversion, corpora, tiny test models."""
