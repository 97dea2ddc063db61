"""MOFI at paper scale by model name, in open_clip's spelling or ours.

  python -m mofi_jax.train --config configs/mofi.py:ViT-L-14,contrastive --workdir gs://B/run
  python -m mofi_jax.aot --config configs/mofi.py:ViT-H-14 --topology v5e:16x16
Names: ViT-B-16 | ViT-L-14 | ViT-H-14 (or B/16, L/14, H/14); modes: supervised |
contrastive | multitask (the default, the final MOFI). configs/mofi_b16.py and its siblings
are the same configs under fixed names.
"""
from configs import common


def get_config(arg='ViT-B-16,multitask'):
  name, _, mode = arg.partition(',')
  return common.paper_config(name, mode or 'multitask')
