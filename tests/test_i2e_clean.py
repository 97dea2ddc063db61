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


@pytest.mark.parametrize('name', ['truncated_jpeg', 'jpeg_without_end', 'half_png', 'half_gif',
                                  'half_webp', 'text', 'empty'])
def test_corrupt_payloads_are_rejected(name):
  _, jpeg = encoded('JPEG', size=64)
  _, png = encoded('PNG', size=64)
  _, gif = encoded('GIF', size=64)
  _, webp = encoded('WEBP', size=64)
  data = dict(truncated_jpeg=jpeg[:len(jpeg) // 2], jpeg_without_end=jpeg[:-2],
              half_png=png[:len(png) // 2], half_gif=gif[:len(gif) // 2],
              half_webp=webp[:len(webp) // 2], text=b'<html>not an image</html>', empty=b'')[name]
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


@pytest.mark.parametrize('raw, cleaned', [
    ('The <b>Eiffel Tower</b> at night', 'The Eiffel Tower at night'),
    ('&lt;i&gt;Tour Eiffel&lt;/i&gt;, Paris', 'Tour Eiffel, Paris'),   # escaped, then a tag
    ('Paris<br/>London', 'Paris London'), ('<!-- ad -->Big Ben', 'Big Ben'),
    ('i &lt;3 Paris', 'i <3 Paris'),                  # not a tag
    ('IMG_1234.JPG', ''), ('DSC00017', ''), ('PXL_20230101_123456789.jpg', ''),
    ('20240101_123000.jpg', ''), ('IMG_1234 (2).jpg', ''),
    ('Screenshot 2024-01-01 at 12.30.00.png', ''),
    ('London_Big_Ben_2019.jpg', 'London Big Ben 2019'), ('My trip to Paris.JPG', 'My trip to Paris'),
    ('Paris 2019', 'Paris 2019'), ('P 2019', 'P 2019')])
def test_tags_and_file_names(raw, cleaned):
  assert clean.normalize_text(raw) == cleaned
  assert clean.is_filename_caption(raw) == (cleaned == '')


def test_empty_and_filename_captions_are_counted_not_dead_lettered():
  img = [image_bytes(i) for i in range(3)]
  pairs = [types.Pair('a', img[0], 'IMG_1234.JPG', 's'), types.Pair('b', img[1], '', 's'),
           types.Pair('c', img[2], 'London_Big_Ben_2019.jpg', 's')]
  run_stage(clean.CleanPairs(min_chars=1, max_chars=100, min_image_size=8), pairs,
            [('c', digest(img[2]), 'London Big Ben 2019')], [],
            [('filename_caption', 'a'), ('empty_text', 'b')])


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
            [('corrupt_image', 'e')], [('empty_text', 'c'), ('text_too_short', 'd')])
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


def flat_png(width, height, rgb=(250, 140, 20)):
  """A palette PNG of one colour: a few hundred KB at 13000x13000, 507 MB decoded as RGB."""
  out = io.BytesIO()
  Image.new('RGB', (1, 1), rgb).convert('P', palette=Image.Palette.ADAPTIVE).resize(
      (width, height)).save(out, 'PNG')
  return out.getvalue()


def test_huge_images_are_downscaled_under_max_pixels_and_over_the_decode_cap_dead_lettered():
  from test_image_limits import blank_png  # pylint: disable=import-outside-toplevel
  # 13000x13000 is under PIL's error threshold (179 Mpx): PIL only warns, and this was
  # stored and decoded at full size every epoch.
  huge, line = flat_png(13000, 13000), blank_png(40, 2000, 'RGB')
  bomb = blank_png(13400, 13400)  # 179.6 Mpx: over what clean decodes at all.
  ok = blank_png(40, 1280, 'RGB')  # 32:1, the most the cap allows
  assert len(huge) < 1_000_000
  out, error = clean.verify_image(huge)
  assert error is None and out.startswith(b'\x89PNG')
  pixels = tf_decodes(out)  # The training decoder, independent of PIL.
  height, width, _ = pixels.shape
  assert height == width and height * width <= clean.DEFAULT_MAX_PIXELS
  assert height * width > 0.999 * clean.DEFAULT_MAX_PIXELS  # Downscaled, not shrunk to a stamp.
  assert (pixels == (250, 140, 20)).all()
  big = flat_png(3000, 2000)  # The stage passes its own budget on.
  pairs = [types.Pair('big', big, 'a poster', 's'), types.Pair('bomb', bomb, 'a map', 's'),
           types.Pair('line', line, 'a divider', 's'), types.Pair('ok', ok, 'a banner', 's')]
  small = clean.verify_image(big, max_pixels=1_000_000)[0]
  assert tf_decodes(small).shape == (816, 1224, 3)
  run_stage(clean.CleanPairs(max_pixels=1_000_000), pairs,
            [('big', digest(small), 'a poster'), ('ok', digest(ok), 'a banner')],
            [('image_too_large', 'bomb'), ('extreme_aspect_ratio', 'line')], [])
  _, (_, detail) = clean.verify_image(line)
  assert '40x2000' in detail and '32:1' in detail


def halves(width, height, left=(255, 0, 0), right=(0, 0, 255)):
  """Left half one colour, right half another: a flip or a transpose shows."""
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[:, :width // 2], pixels[:, width // 2:] = left, right
  return pixels


@pytest.mark.parametrize('fmt,size,max_pixels,max_side,want', [
    ('PNG', (3000, 1000), 300_000, 0, (948, 316)),   # sqrt(0.1) of each side, floored
    ('JPEG', (3000, 1000), 300_000, 0, (948, 316)),  # decoded at 1/2 scale first (draft)
    ('PNG', (2000, 500), 40_000_000, 400, (400, 100)),
    ('PNG', (640, 480), 307_200, 640, (640, 480)),   # fits both: kept byte for byte
])
def test_images_over_the_budget_are_downscaled_with_the_aspect_kept(fmt, size, max_pixels,
                                                                    max_side, want):
  width, height = size
  data = io.BytesIO()
  Image.fromarray(halves(width, height)).save(data, fmt, quality=95)
  data = data.getvalue()
  out, error = clean.verify_image(data, max_pixels=max_pixels, max_side=max_side)
  assert error is None
  assert (out == data) == (want == size)
  pixels = tf_decodes(out).astype(int)
  assert pixels.shape == (want[1], want[0], 3)
  assert abs(want[0] / want[1] - width / height) < 1 / min(want)
  quarter = want[0] // 4  # Away from the edge that resampling blurs.
  np.testing.assert_allclose(pixels[:, :quarter].mean((0, 1)), (255, 0, 0), atol=3)
  np.testing.assert_allclose(pixels[:, -quarter:].mean((0, 1)), (0, 0, 255), atol=3)


def test_sixteen_bit_grey_keeps_its_tones_when_re_encoded():
  grey = (np.arange(96 * 64).reshape(64, 96) * 10).astype(np.uint16)  # up to 61,430
  data = io.BytesIO()
  Image.fromarray(grey).save(data, 'PNG')
  assert Image.open(data).mode == 'I;16'
  want = tf_decodes(data.getvalue()).astype(int)  # TF's own 16 -> 8 bit reading
  out, error = clean.verify_image(data.getvalue(), max_pixels=48 * 32)  # half each side
  assert error is None
  got = tf_decodes(out).astype(int)
  assert got.shape == (32, 48, 3)
  np.testing.assert_allclose(got, want.reshape(32, 2, 48, 2, 3).mean((1, 3)), atol=3)


def test_fit_size_stays_under_the_budget():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    width, height = (int(v) for v in rng.integers(1, 50_000, 2))
    max_pixels, max_side = int(rng.integers(1, 10**8)), int(rng.integers(0, 3) * 1000)
    got = clean.fit_size((width, height), max_pixels, max_side)
    assert got[0] * got[1] <= max(max_pixels, 1) or got == (1, 1)
    assert not max_side or max(got) <= max_side or got == (width, height)
    if got != (width, height):
      # Within a pixel of the largest fitting size.
      assert (got[0] + 1) * (got[1] + 1) > max_pixels or max(got) + 1 > (max_side or 10**9)


# Orientation -> what a viewer shows, from the stored pixels, in NumPy (EXIF 2.32, 4.6.4).
UPRIGHT = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def marked(width=64, height=40):
  """Smooth (JPEG keeps it) and asymmetric: any flip or rotation moves the mark."""
  yy, xx = np.mgrid[:height, :width]
  pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 60)], -1)
  pixels[4:14, 6:22] = (255, 255, 255)  # Top-left, off-centre.
  return pixels.astype(np.uint8)


@pytest.mark.parametrize('orientation', range(2, 9))
def test_exif_orientation_is_applied(orientation):
  from PIL import ImageOps  # pylint: disable=import-outside-toplevel
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = io.BytesIO()
  Image.fromarray(marked()).save(data, 'JPEG', quality=95, exif=exif.tobytes())
  data = data.getvalue()
  stored = tf_decodes(data).astype(int)  # TF ignores EXIF: the sideways pixels.
  out, error = clean.verify_image(data)
  assert error is None and out.startswith(b'\xff\xd8')  # Still a JPEG.
  got = tf_decodes(out).astype(int)
  want = UPRIGHT[orientation](stored)
  by_pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))).astype(int)
  assert by_pil.shape == want.shape and np.abs(by_pil - want).mean() < 2  # Table agrees.
  assert got.shape == want.shape
  assert np.abs(got - want).mean() < 2  # One more JPEG generation at quality 95.
  assert Image.open(io.BytesIO(out)).getexif().get(0x0112, 1) == 1  # Not rotated twice.
  if got.shape == stored.shape:
    assert np.abs(got - stored).mean() > 20  # What was stored before.


def over_white(rgba):
  """Alpha compositing onto white, in NumPy (straight alpha)."""
  alpha = rgba[..., 3:].astype(float) / 255
  return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(int)


@pytest.mark.parametrize('fmt', ['PNG', 'WEBP', 'LA', 'GIF'])
def test_transparent_pixels_come_out_white(fmt):
  rgba = np.zeros((32, 48, 4), np.uint8)
  rgba[..., :3] = np.random.default_rng(1).integers(0, 256, (32, 48, 3))
  rgba[:, 16:, 3] = 255                  # opaque
  rgba[:, 32:, 3] = 128 if fmt in ('PNG', 'WEBP') else 255
  rgba[:, :16, :3] = 0                   # hidden colour black, where it is transparent
  data = io.BytesIO()
  if fmt == 'LA':
    rgba[..., :3] = rgba[..., :1]
    Image.fromarray(rgba[..., [0, 3]], 'LA').save(data, 'PNG')
  elif fmt == 'GIF':  # Palette transparency: index 0 is transparent.
    image = Image.fromarray(rgba[..., :3]).quantize(64)
    pixels = np.asarray(image).copy()
    pixels[:, :16] = 0
    image = Image.fromarray(pixels, 'P')
    image.putpalette(Image.fromarray(rgba[..., :3]).quantize(64).getpalette())
    image.save(data, 'GIF', transparency=0)
    rgba[..., :3] = np.asarray(image.convert('RGB'))
    rgba[..., 3] = np.where(pixels == 0, 0, 255)  # Index 0 may occur on the right too.
  else:
    Image.fromarray(rgba, 'RGBA').save(data, fmt, lossless=True)
  data = data.getvalue()
  before = tf_decodes(data)  # What training read before: black, or (WebP) an error.
  assert before is None if fmt == 'WEBP' else (before[:, :16] == 0).all()
  out, error = clean.verify_image(data)
  assert error is None
  np.testing.assert_allclose(tf_decodes(out).astype(int), over_white(rgba), atol=1)


def test_opaque_alpha_is_kept_byte_for_byte():
  rgba = np.full((32, 32, 4), 255, np.uint8)
  rgba[..., 0] = 7
  data = io.BytesIO()
  Image.fromarray(rgba, 'RGBA').save(data, 'PNG')
  assert clean.verify_image(data.getvalue()) == (data.getvalue(), None)


def test_what_pil_reads_and_tf_rejects_is_stored_as_pil_decodes_it():
  import struct  # pylint: disable=import-outside-toplevel
  pixels, png = encoded('PNG', seed=3)
  png = bytearray(png)
  at = png.index(b'IDAT')
  png[at + 4 + struct.unpack('>I', png[at - 4:at])[0]] ^= 0xFF  # IDAT's CRC: PIL ignores it.
  one_bit = io.BytesIO()
  Image.fromarray(pixels).convert('1').save(one_bit, 'BMP')  # TF: "channels ... was 0"
  for data, want in ((bytes(png), pixels),
                     (one_bit.getvalue(), np.asarray(Image.fromarray(pixels).convert('1')
                                                     .convert('RGB')))):
    assert tf_decodes(data) is None  # Both were stored byte for byte, and broke training.
    out, error = clean.verify_image(data)
    assert error is None and out.startswith(b'\x89PNG')
    np.testing.assert_array_equal(tf_decodes(out), want)


def test_every_stored_image_goes_through_the_training_decoder(monkeypatch):
  from mofi_jax.data import preprocess  # pylint: disable=import-outside-toplevel
  seen = []

  def refuse(data):
    seen.append(data)
    raise tf.errors.InvalidArgumentError(None, None, 'refused by the test')
  monkeypatch.setattr(preprocess, 'decode_pixels', refuse)
  _, data = encoded('JPEG')
  out, (reason, detail) = clean.verify_image(data)
  assert (out, reason) == (None, 'corrupt_image')
  assert 'training decoder' in detail and 'refused by the test' in detail
  assert seen[0] == data and len(seen) == 2  # The original, then PIL's pixels re-encoded.


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
  out['png_named.jpg'] = encoded('PNG', seed=7)[1]  # The extension lies; the bytes decide.
  out['webp_named.gif'] = out['anim_webp.webp']
  out['cut_gif.gif'] = out['anim_gif.gif'][:len(out['anim_gif.gif']) // 2]
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
    if pair.key in ('anim_webp', 'anim_gif', 'webp_named', 'cut_gif'):  # Frame 0: 30s.
      np.testing.assert_array_equal(pixels, np.full((40, 48, 3), 30, np.uint8))
    if pair.key == 'rotated':
      assert pixels.shape == (64, 40, 3)  # Stored 64 wide, shown 64 tall.
    outcome[pair.key] = 'kept' if out == pair.image else Image.open(io.BytesIO(out)).format
  assert outcome == {'anim_webp': 'PNG', 'anim_gif': 'PNG', 'rotated': 'JPEG', 'cmyk': 'kept',
                     'page': 'corrupt_image', 'png_named': 'kept', 'webp_named': 'PNG',
                     'cut_gif': 'PNG'}  # Its first frame is whole: kept, as a browser shows.
  dead = {'page'}
  run_stage(clean.CleanPairs(min_image_size=8), pairs,
            [(p.key, digest(clean.verify_image(p.image)[0]), p.text) for p in pairs
             if p.key not in dead], [('corrupt_image', k) for k in dead], [])
