"""MOFI (arXiv 2306.07952) in JAX/Flax: image encoders trained on image-to-entity data."""
