"""CleanPairs: normalise and bound alt-texts, verify images.

  cleaned = pairs | CleanPairs(min_chars=1, max_chars=1000)

Text: HTML entities unescaped (twice at most: web alt-texts are often double-escaped),
control characters and zero-width/BOM characters removed, Unicode NFC, whitespace
collapsed. An alt-text longer than `max_chars` is cut at the last word boundary within
the limit (hard cut if that would keep less than half of it) and kept; texts too big to
be alt-texts never get here (read.MAX_TEXT_BYTES). Empty after normalising ->
dead letter 'empty_text'; non-empty but shorter than `min_chars` -> filtered
'text_too_short'.

Image: smaller than `min_image_size` pixels on its short side (read from the header,
before decoding) -> filtered 'image_too_small' (a 1x1 tracking pixel, an icon). Then opened
with PIL and decoded (JPEGs in draft mode, at 1/8 scale: enough to reach
the end of the entropy-coded data, so truncation is caught, at a fraction of the cost).
Not an image, corrupt or truncated -> dead letter 'corrupt_image'; over
image_limits.MAX_PIXELS (PIL's decompression-bomb threshold, where PIL itself only warns)
-> 'image_too_large'; longer than image_limits.MAX_ASPECT_RATIO times its short side ->
'extreme_aspect_ratio' (both read from the header, before decoding; the eval transforms
refuse the same images). Formats that TensorFlow's decode_image
reads (JPEG, PNG, GIF, BMP, WebP) are kept byte for byte; others (TIFF, ...), and PNG/GIF
files that decode but lack their end marker (PIL accepts them, TensorFlow does not), are
re-encoded as PNG, so that every written image decodes in the training pipeline; so is the
first frame of an animated WebP or GIF.

Exact duplicate images (and keys) are removed before this stage, by dedup.py, on small
records; `text_passes` is the text check it applies to choose among the copies of an
image, so that a copy this stage would drop for its text never hides a good one.
"""
import dataclasses
import html
import io
import re
import unicodedata

import apache_beam as beam

from data_prep.i2e import types
from mofi_jax.data import image_limits

STAGE = 'clean'
TF_FORMATS = ('JPEG', 'MPO', 'PNG', 'GIF', 'BMP', 'WEBP')
# Zero-width space/non-joiner, word joiner, BOM: invisible, and they split words.
_INVISIBLE = dict.fromkeys(map(ord, '\u200b\u200c\u2060\ufeff'))
_CONTROL = re.compile(r'[\x00-\x1f\x7f-\x9f]')


def normalize_text(text):
  """Unescape HTML entities, drop control/invisible characters, NFC, collapse spaces."""
  for _ in range(2):
    unescaped = html.unescape(text)
    if unescaped == text:
      break
    text = unescaped
  text = _CONTROL.sub(' ', text).translate(_INVISIBLE)
  return ' '.join(unicodedata.normalize('NFC', text).split())


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


def verify_image(data):
  """Encoded image -> (bytes to store, None) or (None, (reason, detail))."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=import-outside-toplevel
  try:
    with image_limits.open_image(data) as image:
      fmt = image.format
      if fmt in ('JPEG', 'MPO'):
        image.draft('RGB', (1, 1))  # Smallest DCT scale; still reads all the data.
      image.load()
      # An animated WebP fails TF's 3-channel decode; an animated GIF is decoded whole, every
      # frame, to return the first: both keep only their first frame (as PNG).
      animated = fmt in ('GIF', 'WEBP') and getattr(image, 'is_animated', False)
      if fmt in TF_FORMATS and _complete(data, fmt) and not animated:
        return data, None
      out = io.BytesIO()  # Decodable pixels in a file TF would reject: re-encode them.
      image.convert('RGBA' if 'A' in image.getbands() else 'RGB').save(out, 'PNG')
      return out.getvalue(), None
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

  def __init__(self, min_chars, max_chars, min_image_size):
    self._min, self._max, self._min_side = min_chars, max_chars, min_image_size

  def process(self, pair):
    text = truncate_words(normalize_text(pair.text), self._max)
    if not text:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'empty_text', pair.key, pair.source, f'alt-text {pair.text[:80]!r}'))
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
    image, error = verify_image(pair.image)
    if error:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, error[0], pair.key, pair.source, error[1][:500]))
      return
    yield dataclasses.replace(pair, image=image, text=text)


def text_passes(text, min_chars, max_chars):
  """Whether _CleanFn keeps `text` (neither 'empty_text' nor 'text_too_short')."""
  return len(truncate_words(normalize_text(text), max_chars)) >= max(1, min_chars)


class CleanPairs(beam.PTransform):
  """Pair -> {'main': Pair, 'dead_letter': DeadLetter, 'filtered': Filtered}."""

  def __init__(self, min_chars=1, max_chars=1000, min_image_size=32):
    super().__init__()
    if not 1 <= min_chars <= max_chars:
      raise ValueError(f'CleanPairs: need 1 <= min_chars <= max_chars, got min_chars='
                       f'{min_chars}, max_chars={max_chars}.')
    if min_image_size < 1:
      raise ValueError(f'CleanPairs: min_image_size must be >= 1, got {min_image_size}.')
    self._fn = _CleanFn(min_chars, max_chars, min_image_size)

  def expand(self, pairs):
    cleaned = pairs | 'CleanAndVerify' >> beam.ParDo(self._fn).with_outputs(
        types.DEAD_LETTER, types.FILTERED, main='main')
    return {'main': cleaned.main, 'dead_letter': cleaned[types.DEAD_LETTER],
            'filtered': cleaned[types.FILTERED]}
