"""Bounds on the images we decode, read from the header before any pixel is: one place for
the eval transforms (preprocess.py, mofi_transform.py) and the I2E cleaner (clean.py).

MAX_PIXELS is PIL's default decompression-bomb threshold, Image.MAX_IMAGE_PIXELS
(1024**3 // 4 // 3): the size at which PIL starts warning. PIL raises only at twice that
(179 Mpx) and merely warns in between, so the warning counts as an error here, and the size
is checked explicitly too (PIL's threshold is a global that any caller may change).

MAX_DECODE_PIXELS (2 x MAX_PIXELS, 179 Mpx) is where PIL raises rather than warns: the I2E
cleaner (clean.py) decodes images up to it, once, to downscale them under its own pixel
budget (a 13000x13000 poster is 169 Mpx); nothing else decodes past MAX_PIXELS.

MAX_ASPECT_RATIO is 32:1. Real wide images sit well inside it: web banners are at most about
11:1 (970x90), phone panoramas about 10:1, long infographics 10-20:1. Past it are lines,
dividers and spacers, whose centre crop shows a sliver of nothing, and whose resized long
side (shorter side to `resize` first) grows without bound: 1x100000 resized to 224 is
22,400,000 px long. With the cap, the resized long side stays under 32 x resize.
"""
import io
import threading
import warnings

from PIL import Image

MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # 89,478,485: PIL's default MAX_IMAGE_PIXELS.
MAX_DECODE_PIXELS = 2 * MAX_PIXELS  # 178,956,970: PIL's DecompressionBombError threshold.
MAX_ASPECT_RATIO = 32
# warnings.catch_warnings swaps a process-wide filter list; two threads interleaving it
# (tf.data runs the 'mofi' transform in parallel) could leave the 'error' filter installed
# for good. Only Image.open runs under the lock: it reads the header, decoding runs outside.
_OPEN_LOCK = threading.Lock()


class ImageLimitError(ValueError):
  """An image over MAX_PIXELS or MAX_ASPECT_RATIO; `reason` is its dead-letter reason."""
  reason = 'image_too_large'


class TooManyPixels(ImageLimitError):
  reason = 'image_too_large'


class ExtremeAspectRatio(ImageLimitError):
  reason = 'extreme_aspect_ratio'


def check_size(width, height, max_pixels=MAX_PIXELS):
  """Raises TooManyPixels / ExtremeAspectRatio, naming the size and the limit."""
  if width * height > max_pixels:
    raise TooManyPixels(f'image is {width}x{height} = {width * height:,} pixels, over the '
                        f'limit of {max_pixels:,}')
  if width < 1 or height < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
    ratio = max(width, height) / max(min(width, height), 1)
    raise ExtremeAspectRatio(f'image is {width}x{height}: aspect ratio {ratio:,.1f}:1 is over '
                             f'the limit of {MAX_ASPECT_RATIO}:1')


def _open(data, max_pixels=MAX_PIXELS):
  """Image.open with PIL's DecompressionBombWarning as an error (TooManyPixels), unless
  `max_pixels` is above the size at which PIL warns (check_size then does the checking)."""
  with _OPEN_LOCK, warnings.catch_warnings():
    warn = max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels)
    warnings.simplefilter('error' if warn else 'ignore', Image.DecompressionBombWarning)
    try:
      return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
      raise TooManyPixels(str(e)) from e  # PIL names the pixel count and its limit.


def _check_frames(image):
  """TF's GIF decoder decodes every frame, even when it keeps only the first: a small
  LZW-compressed GIF of many large frames would cost frames x width x height."""
  if image.format == 'GIF':
    frames, (width, height) = getattr(image, 'n_frames', 1), image.size
    if frames * width * height > MAX_PIXELS:
      raise TooManyPixels(f'animated GIF of {frames} frames of {width}x{height} = '
                          f'{frames * width * height:,} pixels to decode, over the limit of '
                          f'{MAX_PIXELS:,}')


def open_image(data, all_frames=False, max_pixels=MAX_PIXELS):
  """`data` opened by PIL, its header checked against the limits, nothing decoded yet.

  Use it as `with open_image(data) as image:`. Raises ImageLimitError (also for PIL's
  DecompressionBombWarning and DecompressionBombError), or what Image.open raises.
  all_frames: the caller's decoder decodes every frame of a GIF (TF's does); count them.
  max_pixels: at most MAX_DECODE_PIXELS, past which PIL itself refuses to open.
  """
  image = _open(data, max_pixels)
  try:
    check_size(*image.size, max_pixels=max_pixels)
    if all_frames:
      _check_frames(image)
  except ImageLimitError:
    image.close()
    raise
  return image


def header_size(data, check=True, all_frames=False):
  """(width, height) from the header; None when PIL cannot identify the format (the
  decoder that follows then names the problem). check=True: raises ImageLimitError for
  an image over the limits; check=False: the size of any image PIL opens."""
  try:
    with (open_image(data, all_frames) if check else _open(data)) as image:
      return image.size
  except ImageLimitError:
    if check:
      raise
    return None
  except Exception:  # pylint: disable=broad-except  # PIL raises many kinds on junk.
    return None
