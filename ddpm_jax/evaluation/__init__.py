"""Evaluation: the FID Inception network, FID and KID against the training data, bits per dimension."""
