"""Tensor math of the residual-stream and latent methods. Knows tensors, not frameworks."""
