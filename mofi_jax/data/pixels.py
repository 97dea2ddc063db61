"""Pixel conventions shared by the host input and the model: CLIP's mean/std.

Train batches cross from the host to the devices as uint8 pixels, a quarter of the
bytes of float32, and are normalised on the device by `normalize` (called by the
image tower's caller, models/mofi.py); eval batches arrive normalised already.
"""
import jax.numpy as jnp

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(images):
  """uint8 pixels [..., 3] -> float32 (x / 255 - mean) / std; float input is returned
  as is (already normalised, as evaluators and exports feed it)."""
  if images.dtype != jnp.uint8:
    return images
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)
