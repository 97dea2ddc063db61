"""MOFI-B/16 at paper scale (2M-entity head, CLIP-sized text tower, batch 32k).

  python -m mofi_jax.train --config configs/mofi_b16.py:multitask --workdir gs://BUCKET/run
Variants: supervised | contrastive | multitask (the final MOFI).
"""
from configs import common


def get_config(mode='multitask'):
  return common.paper_config('B/16', mode)
