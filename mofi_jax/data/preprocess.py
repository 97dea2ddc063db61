"""Image preprocessing in TF ops, shared by the train pipeline and the evaluators.

Images are decoded to float32 in [0, 1], then normalised with CLIP's mean/std, the
convention of the released MOFI and OpenAI CLIP checkpoints.

Eval images have two preprocessings, chosen by name (`EVAL_PREPROCESSINGS`):
  tf    TF decoding, antialiased bilinear resize of the shorter side, centre crop (ours);
  mofi  ml-mofi's get_mofi_transform(), with which the released models were scored
        (PIL, torchvision's sizes and crop, bilinear without antialiasing): mofi_transform.py.
"""
import dataclasses
from typing import Optional

import tensorflow as tf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def decode(image_bytes):
  """JPEG/PNG bytes -> float32 [H, W, 3] in [0, 1]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return tf.image.convert_image_dtype(image, tf.float32)


def normalize(image):
  return (image - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


def train_image(image_bytes, size, seed, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
  """Random-resized crop + horizontal flip, driven by a stateless `seed` [2]."""
  image = decode(image_bytes)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seeds[0], area_range=scale, aspect_ratio_range=ratio,
      min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return normalize(tf.clip_by_value(image, 0.0, 1.0))


EVAL_PREPROCESSINGS = ('tf', 'mofi')


def eval_image(image_bytes, size, resize=None, method='tf'):
  """Resize the shorter side to `resize` (default `size`), then centre-crop `size`,
  the `method` way (one of EVAL_PREPROCESSINGS)."""
  if method == 'mofi':
    from mofi_jax.data import mofi_transform  # pylint: disable=g-import-not-at-top
    return mofi_transform.eval_image(image_bytes, size, resize)
  if method != 'tf':
    raise ValueError(f'unknown eval preprocessing {method!r}; expected one of '
                     f'{EVAL_PREPROCESSINGS}')
  image = decode(image_bytes)
  resize = resize or size
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(hw)
  new_hw = tf.cast(tf.math.round(hw * scale), tf.int32)
  new_hw = tf.maximum(new_hw, size)
  image = tf.image.resize(image, new_hw, method='bilinear', antialias=True)
  top = (new_hw[0] - size) // 2
  left = (new_hw[1] - size) // 2
  image = tf.image.crop_to_bounding_box(image, top, left, size, size)
  return normalize(tf.clip_by_value(image, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """How an evaluator turns encoded images into model input: crop `size`, shorter side
  `resize` first (None: `size`), the `method` way (EVAL_PREPROCESSINGS)."""
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
    return eval_image(image_bytes, self.size, self.resize, self.method)

  def info(self):
    return dict(image_size=self.size, resize=self.resize, preprocess=self.method)
