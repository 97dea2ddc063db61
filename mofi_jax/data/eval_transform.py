"""How evaluators turn encoded images into model input, chosen by name.

  tf    ours (preprocess.eval_image): TF decoding, antialiased bilinear resize of the
        shorter side, centre crop;
  mofi  ml-mofi's get_mofi_transform() (mofi_transform.py), with which the released MOFI
        models were scored: PIL, torchvision's sizes and crop, bilinear without antialiasing.
"""
import dataclasses
from typing import Optional

from mofi_jax.data import mofi_transform, preprocess

EVAL_PREPROCESSINGS = ('tf', 'mofi')
_EVAL_IMAGE = {'tf': preprocess.eval_image, 'mofi': mofi_transform.eval_image}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Crop `size`, shorter side `resize` first (None: `size`), the `method` way; called on
  a scalar tf.string, it gives float32 [size, size, 3] (inside tf.data or eagerly)."""
  size: int
  resize: Optional[int] = None
  method: str = 'tf'

  def __post_init__(self):
    if self.method not in EVAL_PREPROCESSINGS:
      raise ValueError(f'preprocess: unknown eval preprocessing {self.method!r}; expected one '
                       f'of {EVAL_PREPROCESSINGS}')

  @classmethod
  def from_config(cls, cfg, image_size):
    """From an evaluator's cfg: `resize` and `preprocess` (default 'tf')."""
    resize = cfg.get('resize')
    return cls(int(image_size), None if resize is None else int(resize),
               cfg.get('preprocess') or 'tf')

  def __call__(self, image_bytes):
    return _EVAL_IMAGE[self.method](image_bytes, self.size, self.resize)

  def info(self):
    return dict(image_size=self.size, resize=self.resize, preprocess=self.method)
