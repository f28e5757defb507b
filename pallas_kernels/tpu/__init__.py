"""Pallas TPU kernels (Mosaic TPU); verified on CPU in TPU interpret mode."""
