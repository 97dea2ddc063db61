"""Offline tools that build I2E corpora in the format of mofi_jax/data/schema.py."""
