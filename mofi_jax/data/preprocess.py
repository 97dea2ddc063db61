"""Image preprocessing in TF ops, shared by the train pipeline and the evaluators.

Images are decoded to float32 in [0, 1], then normalised with CLIP's mean/std, the
convention of the released MOFI and OpenAI CLIP checkpoints.
Evaluators choose between this eval path and ml-mofi's by name: eval_transform.py.
"""
import tensorflow as tf

from mofi_jax.data.pixels import CLIP_MEAN, CLIP_STD  # pylint: disable=unused-import


def decode(image_bytes):
  """JPEG/PNG bytes -> float32 [H, W, 3] in [0, 1]."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return tf.image.convert_image_dtype(image, tf.float32)


def normalize(image):
  return (image - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


def train_image(image_bytes, size, seed, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
  """Random-resized crop + horizontal flip, driven by a stateless `seed` [2], as uint8
  pixels [size, size, 3]: a quarter of float32's bytes to the devices, which normalise
  them (pixels.normalize)."""
  image = decode(image_bytes)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seeds[0], area_range=scale, aspect_ratio_range=ratio,
      min_object_covered=0.0, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def eval_image(image_bytes, size, resize=None):
  """Resize the shorter side to `resize` (default `size`), then centre-crop `size`."""
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

