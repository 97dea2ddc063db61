"""mofi_jax.data.mofi_transform against torchvision: ml-mofi's get_mofi_transform() on
images of awkward sizes and modes, in NumPy and through tf.data."""
import io

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image
from torchvision import transforms

from mofi_jax.data import eval_transform, mofi_transform, preprocess
from mofi_jax.evals import image_folder


def torchvision_transform(resize=224, crop=224):
  """apple/ml-mofi eval/utils.py:get_mofi_transform() (Resize(224) there)."""
  return transforms.Compose([
      transforms.ToTensor(),
      transforms.Resize(resize, antialias=False),
      transforms.CenterCrop(crop),
      transforms.Normalize(mean=torch.tensor(preprocess.CLIP_MEAN),
                           std=torch.tensor(preprocess.CLIP_STD)),
  ])


def torchvision_image(image_bytes, resize=224, crop=224):
  """What ml-mofi's GPR1200 dataset feeds the model, as HWC float32."""
  img = Image.open(io.BytesIO(image_bytes)).convert('RGB')
  return torchvision_transform(resize, crop)(img).numpy().transpose(1, 2, 0)


def encoded(height, width, mode='RGB', fmt='JPEG', seed=0):
  """A noisy image (the hardest case for interpolation) encoded as `fmt`."""
  rng = np.random.default_rng(seed)
  rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
  if mode == 'CMYK':
    img = Image.fromarray(rgba, 'CMYK')
  elif mode == 'RGBA':
    img = Image.fromarray(rgba, 'RGBA')
  else:
    img = Image.fromarray(rgba[..., :3], 'RGB')
    if mode == 'P':
      img = img.convert('P', palette=Image.Palette.ADAPTIVE, colors=200)
      img.info['transparency'] = 3
    elif mode in ('L', 'I;16'):
      img = img.convert('L') if mode == 'L' else Image.fromarray(
          rng.integers(0, 65536, (height, width), dtype=np.uint16))
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def reference_mofi_image(image_bytes, size=224, resize=None):
  """The transform as it was, whole: every output pixel of torchvision's resize, in float64
  from taps computed here, then CenterCrop. Large images cost GBs; the oracle for the
  crop-only code on images that fit."""
  resize = resize or size
  image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert('RGB'))
  image = (image.astype(np.float32) / np.float32(255)).astype(np.float64)
  height, width = mofi_transform.resized_size(image.shape[0], image.shape[1], resize)

  def taps(n_in, n_out):  # ATen's upsample_bilinear2d source index, float32 as x86-64 fuses it
    if n_in == n_out:
      return np.arange(n_out), np.arange(n_out), np.zeros(n_out)
    ratio = np.float64(np.float32(n_in) / np.float32(n_out))
    src = np.maximum((ratio * (np.arange(n_out) + 0.5) - 0.5).astype(np.float32), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), lam.astype(np.float64)

  h0, h1, a = taps(image.shape[0], height)
  w0, w1, b = taps(image.shape[1], width)
  a0, b0 = (np.float32(1) - a.astype(np.float32)).astype(np.float64), \
      (np.float32(1) - b.astype(np.float32)).astype(np.float64)
  rows = a0[:, None, None] * image[h0] + a[:, None, None] * image[h1]
  full = (b0[None, :, None] * rows[:, w0] + b[None, :, None] * rows[:, w1]).astype(np.float32)
  top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
  crop = full[top:top + size, left:left + size]
  return (crop - np.float32(preprocess.CLIP_MEAN)) / np.float32(preprocess.CLIP_STD)


AWKWARD = [
    (301, 457, 'RGB', 'JPEG'),    # odd sizes, landscape
    (640, 223, 'RGB', 'PNG'),     # portrait, shorter side just under 224: upsampled
    (100, 151, 'RGB', 'JPEG'),    # smaller than 224 on both sides
    (37, 1111, 'RGB', 'JPEG'),    # extreme aspect: the long side becomes 6,726
    (1000, 997, 'CMYK', 'JPEG'),  # CMYK JPEG: PIL's RGB conversion
    (225, 333, 'P', 'PNG'),       # palette PNG with a transparent index
    (224, 300, 'L', 'PNG'),       # shorter side already 224: no resize, only the crop
    (260, 261, 'I;16', 'PNG'),    # 16-bit grey
    (2001, 1333, 'RGBA', 'PNG'),  # alpha dropped, large downscale
    (225, 225, 'RGB', 'PNG'),     # (225 - 224) / 2 = 0.5: Python's round goes to 0
    (227, 250, 'RGB', 'PNG'),     # (227 - 224) / 2 = 1.5: round goes to 2
]


@pytest.mark.parametrize('height,width,mode,fmt', AWKWARD)
def test_matches_torchvision_within_1e6(height, width, mode, fmt):
  data = encoded(height, width, mode, fmt)
  ours = mofi_transform.mofi_image(data)
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, torchvision_image(data), atol=1e-6, rtol=0)


@pytest.mark.parametrize('height,width,mode,fmt', AWKWARD + [(64, 2000, 'RGB', 'PNG')])
def test_crop_only_is_bit_identical_to_the_whole_resize(height, width, mode, fmt):
  data = encoded(height, width, mode, fmt)
  np.testing.assert_array_equal(mofi_transform.mofi_image(data), reference_mofi_image(data))


def test_a_window_of_the_resize_is_that_part_of_the_whole():
  pixels = np.random.default_rng(1).integers(0, 256, (41, 67, 3), dtype=np.uint8)
  whole = mofi_transform.bilinear_resize(pixels, 90, 130)
  part = mofi_transform.bilinear_resize(pixels, 90, 130, (13, 50, 20, 31))
  np.testing.assert_array_equal(part, whole[13:33, 50:81])


def test_resize_then_a_smaller_crop_matches_torchvision():
  data = encoded(333, 517)
  np.testing.assert_allclose(mofi_transform.mofi_image(data, size=224, resize=256),
                             torchvision_image(data, resize=256, crop=224), atol=1e-6, rtol=0)


def test_differs_from_the_antialiased_tf_path():
  # The reason the transform exists: our TF path gives other pixels on a downscale.
  data = encoded(640, 480, fmt='PNG')
  tf_path = preprocess.eval_image(tf.constant(data), 224).numpy()
  assert np.abs(tf_path - mofi_transform.mofi_image(data)).max() > 0.1


@pytest.mark.parametrize('height,width,expected', [
    (480, 640, (224, 298)), (640, 480, (298, 224)), (223, 640, (224, 642)),
    (224, 224, (224, 224)), (1111, 37, (6726, 224))])
def test_output_size_is_torchvisions_truncating_rule(height, width, expected):
  assert mofi_transform.resized_size(height, width, 224) == expected


def test_tf_data_path_equals_numpy_and_names_bad_files(tmp_path):
  transform = eval_transform.EvalTransform(224, method='mofi')
  good = [encoded(300, 200, seed=s) for s in range(3)]
  ds = tf.data.Dataset.from_tensor_slices(good).map(transform).batch(3)
  batch = next(iter(ds)).numpy()
  for image, data in zip(batch, good):
    np.testing.assert_array_equal(image, mofi_transform.mofi_image(data))
  paths = []
  for i, data in enumerate(good + [b'<html>not an image</html>']):
    paths.append(str(tmp_path / f'0_{i}.jpg'))
    with open(paths[-1], 'wb') as f:
      f.write(data)
  with pytest.raises(image_folder.FolderError, match=r'0_3\.jpg: unreadable image'):
    list(image_folder.image_batches(paths, [0] * 4, transform, 2))


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="unknown eval preprocessing 'torch'"):
    eval_transform.EvalTransform(224, method='torch')
  with pytest.raises(ValueError, match='resize 200 is smaller than the crop size 224'):
    mofi_transform.mofi_image(encoded(300, 300), size=224, resize=200)
