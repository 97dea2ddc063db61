"""The released MOFI models' eval input, ml-mofi's `get_mofi_transform()`, in NumPy.

apple/ml-mofi scores its checkpoints with (eval/utils.py, eval/gpr1200.py):
  Image.open(f).convert('RGB') -> ToTensor() -> Resize(224, antialias=False)
  -> CenterCrop(224) -> Normalize(CLIP mean, std)
Our TF eval path resizes with antialiasing and rounds sizes its own way, so a released
checkpoint scored through it does not reproduce the published figures. This module
reproduces that transform step by step:
- PIL decodes and converts to RGB (CMYK, palette, grey and alpha images alike);
- ToTensor: uint8 / 255 in float32;
- Resize(int): torchvision's output-size rule (the shorter side becomes `resize`, the
  longer int(resize * long / short), truncated), then torch's bilinear interpolation
  without antialiasing: source index (dst + 0.5) * in/out - 0.5 clamped at 0, in float32
  as ATen's CPU kernel computes it;
- CenterCrop: torchvision's offsets, int(round((H - S) / 2)) with Python's rounding;
- Normalize in float32.
The result is HWC float32, ready for our image tower. `eval_image` wraps it for tf.data.
Only the centre crop is interpolated (the same numbers as resizing whole, then cropping),
and images over image_limits' caps are refused from their header, so memory stays bounded.
"""
import numpy as np
import tensorflow as tf
from PIL import Image

from mofi_jax.data import image_limits
from mofi_jax.data import pixels


def decode_rgb(image_bytes):
  """uint8 [H, W, 3]: PIL's decoding and RGB conversion. ValueError if unreadable, or over
  image_limits' pixel or aspect-ratio cap (checked from the header, before decoding)."""
  try:
    with image_limits.open_image(image_bytes) as img:
      return np.asarray(img.convert('RGB'))
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'not an image PIL can decode ({e})') from e


def resized_size(height, width, size):
  """torchvision's Resize(size: int) output (height, width)."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def _linear_taps(in_size, out_size, start=0, count=None):
  """(index0, index1, lambda0, lambda1) of output indices start..start+count-1 (default:
  all of them), as ATen computes them; each output index's taps depend on it alone."""
  count = out_size - start if count is None else count
  if in_size == out_size:
    idx = np.arange(start, start + count)
    return idx, idx, np.ones(count, np.float32), np.zeros(count, np.float32)
  ratio = np.float32(in_size) / np.float32(out_size)
  # ratio * (dst + 0.5) - 0.5, rounded once to float32: the fused multiply-add that ATen's
  # x86-64 build uses (the product is exact in float64). Rounding twice moves the weights
  # by up to 3e-5 on large images.
  dst = np.arange(start, start + count, dtype=np.float64)
  src = (np.float64(ratio) * (dst + 0.5) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  index0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lambda1 = np.clip(src - index0.astype(np.float32), 0, 1).astype(np.float32)
  index1 = index0 + (index0 < in_size - 1)
  return index0, index1, np.float32(1) - lambda1, lambda1


def _to_float64(values):
  """ToTensor's uint8 / 255 in float32, then float64 for the interpolation sums."""
  if values.dtype == np.uint8:
    values = values.astype(np.float32) / np.float32(255)
  return values.astype(np.float64)


def bilinear_resize(image, height, width, window=None):
  """[H, W, C] (uint8, scaled as ToTensor does, or float32) -> float32: torch's bilinear,
  align_corners=False, antialias=False (torchvision's Resize(antialias=False) on a tensor),
  to [height, width, C], of which only `window` = (top, left, rows, cols) is computed
  (default: all). Only the source pixels the window reads are gathered and made float, so
  the cost is the window's, whatever the image's or the resized size."""
  top, left, rows, cols = window or (0, 0, height, width)
  h0, h1, a0, a1 = _linear_taps(image.shape[0], height, top, rows)
  w0, w1, b0, b1 = _linear_taps(image.shape[1], width, left, cols)
  taps = np.concatenate([w0, w1])
  x0 = _to_float64(image[np.ix_(h0, taps)])  # [rows, 2 cols, C]
  x1 = _to_float64(image[np.ix_(h1, taps)])
  blended = a0[:, None, None] * x0 + a1[:, None, None] * x1
  out = b0[None, :, None] * blended[:, :cols] + b1[None, :, None] * blended[:, cols:]
  return out.astype(np.float32)


def center_crop_offsets(height, width, size):
  """(top, left) of torchvision's CenterCrop(size) on an image at least that large."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def mofi_image(image_bytes, size=224, resize=None):
  """Encoded image -> float32 [size, size, 3], CLIP-normalised, as get_mofi_transform()
  (with Resize(resize), default `size`, before CenterCrop(size)). Only the crop is
  interpolated: the resized image is never made whole (a 1x5000 image would need GBs)."""
  resize = int(resize or size)
  if resize < size:
    raise ValueError(f'resize {resize} is smaller than the crop size {size}; torchvision '
                     'would pad the crop, which the released models were never scored with')
  decoded = decode_rgb(image_bytes)
  height, width = resized_size(decoded.shape[0], decoded.shape[1], resize)
  top, left = center_crop_offsets(height, width, size)
  if (height, width) != decoded.shape[:2]:
    image = bilinear_resize(decoded, height, width, (top, left, size, size))
  else:
    image = decoded[top:top + size, left:left + size].astype(np.float32) / np.float32(255)
  return (image - np.float32(pixels.CLIP_MEAN)) / np.float32(pixels.CLIP_STD)


def eval_image(image_bytes, size, resize=None):
  """tf.data form of `mofi_image`: a scalar tf.string -> float32 [size, size, 3].

  An undecodable image raises tf.errors.InvalidArgumentError, as TF's decoder does.
  """
  def transform(data):  # bytes in a graph, a 0-d object array eagerly
    return mofi_image(data.item() if isinstance(data, np.ndarray) else data, size, resize)
  image = tf.numpy_function(transform, [image_bytes], tf.float32, stateful=False)
  image.set_shape([size, size, 3])
  return image
