"""mofi_jax.data.preprocess.eval_image: the centre crop computed alone (ScaleAndTranslate
translated by the crop's offset) against the full antialiased resize, then the crop, that
the eval path ran before; and the size checks of decode_bounded."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mofi_jax.data import image_limits, preprocess


def reference_eval_image(image_bytes, size, resize=None):
  """The eval path as it was: tf.image.resize of the whole image to the shorter side
  `resize`, then tf.image.crop_to_bounding_box."""
  image = preprocess.decode(image_bytes)
  resize = resize or size
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  new_hw = tf.maximum(tf.cast(tf.math.round(hw * resize / tf.reduce_min(hw)), tf.int32), size)
  image = tf.image.resize(image, new_hw, method='bilinear', antialias=True)
  image = tf.image.crop_to_bounding_box(image, (new_hw[0] - size) // 2,
                                        (new_hw[1] - size) // 2, size, size)
  return preprocess.normalize(tf.clip_by_value(image, 0.0, 1.0)).numpy()


def noise(height, width, fmt='PNG', seed=0):
  """Noise: a crop shifted or scaled by any fraction of a pixel changes it by ~0.1 or more."""
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, fmt)
  return out.getvalue()


@pytest.mark.parametrize('height,width,size,resize', [
    (301, 457, 224, None),   # odd sizes, landscape, downsampled
    (640, 223, 224, None),   # portrait, shorter side just under: upsampled
    (100, 151, 224, None),   # upsampled on both sides
    (37, 1111, 224, None),   # 30:1, the long side becomes 6,726
    (2001, 1333, 224, None),  # large downscale
    (225, 225, 224, None),   # one pixel to crop
    (224, 300, 224, None),   # no resize, only the crop
    (333, 517, 224, 256),    # resize, then a smaller crop
    (7, 9, 5, None), (500, 499, 32, 40)])
def test_crop_only_equals_resize_then_crop(height, width, size, resize):
  data = noise(height, width)
  got = preprocess.eval_image(tf.constant(data), size, resize).numpy()
  assert got.shape == (size, size, 3)
  # Sampling positions are (x + 0.5) / scale + offset / scale here, (x + offset + 0.5) / scale
  # there: equal up to float32 rounding of positions up to ~2,000 px (2.4e-4 px), which moves
  # a noise image's values by up to ~5e-4 after normalisation. A crop off by a pixel, or
  # scaled wrongly, is off by ~1.
  np.testing.assert_allclose(got, reference_eval_image(data, size, resize), atol=1e-3, rtol=0)


def test_decoded_sizes_are_checked_too():
  # Formats PIL does not identify pass the header check; TF decodes up to 2**29 pixels.
  for shape in ((1, 40, 3), (9460, 9459, 1)):
    with pytest.raises(tf.errors.InvalidArgumentError, match='limit'):
      preprocess._check_decoded(tf.zeros(shape, tf.uint8))  # pylint: disable=protected-access
  assert preprocess._check_decoded(tf.zeros((32, 1, 3))).shape == (32, 1, 3)  # pylint: disable=protected-access


def test_refusals_in_tf_data_name_the_size_and_the_limit():
  ds = tf.data.Dataset.from_tensors(noise(2, 70)).map(lambda b: preprocess.eval_image(b, 32))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'70x2.*limit of 32:1'):
    next(iter(ds))
  assert image_limits.MAX_ASPECT_RATIO == 32
