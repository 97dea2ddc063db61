"""CleanPairs: text normalisation and bounds, image verification (PIL, and TensorFlow as
the independent judge of what the training pipeline can decode), exact-duplicate removal."""
import io

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from data_prep.i2e import clean, types
from test_i2e_read import digest, image_bytes


@pytest.mark.parametrize('raw,expected', [
    ('  two   spaces\tand\nnewline ', 'two spaces and newline'),
    ('Tom &amp; Jerry &lt;3', 'Tom & Jerry <3'),
    ('double &amp;amp; escaped', 'double & escaped'),         # unescaped twice at most
    ('triple &amp;amp;amp; stays', 'triple &amp; stays'),
    ('cafe\u0301', 'caf\u00e9'),                                # NFC composes e + accent
    ('zero\u200bwidth\ufeff bom', 'zerowidth bom'),
    ('ctrl\x00chars\x1b here\x85', 'ctrl chars here'),
    (' \u00a0\u3000 ', ''),                                     # only Unicode spaces
])
def test_normalize_text(raw, expected):
  assert clean.normalize_text(raw) == expected


@pytest.mark.parametrize('text,limit,expected', [
    ('short', 10, 'short'),
    ('aaa bbb ccc', 8, 'aaa bbb'),          # last space within 8 chars is at 7
    ('aaa bbb ccc', 7, 'aaa bbb'),          # a space right after the limit counts
    ('a bbbbbbbbbbbb', 8, 'a bbbbbb'),       # boundary at 1 < 8 // 2: hard cut
])
def test_truncate_words(text, limit, expected):
  assert clean.truncate_words(text, limit) == expected


def tf_decodes(data):
  try:
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except tf.errors.InvalidArgumentError:
    return None


def encoded(fmt, seed=0, size=24):
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, fmt)
  return pixels, out.getvalue()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG', 'GIF', 'BMP', 'WEBP'])
def test_images_tf_reads_are_kept_byte_for_byte(fmt):
  _, data = encoded(fmt)
  assert clean.verify_image(data) == (data, None)


def test_other_formats_and_unterminated_png_become_png_with_the_same_pixels():
  pixels, tiff = encoded('TIFF')
  assert tf_decodes(tiff) is None  # Why re-encoding is needed.
  out, error = clean.verify_image(tiff)
  assert error is None and out.startswith(b'\x89PNG')
  np.testing.assert_array_equal(tf_decodes(out), pixels)
  pixels, png = encoded('PNG', seed=1)
  no_iend = png[:-12]  # PIL decodes it; TF rejects it.
  assert tf_decodes(no_iend) is None
  out, error = clean.verify_image(no_iend)
  assert error is None
  np.testing.assert_array_equal(tf_decodes(out), pixels)


@pytest.mark.parametrize('name', ['truncated_jpeg', 'jpeg_without_end', 'half_png', 'text',
                                  'empty'])
def test_corrupt_payloads_are_rejected(name):
  _, jpeg = encoded('JPEG', size=64)
  _, png = encoded('PNG', size=64)
  data = dict(truncated_jpeg=jpeg[:len(jpeg) // 2], jpeg_without_end=jpeg[:-2],
              half_png=png[:len(png) // 2], text=b'<html>not an image</html>', empty=b'')[name]
  out, (reason, detail) = clean.verify_image(data)
  assert (out, reason) == (None, 'corrupt_image') and detail


def test_decompression_bomb_is_too_large(monkeypatch):
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)  # 24x24 = 576 > 2 x 100
  out, (reason, _) = clean.verify_image(encoded('PNG')[1])
  assert (out, reason) == (None, 'image_too_large')


def view(x):
  if isinstance(x, types.Pair):
    return x.key, digest(x.image), x.text
  return x.reason, x.key


def run_stage(transform, pairs, want_main, want_dead, want_filtered):
  with test_pipeline.TestPipeline() as p:
    result = p | beam.Create(pairs) | transform
    for name, want in (('main', want_main), ('dead_letter', want_dead),
                       ('filtered', want_filtered)):
      assert_that(result[name] | f'View_{name}' >> beam.Map(view), equal_to(want),
                  label=f'check_{name}')


def test_clean_pairs_routes_every_record():
  img = [image_bytes(i) for i in range(5)]
  pairs = [
      types.Pair('a', img[0], '  A &amp; B  ', 's'),
      types.Pair('b', img[1], 'x' * 30 + ' tail words', 's'),   # cut to max_chars=32
      types.Pair('c', img[2], '\u200b \n', 's'),                 # empty once normalised
      types.Pair('d', img[3], 'ab', 's'),                        # shorter than min_chars=3
      types.Pair('e', b'GIF89a garbage', 'fine text', 's'),      # not an image
  ]
  run_stage(clean.CleanPairs(min_chars=3, max_chars=32, min_image_size=8), pairs,
            [('a', digest(img[0]), 'A & B'), ('b', digest(img[1]), 'x' * 30)],
            [('empty_text', 'c'), ('corrupt_image', 'e')], [('text_too_short', 'd')])
  # text_passes, the check dedup.py applies, agrees with the stage on every text.
  kept = {'a', 'b', 'e'}
  assert {p.key for p in pairs if clean.text_passes(p.text, 3, 32)} == kept


def test_bad_bounds_are_rejected():
  with pytest.raises(ValueError, match='min_chars'):
    clean.CleanPairs(min_chars=5, max_chars=4)


def test_images_below_the_minimum_size_are_filtered_before_decoding():
  tiny, icon, ok = (image_bytes(i, size=n) for i, n in ((1, 1), (2, 31), (3, 32)))
  wide = io.BytesIO()
  Image.new('RGB', (400, 20)).save(wide, 'PNG')   # the short side counts
  pairs = [types.Pair('t', tiny, 'a tracking pixel', 's'), types.Pair('i', icon, 'an icon', 's'),
           types.Pair('o', ok, 'just large enough', 's'),
           types.Pair('w', wide.getvalue(), 'a banner', 's')]
  run_stage(clean.CleanPairs(min_image_size=32), pairs, [('o', digest(ok), 'just large enough')],
            [], [('image_too_small', 't'), ('image_too_small', 'i'), ('image_too_small', 'w')])
  assert clean.image_size(tiny) == (1, 1) and clean.image_size(b'not an image') is None
  with pytest.raises(ValueError, match='min_image_size must be >= 1'):
    clean.CleanPairs(min_image_size=0)


# ----------------------------------------------------------------------------- size caps


def test_images_over_the_pixel_or_aspect_cap_are_dead_lettered_before_decoding():
  from test_image_limits import blank_png  # pylint: disable=import-outside-toplevel
  # 13000x13000 and 10000x10000 are under PIL's error threshold (179 Mpx): PIL only warns,
  # and these were decoded and stored.
  huge, big, line = blank_png(13000, 13000), blank_png(10000, 10000), blank_png(40, 2000, 'RGB')
  ok = blank_png(40, 1280, 'RGB')  # 32:1, the most the cap allows
  pairs = [types.Pair('huge', huge, 'a poster', 's'), types.Pair('big', big, 'a map', 's'),
           types.Pair('line', line, 'a divider', 's'), types.Pair('ok', ok, 'a banner', 's')]
  run_stage(clean.CleanPairs(), pairs, [('ok', digest(ok), 'a banner')],
            [('image_too_large', 'huge'), ('image_too_large', 'big'),
             ('extreme_aspect_ratio', 'line')], [])
  _, (_, detail) = clean.verify_image(line)
  assert '40x2000' in detail and '32:1' in detail


def web_images():
  """Web oddities, encoded: {member name: bytes}."""
  out = {}
  frames = [Image.fromarray(np.full((40, 48, 3), c, np.uint8)) for c in (30, 120, 250)]
  for name, fmt, extra in (('anim_webp.webp', 'WEBP', dict(lossless=True)),
                           ('anim_gif.gif', 'GIF', {})):
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **extra)
    out[name] = buf.getvalue()
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees to display.
  rgb, cmyk = (np.random.default_rng(5).integers(0, 256, (40, 64, n), dtype=np.uint8)
               for n in (3, 4))
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, 'JPEG', exif=exif.tobytes())
  out['rotated.jpg'] = buf.getvalue()
  buf = io.BytesIO()
  Image.fromarray(cmyk, 'CMYK').save(buf, 'JPEG')
  out['cmyk.jpg'] = buf.getvalue()
  out['page.jpg'] = b'<!DOCTYPE html><html><body>403 Forbidden</body></html>'
  return out


def test_web_oddities_in_a_tar_end_as_pairs_training_decodes_or_dead_letters(tmp_path):
  from test_i2e_read import write_tar  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import read  # pylint: disable=import-outside-toplevel
  images = web_images()
  members = []
  for name, data in images.items():
    key = name.split('.')[0]
    members += [(name, data), (f'{key}.txt', f'caption of {key}'.encode())]
  pairs = list(read.read_tar(str(write_tar(tmp_path / 'web.tar', members)), ('txt',)))
  assert [p.key for p in pairs] == [n.split('.')[0] for n in images]
  outcome = {}
  for pair in pairs:
    out, error = clean.verify_image(pair.image)
    if error:
      outcome[pair.key] = error[0]
      continue
    pixels = tf_decodes(out)  # What training will read: it must decode.
    assert pixels is not None, pair.key
    first = np.asarray(Image.open(io.BytesIO(pair.image)).convert('RGB'))  # frame 0, unrotated
    assert pixels.shape == first.shape, pair.key
    if pair.key.startswith('anim'):
      np.testing.assert_array_equal(pixels, first)
    outcome[pair.key] = 'kept' if out == pair.image else 'first frame as PNG'
  assert outcome == {'anim_webp': 'first frame as PNG', 'anim_gif': 'first frame as PNG',
                     'rotated': 'kept', 'cmyk': 'kept', 'page': 'corrupt_image'}
  run_stage(clean.CleanPairs(min_image_size=8), pairs,
            [(p.key, digest(clean.verify_image(p.image)[0]), p.text) for p in pairs
             if p.key != 'page'], [('corrupt_image', 'page')], [])
