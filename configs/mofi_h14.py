"""MOFI-H/14 at paper scale (2M-entity head, CLIP-sized text tower, batch 32k).

  python -m mofi_jax.train --config configs/mofi_h14.py:multitask --workdir gs://BUCKET/run
Variants: supervised | contrastive | multitask (the final MOFI).
"""
from configs import common


def get_config(mode='multitask'):
  return common.paper_config('H/14', mode)
