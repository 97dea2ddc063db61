"""Image preprocessing in TF ops, shared by the train pipeline and the evaluators.

Images are decoded to float32 in [0, 1], then normalised with CLIP's mean/std, the
convention of the released MOFI and OpenAI CLIP checkpoints.
Evaluators choose between this eval path and ml-mofi's by name: eval_transform.py.
Eval images may be anything found in a folder, so the eval path refuses images over
image_limits' caps before decoding them, and computes only the centre crop.
"""
import numpy as np
import tensorflow as tf

from mofi_jax.data import image_limits
from mofi_jax.data.pixels import CLIP_MEAN, CLIP_STD  # pylint: disable=unused-import


def decode_pixels(image_bytes):
  """The training decoder: JPEG/PNG/GIF/BMP/WebP bytes -> uint8 [H, W, 3]. The I2E cleaner
  (data_prep/i2e/clean.py) runs this very function on every image it stores."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def decode(image_bytes):
  """JPEG/PNG bytes -> float32 [H, W, 3] in [0, 1]."""
  return tf.image.convert_image_dtype(decode_pixels(image_bytes), tf.float32)


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
  image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)
  return tf.ensure_shape(image, [size, size, 3])


def _header_hw(image_bytes):
  """int32 [2]: (height, width) read from the header on the host by PIL, which raises (an
  InvalidArgumentError in the graph) for images over image_limits' caps (every frame of a
  GIF counted: TF decodes them all) and for bytes it cannot identify, which TF's decoders
  would otherwise decode up to 2**29 pixels before `_check_decoded` saw them."""
  def read(data):  # bytes in a graph, a 0-d object array eagerly
    size = image_limits.header_size(data.item() if isinstance(data, np.ndarray) else data,
                                    all_frames=True)
    if size is None:
      raise ValueError('not an image: PIL cannot identify its format')
    return np.array(size[::-1], np.int32)
  # stateful: only a control input uses it, and Grappler prunes such a stateless op.
  hw = tf.numpy_function(read, [image_bytes], tf.int32, stateful=True)
  hw.set_shape([2])
  return hw


def _check_decoded(image):
  """The decoded size against image_limits too: the header check passes what PIL cannot
  read, and TF's decoders accept up to 2**29 pixels."""
  hw = tf.cast(tf.shape(image)[:2], tf.int64)
  pixels_ok = hw[0] * hw[1] <= image_limits.MAX_PIXELS
  aspect_ok = tf.reduce_max(hw) <= image_limits.MAX_ASPECT_RATIO * tf.reduce_min(hw)
  checks = [
      tf.debugging.Assert(pixels_ok, [
          f'image is over the limit of {image_limits.MAX_PIXELS:,} pixels; (height, width) =',
          hw]),
      tf.debugging.Assert(aspect_ok, [
          f'image has an aspect ratio over the limit of {image_limits.MAX_ASPECT_RATIO}:1; '
          '(height, width) =', hw])]
  with tf.control_dependencies(checks):
    return tf.identity(image)


def decode_bounded(image_bytes):
  """`decode` for images of any origin: float32 [H, W, 3] in [0, 1], or an
  InvalidArgumentError naming the size and the limit it is over."""
  with tf.control_dependencies([_header_hw(image_bytes)]):
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return tf.image.convert_image_dtype(_check_decoded(image), tf.float32)


def eval_image(image_bytes, size, resize=None):
  """Resize the shorter side to `resize` (default `size`), then centre-crop `size`.

  tf.image.resize(antialias=True) is ScaleAndTranslate with the 'triangle' kernel, scale
  new_hw / hw and translation 0; translated by minus the crop's offset, the same op
  computes only the crop (equal to resize-then-crop up to float rounding of the sampling
  positions), so a 1x100000 image costs no 22,400,000-column intermediate.
  """
  image = decode_bounded(image_bytes)
  resize = resize or size
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = resize / tf.reduce_min(hw)
  new_hw = tf.cast(tf.math.round(hw * scale), tf.int32)
  new_hw = tf.maximum(new_hw, size)
  offset = (new_hw - size) // 2
  image = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=tf.constant([size, size], tf.int32),
      scale=tf.cast(new_hw, tf.float32) / hw, translation=-tf.cast(offset, tf.float32),
      kernel_type='triangle', antialias=True)[0]
  image.set_shape([size, size, 3])
  return normalize(tf.clip_by_value(image, 0.0, 1.0))
