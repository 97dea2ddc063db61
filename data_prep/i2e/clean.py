"""CleanPairs: normalise and bound alt-texts, verify images.

  cleaned = pairs | CleanPairs(min_chars=1, max_chars=1000)

Text: HTML entities unescaped (twice at most: web alt-texts are often double-escaped), then
HTML tags removed ('<b>Eiffel Tower</b>'), control characters and zero-width/BOM characters
removed, Unicode NFC, whitespace collapsed. The stored alt-text is this text: the folding that
mention finding matches with (surface.py) never changes it. A caption that is a file name
says nothing ('IMG_1234.JPG', 'DSC00017', '20240101_123000.jpg') -> filtered
'filename_caption'; one with words ('London_Big_Ben_2019.jpg') becomes them ('London Big Ben
2019'). An alt-text longer than `max_chars` is cut at the last word boundary within
the limit (hard cut if that would keep less than half of it) and kept; texts too big to
be alt-texts never get here (read.MAX_TEXT_BYTES). Empty after normalising -> filtered
'empty_text' (most web images have no alt-text: a count, not a dead letter each);
non-empty but shorter than `min_chars` -> filtered 'text_too_short'.

Image: smaller than `min_image_size` pixels on its short side (read from the header,
before decoding) -> filtered 'image_too_small' (a 1x1 tracking pixel, an icon). Over
image_limits.MAX_DECODE_PIXELS (179 Mpx, where PIL raises) -> dead letter 'image_too_large';
longer than image_limits.MAX_ASPECT_RATIO times its short side -> 'extreme_aspect_ratio'
(both read from the header, before decoding). Then decoded (by PIL; an unchanged JPEG
by the training decoder alone); not an image, corrupt or truncated -> 'corrupt_image'. What is stored is what training should see, so that
training never meets a surprise (img2dataset's rule: normalise once, at ingestion):
  * animated GIF / WebP: the first frame (TF's 3-channel decode fails on an animated WebP,
    and decodes every frame of a GIF to return the first);
  * over `max_pixels` (default 40 Mpx) or, if set, `max_side` on the longer side:
    downscaled, aspect kept (a flat 13000x13000 PNG is a few hundred KB on disk and 507 MB
    decoded, every epoch); JPEGs are decoded at the DCT scale nearest above the target;
  * EXIF orientation applied (TF ignores it: phone photos would train sideways);
  * alpha composited onto white (TF drops alpha and shows the hidden colour, often black);
  * formats TF cannot read (TIFF, ...) and PNG/GIF missing their end marker.
Such images are re-encoded: JPEG (quality 95) when they were JPEG, PNG otherwise. Others
(JPEG, PNG, GIF, BMP, WebP) are kept byte for byte (an unchanged JPEG is not decoded by
PIL at all: the check below reads every byte). Last, every image to store is decoded
by the training decoder itself (preprocess.decode_pixels): bytes it rejects are
re-encoded from PIL's pixels, and if those fail too, or decode to over `max_pixels`, the
pair is dead-lettered 'corrupt_image' naming the decoder's error.

Exact duplicate images (and keys) are removed before this stage, by dedup.py, on small
records; `text_passes` is the text check it applies to choose among the copies of an
image, so that a copy this stage would drop for its text never hides a good one.
"""
import dataclasses
import html
import io
import math
import re
import unicodedata

import apache_beam as beam
import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.i2e import types
from mofi_jax.data import image_limits

STAGE = 'clean'
TF_FORMATS = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP', 'WEBP')
# Zero-width space/non-joiner, word joiner, BOM: invisible, and they split words.
_INVISIBLE = dict.fromkeys(map(ord, '\u200b\u200c\u2060\ufeff'))
_CONTROL = re.compile(r'[\x00-\x1f\x7f-\x9f]')
# Tags, after unescaping: inline ones go ('<b>Eiffel</b>'), others become a space ('A<br>B').
_INLINE_TAG = re.compile(r'</?(?:b|i|u|em|strong|span|a|font|small|big|mark|sub|sup)\b[^<>]{0,300}>',
                         re.IGNORECASE)
_TAG = re.compile(r'</?[A-Za-z][A-Za-z0-9]*\b[^<>]{0,300}>|<!--.{0,300}?-->')
_IMAGE_EXT = r'(?:jpe?g|png|gif|webp|heic|heif|tiff?|bmp|avif|jfif)'
_FILENAME = re.compile(rf'(?P<stem>[^\s/\\][^/\\]*)\.{_IMAGE_EXT}', re.IGNORECASE)
# What cameras, phones and screenshot tools name files: a prefix, then digits and separators.
_CAMERA_PREFIX = r'(?:IMG|DSC[NF]?|DCIM|PXL|VID|GOPR|DJI|MVIMG|PANO|P|_MG|SAM|WP|CIMG)'
_DIGITS = r'[\d_\-\s.()~]*\d[\d_\-\s.()~]*'
_CAMERA_NAME = re.compile(rf'(?:{_CAMERA_PREFIX}|image|photo|pic)?[\s_\-]*{_DIGITS}|'
                          r'(?:Screenshot|Screen Shot|Capture)\b[\w\s.\-()]*', re.IGNORECASE)
_CAMERA_NAME_NO_EXT = re.compile(rf'{_CAMERA_PREFIX}[_\-]?\d{{3,}}[\d_\-.()~]*', re.IGNORECASE)
DEFAULT_MAX_PIXELS = 40_000_000  # clean.max_pixels: see the module docstring.
JPEG_QUALITY = 95                # Re-encoded JPEGs: one generation, no visible loss.
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's
# table, applied here after the downscale so that the big image is never copied).
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def normalize_text(text):
  """Unescape HTML entities, drop tags and control/invisible characters, NFC, collapse spaces;
  a file name's words, or '' for a file name without any (module docstring)."""
  for _ in range(2):
    unescaped = html.unescape(text)
    if unescaped == text:
      break
    text = unescaped
  text = _INLINE_TAG.sub('', text)
  text = _CONTROL.sub(' ', _TAG.sub(' ', text)).translate(_INVISIBLE)
  text = ' '.join(unicodedata.normalize('NFC', text).split())
  return filename_words(text)


def filename_words(text):
  """`text` unless it is one file name: then its words ('' when it has none)."""
  if _CAMERA_NAME_NO_EXT.fullmatch(text):
    return ''
  match = _FILENAME.fullmatch(text)
  if not match:
    return text
  stem = match.group('stem')
  if _CAMERA_NAME.fullmatch(stem):
    return ''
  words = ' '.join(stem.replace('_', ' ').replace('-', ' ').split())
  return words if any(c.isalpha() for c in words) else ''


def is_filename_caption(text):
  """Whether the raw alt-text is a file name with no words in it."""
  plain = ' '.join(_CONTROL.sub(' ', html.unescape(text)).split())
  return bool(plain) and not normalize_text(text) and (
      _FILENAME.fullmatch(plain) is not None or _CAMERA_NAME_NO_EXT.fullmatch(plain) is not None)


def truncate_words(text, max_chars):
  """`text` cut to at most `max_chars` characters, at a word boundary when reasonable."""
  if len(text) <= max_chars:
    return text
  cut = text.rfind(' ', 0, max_chars + 1)
  return text[:cut] if cut >= max_chars // 2 else text[:max_chars]


def _complete(data, fmt):
  """Whether the file ends where its format says it ends (TF is stricter than PIL here)."""
  if fmt == 'PNG':
    return data.rstrip(b'\0').endswith(b'IEND\xaeB`\x82')
  if fmt == 'GIF':
    return data.rstrip(b'\0').endswith(b';')
  return True


def image_size(data):
  """(width, height) from the image's header, or None when PIL cannot identify it or
  refuses it as a decompression bomb (verify_image names the problem)."""
  return image_limits.header_size(data, check=False)


def fit_size(size, max_pixels, max_side=0):
  """(width, height) scaled down, aspect kept, to at most `max_pixels` pixels and (if
  `max_side`) `max_side` on the longer side; `size` itself when it already fits."""
  width, height = size
  scale = min(1.0, math.sqrt(max_pixels / (width * height)))
  if max_side:
    scale = min(scale, max_side / max(width, height))
  if scale >= 1.0:
    return size
  # The nudge keeps max_side / side * side from flooring to max_side - 1; the loop undoes
  # any overshoot it (or sqrt's last bit) causes.
  fitted = [max(1, int(width * scale + 1e-6)), max(1, int(height * scale + 1e-6))]
  while (fitted[0] * fitted[1] > max_pixels or max_side and max(fitted) > max_side) and (
      max(fitted) > 1):
    fitted[fitted[1] > fitted[0]] -= 1
  return tuple(fitted)


def _orientation(image):
  """EXIF orientation (1..8; 1 = as stored), 1 when absent or unreadable."""
  try:
    value = image.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except  # A broken EXIF block is no orientation.
    return 1
  return value if value in _TRANSPOSE else 1


def _has_alpha(image):
  """Whether any pixel is not fully opaque (an alpha band, or a palette transparency)."""
  if image.mode in ('RGBA', 'LA', 'PA'):
    alpha = image.getchannel('A')
  elif 'transparency' in image.info:
    alpha = image.convert('RGBA').getchannel('A')
  else:
    return False
  return alpha.getextrema()[0] < 255


def _eight_bit(image):
  """16-bit grey ('I;16', 'I') as 8-bit 'L', the top byte, as TF's decoder reads it: PIL's
  own convert clips every value over 255 to white."""
  if image.mode not in ('I;16', 'I;16B', 'I;16L', 'I'):
    return image
  return Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), 'L')


def _downscaled(image, target):
  """`image` resized to `target` (LANCZOS). PIL resizes '1' and 'P' images with NEAREST
  only, so those are converted first; RGBA is resized premultiplied by PIL itself."""
  image = _eight_bit(image)
  if image.size == target:  # A JPEG draft may already be there; never below it.
    return image
  if image.mode in ('1', 'P', 'PA'):
    image = image.convert('RGBA' if _has_alpha(image) else 'L' if image.mode == '1' else 'RGB')
  return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _rgb(image):
  """RGB, transparent pixels over white, as a browser shows a logo on a page (TF's
  3-channel decode drops alpha and shows the hidden colour, often black)."""
  if not _has_alpha(image):
    return image.convert('RGB')
  white = Image.new('RGBA', image.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, image.convert('RGBA')).convert('RGB')


def _reencoded(image, fmt, target, orientation):
  """Loaded `image` (frame 0) -> downscaled to `target` (stored orientation), RGB over
  white, upright, encoded as JPEG (q95) when it was one, PNG otherwise (lossless sources
  stay lossless)."""
  pixels = _rgb(_downscaled(image, target))
  if orientation != 1:
    pixels = pixels.transpose(_TRANSPOSE[orientation])
  out = io.BytesIO()
  if fmt in ('JPEG', 'MPO'):
    pixels.save(out, 'JPEG', quality=JPEG_QUALITY)
  else:
    pixels.save(out, 'PNG')
  return out.getvalue()


def normalize_image(data, max_pixels=DEFAULT_MAX_PIXELS, max_side=0, force=False):
  """Bytes to store: `data` itself when TF reads it as it should be seen, else re-encoded
  (see the module docstring). force: re-encode even then. Raises ImageLimitError, or
  what PIL raises on a corrupt image."""
  with image_limits.open_image(data, max_pixels=image_limits.MAX_DECODE_PIXELS) as image:
    fmt, size = image.format, image.size
    target, orientation = fit_size(size, max_pixels, max_side), _orientation(image)
    # An animated WebP fails TF's 3-channel decode; an animated GIF is decoded whole, every
    # frame, to return the first: both keep only their first frame.
    animated = fmt in ('GIF', 'WEBP') and getattr(image, 'is_animated', False)
    # TF reads no WebP with an alpha band into 3 channels, even an opaque one.
    webp_alpha = fmt == 'WEBP' and 'A' in image.getbands()
    keep = (not force and target == size and orientation == 1 and not animated
            and not webp_alpha and fmt in TF_FORMATS and _complete(data, fmt))
    if fmt in ('JPEG', 'MPO'):
      if keep:  # No alpha to look for; the training decoder checks every byte next.
        return data
      # The smallest DCT scale at or above the target: a huge JPEG costs a fraction.
      image.draft('RGB', target)
    image.load()
    if keep and not _has_alpha(image):
      return data
    return _reencoded(image, fmt, target, orientation)


def _training_decode_error(data, max_pixels):
  """None when the training decoder reads `data` at most `max_pixels`, else the reason."""
  from mofi_jax.data import preprocess  # pylint: disable=import-outside-toplevel  # TF: slow.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    height, width = preprocess.decode_pixels(data).shape[:2]
  except tf.errors.OpError as e:
    return f'the training decoder (tf.io.decode_image) fails: {e.message}'
  if height * width > max_pixels:
    return f'decodes to {width}x{height}, over clean.max_pixels={max_pixels:,}'
  return None


def verify_image(data, max_pixels=DEFAULT_MAX_PIXELS, max_side=0):
  """Encoded image -> (bytes to store, None) or (None, (reason, detail)). The bytes to
  store decode with the training decoder, to at most `max_pixels` pixels."""
  try:
    out = normalize_image(data, max_pixels, max_side)
    error = _training_decode_error(out, max_pixels)
    if error and out is data:  # PIL decoded what TF cannot: store PIL's pixels.
      out = normalize_image(data, max_pixels, max_side, force=True)
      error = _training_decode_error(out, max_pixels)
    if error:
      return None, ('corrupt_image', error)
    return out, None
  except image_limits.ImageLimitError as e:
    return None, (e.reason, str(e))
  except Image.DecompressionBombError as e:  # Raised while loading some formats' frames.
    return None, ('image_too_large', str(e))
  except UnidentifiedImageError:
    return None, ('corrupt_image', 'not an image (PIL cannot identify the format)')
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds.
    return None, ('corrupt_image', f'{type(e).__name__}: {e}')


class _CleanFn(beam.DoFn):
  """Pair -> cleaned Pair, or a dead letter / filtered record with its reason."""

  def __init__(self, min_chars, max_chars, min_image_size, max_pixels, max_side):
    self._min, self._max, self._min_side = min_chars, max_chars, min_image_size
    self._max_pixels, self._max_side = max_pixels, max_side

  def process(self, pair):
    text = truncate_words(normalize_text(pair.text), self._max)
    if not text:
      reason = 'filename_caption' if is_filename_caption(pair.text) else 'empty_text'
      yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, reason, pair.key))
      return
    if len(text) < self._min:
      yield beam.pvalue.TaggedOutput(types.FILTERED,
                                     types.Filtered(STAGE, 'text_too_short', pair.key))
      return
    size = image_size(pair.image)
    if size is not None and min(size) < self._min_side:
      yield beam.pvalue.TaggedOutput(types.FILTERED,
                                     types.Filtered(STAGE, 'image_too_small', pair.key))
      return
    image, error = verify_image(pair.image, self._max_pixels, self._max_side)
    if error:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, error[0], pair.key, pair.source, error[1][:500]))
      return
    yield dataclasses.replace(pair, image=image, text=text)


def text_passes(text, min_chars, max_chars):
  """Whether _CleanFn keeps `text` (not 'empty_text', 'filename_caption', 'text_too_short')."""
  return len(truncate_words(normalize_text(text), max_chars)) >= max(1, min_chars)


class CleanPairs(beam.PTransform):
  """Pair -> {'main': Pair, 'dead_letter': DeadLetter, 'filtered': Filtered}."""

  def __init__(self, min_chars=1, max_chars=1000, min_image_size=32,
               max_pixels=DEFAULT_MAX_PIXELS, max_side=0):
    super().__init__()
    if not 1 <= min_chars <= max_chars:
      raise ValueError(f'CleanPairs: need 1 <= min_chars <= max_chars, got min_chars='
                       f'{min_chars}, max_chars={max_chars}.')
    if min_image_size < 1:
      raise ValueError(f'CleanPairs: min_image_size must be >= 1, got {min_image_size}.')
    if not 1 <= max_pixels <= image_limits.MAX_PIXELS:
      raise ValueError(f'CleanPairs: max_pixels must be in [1, {image_limits.MAX_PIXELS:,}] '
                       f'(image_limits.MAX_PIXELS, what evaluation decodes), got {max_pixels}.')
    if max_side < 0:
      raise ValueError(f'CleanPairs: max_side must be >= 0 (0: no limit), got {max_side}.')
    self._fn = _CleanFn(min_chars, max_chars, min_image_size, max_pixels, max_side)

  def expand(self, pairs):
    cleaned = pairs | 'CleanAndVerify' >> beam.ParDo(self._fn).with_outputs(
        types.DEAD_LETTER, types.FILTERED, main='main')
    return {'main': cleaned.main, 'dead_letter': cleaned[types.DEAD_LETTER],
            'filtered': cleaned[types.FILTERED]}
