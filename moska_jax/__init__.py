"""moska-jax: serving many requests that share one huge context with MoSKA (arXiv 2511.06010)."""

__version__ = "0.1.0"
