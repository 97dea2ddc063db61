"""Issue 32's target, end to end through the command line: every record of a corpus built
from web images, animated and huge ones included, decodes with the training decoder, and
at most clean.max_pixels.

One img2dataset-style tar ({key}.{ext} + {key}.txt + {key}.json) holds the worst real inputs
with real alt-texts (several scripts, emoji, entities, invisible characters);
`python -m data_prep.build_i2e --pairs_only` turns it into a pairs corpus at the default
clean settings. Every record is read back and decoded by preprocess.decode_pixels, and
checked against PIL's reading of the input (frame 0, EXIF transpose, alpha over white)
computed here, independently of clean.py. The bad inputs leave with their reasons, the
counts reconcile, and nothing is written outside --out."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from configs import i2e as i2e_config
from mofi_jax.data import preprocess
from test_i2e_clean import flat_png, marked, over_white
from test_i2e_pipeline import RAW, dead_letters, run_cli, unprefixed, written_records
from test_i2e_read import write_tar
from test_image_limits import blank_png

MAX_PIXELS = i2e_config.get_config().clean.max_pixels   # What the CLI runs with: no override.
HUGE_SIDE, HUGE_RGB = 13000, (250, 140, 20)              # 169 Mpx, a few KB on disk.
# key -> (member extension, raw alt-text, alt-text as stored).
CAPTIONS = {
    'anim_webp': ('webp', 'Анимированная эмблема — первый кадр',
                  'Анимированная эмблема — первый кадр'),
    'anim_gif': ('gif', '動く猫のGIF\u3000🐱 (3 frames)', '動く猫のGIF 🐱 (3 frames)'),
    'exif_6': ('jpg', 'صورة من الهاتف، مدينة مراكش', 'صورة من الهاتف، مدينة مراكش'),
    'huge': ('png', 'Poster: Tour de France 2019 &#8212; 13000×13000',
             'Poster: Tour de France 2019 — 13000×13000'),
    'rgba': ('png', 'Logo &amp;amp; wordmark, <b>transparent</b> background',
             'Logo & wordmark, transparent background'),
    'grey16': ('png', 'Röntgenbild eines Fuße\u0301s, 16-bit', 'Röntgenbild eines Fußés, 16-bit'),
    'webp_alpha': ('webp', 'स्टिकर: नमस्ते 🙏🏽', 'स्टिकर: नमस्ते 🙏🏽'),
    'png_as_jpg': ('jpg', 'Ελληνική σημαία στον άνεμο', 'Ελληνική σημαία στον άνεμο'),
    'cmyk': ('jpg', '印刷用 CMYK 画像 – 東京タワー\u200b', '印刷用 CMYK 画像 – 東京タワー'),
    'truncated': ('jpg', 'Broken upload 😢', None),
    'zero_bytes': ('jpg', 'Empty file from a dead CDN', None),
    'zero_bytes_2': ('jpg', 'Bild nicht verfügbar', None),  # Not a duplicate of the other.
    'text_as_jpg': ('jpg', 'Access denied', None),
    'bomb': ('png', 'Carte géante de Paris', None),
}
# key -> (stage, reason, words of its detail).
DEAD = {'zero_bytes': ('read', 'missing_field', 'zero_bytes.jpg is empty'),
        'zero_bytes_2': ('read', 'missing_field', 'zero_bytes_2.jpg is empty'),
        'truncated': ('clean', 'corrupt_image', 'image file is truncated'),
        'text_as_jpg': ('clean', 'corrupt_image', 'not an image'),
        'bomb': ('clean', 'image_too_large', '179560000 pixels')}
KEPT = sorted(k for k, (_, _, stored) in CAPTIONS.items() if stored is not None)


def noise(seed, height, width, channels=3, dtype=np.uint8):
  """Noise: every image its own pHash, so dedup keeps each one."""
  high = np.iinfo(dtype).max + 1
  return np.random.default_rng(seed).integers(0, high, (height, width, channels), dtype=dtype)


def encode(image, fmt, **options):
  out = io.BytesIO()
  image.save(out, fmt, **options)
  return out.getvalue()


def animated(fmt, **options):
  """Three frames of one pattern: frame 0 tinted red, the later ones blue."""
  base = noise(1, 48, 64).astype(int) // 2
  frames = [Image.fromarray((base + tint).astype(np.uint8)) for tint in
            ((120, 0, 0), (0, 0, 120), (0, 60, 120))]
  return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                **options)


def with_holes(seed):
  """RGBA noise: left quarter transparent (hidden colour black), right quarter half-opaque."""
  rgba = noise(seed, 40, 64, 4)
  rgba[..., 3] = 255
  rgba[:, :16, :3], rgba[:, :16, 3], rgba[:, 48:, 3] = 0, 0, 128
  return Image.fromarray(rgba, 'RGBA')


def exif_rotated():
  exif = Image.Exif()
  exif[0x0112] = 6                       # Stored 96 wide, shown 96 tall.
  return encode(Image.fromarray(marked(96, 64)), 'JPEG', quality=95, exif=exif.tobytes())


def web_images():
  """{key: bytes}: the worst of what img2dataset downloads."""
  good = encode(Image.fromarray(noise(9, 48, 64)), 'JPEG', quality=90)
  return {
      'anim_webp': animated('WEBP', quality=90),
      'anim_gif': animated('GIF'),
      'exif_6': exif_rotated(),
      'huge': flat_png(HUGE_SIDE, HUGE_SIDE, HUGE_RGB),
      'rgba': encode(with_holes(2), 'PNG'),
      'grey16': encode(Image.fromarray(noise(3, 40, 56, 1, np.uint16)[..., 0]), 'PNG'),
      'webp_alpha': encode(with_holes(4), 'WEBP', lossless=True),
      'png_as_jpg': encode(Image.fromarray(noise(5, 40, 60)), 'PNG'),
      'cmyk': encode(Image.fromarray(noise(6, 40, 64, 4), 'CMYK'), 'JPEG', quality=95),
      'truncated': good[:len(good) // 2],
      'zero_bytes': b'',
      'zero_bytes_2': b'',
      'text_as_jpg': b'<!DOCTYPE html><html><body>403 Forbidden</body></html>\n',
      'bomb': blank_png(13400, 13400),   # 179.6 Mpx: past what clean decodes at all.
  }


def tar_members(images):
  """img2dataset's layout: {key}.{ext}, {key}.txt and {key}.json, a key's files adjacent."""
  members = []
  for key, data in images.items():
    ext, caption, _ = CAPTIONS[key]
    meta = {'url': f'https://example.com/{key}.{ext}', 'caption': caption, 'key': key,
            'status': 'success', 'error_message': None}
    members += [(f'{key}.{ext}', data), (f'{key}.txt', caption.encode()),
                (f'{key}.json', json.dumps(meta, ensure_ascii=False).encode())]
  return members


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The CLI run at the default clean settings, in an empty working folder and TMPDIR."""
  root = tmp_path_factory.mktemp('web_images')
  inputs, cwd, tmp = root / RAW, root / 'cwd', root / 'tmp'
  for folder in (inputs, cwd, tmp):
    folder.mkdir()
  images = web_images()
  tar = write_tar(inputs / 'web.tar', tar_members(images))
  out = cwd / 'corpus'
  result = run_cli('--pairs', str(tar), '--out', str(out), '--pairs_only',
                   '--config.write.num_shards=2', '--config.write.vocab_size=300',
                   '--config.write.text_len=16', cwd=str(cwd), TMPDIR=str(tmp))
  return dict(result=result, images=images, out=str(out), outside=files_outside(root, out))


def files_outside(root, out):
  """Files under `root` but not under `out`, relative to `root` (empty folders are not
  listed: Beam's local job service leaves its staging folders in TMPDIR, empty)."""
  return sorted(os.path.relpath(os.path.join(folder, name), root)
                for folder, _, names in os.walk(root) for name in names
                if not os.path.join(folder, name).startswith(f'{out}{os.sep}'))


@pytest.fixture(scope='module')
def decoded(built):
  """{key: (stored alt-text, pixels by the training decoder)} of every record written."""
  assert built['result'].returncode == 0, built['result'].stderr[-3000:]
  return {key: (values['alt_text'][0].decode(),
                preprocess.decode_pixels(values['image/encoded'][0]).numpy())
          for key, values in written_records(built['out']).items()}


def pil_reference(data, frame=0):
  """What a browser shows, by PIL: the frame, upright, over white; 16-bit grey by its top
  byte, as TF reads a 16-bit PNG."""
  with Image.open(io.BytesIO(data)) as image:
    image.seek(frame)
    if image.mode.startswith('I;16'):
      return np.repeat(np.asarray(image).astype(np.int64)[..., None] >> 8, 3, -1)
    return over_white(np.asarray(ImageOps.exif_transpose(image).convert('RGBA')))


def test_the_cli_succeeds_and_writes_nothing_outside_out(built):
  assert built['result'].returncode == 0, built['result'].stderr[-3000:]
  assert f'{len(KEPT)} of {len(CAPTIONS)} inputs written' in built['result'].stdout
  assert built['outside'] == [f'{RAW}/web.tar']


def test_every_record_decodes_with_the_training_decoder_within_max_pixels(decoded):
  assert sorted(decoded) == KEPT
  for key, (text, pixels) in decoded.items():
    height, width, channels = pixels.shape
    assert channels == 3 and height * width <= MAX_PIXELS, (key, pixels.shape)
    assert text == CAPTIONS[key][2], key


def test_the_huge_flat_png_is_downscaled_whole_and_keeps_its_colour(decoded):
  _, pixels = decoded['huge']
  height, width, _ = pixels.shape
  assert height == width and height * width > 0.999 * MAX_PIXELS  # Not shrunk to a stamp.
  assert (pixels == HUGE_RGB).all()


@pytest.mark.parametrize('key,mean_error,max_error', [
    ('anim_webp', 0, 0), ('anim_gif', 0, 0), ('png_as_jpg', 0, 0),     # stored as PNG
    ('rgba', 0.5, 1), ('webp_alpha', 0.5, 1), ('grey16', 0.5, 1),      # rounding
    ('exif_6', 2, 32), ('cmyk', 2, 32)])   # JPEG: one more generation; TF's CMYK vs PIL's
def test_each_image_is_what_pil_shows(built, decoded, key, mean_error, max_error):
  want = pil_reference(built['images'][key])
  got = decoded[key][1].astype(np.int64)
  assert got.shape == want.shape, key
  error = np.abs(got - want)
  assert error.mean() <= mean_error and error.max() <= max_error, (key, error.mean(), error.max())


@pytest.mark.parametrize('key', ['anim_webp', 'anim_gif'])
def test_animations_keep_their_first_frame_not_a_later_one(built, decoded, key):
  later = pil_reference(built['images'][key], frame=1)
  assert np.abs(decoded[key][1].astype(np.int64) - later).mean() > 50


def test_exif_orientation_is_shown_upright_and_transparency_is_white(built, decoded):
  stored = np.asarray(Image.open(io.BytesIO(built['images']['exif_6'])))
  assert decoded['exif_6'][1].shape == (stored.shape[1], stored.shape[0], 3)
  for key in ('rgba', 'webp_alpha'):  # Transparent left quarter, black underneath.
    assert (decoded[key][1][:, :16] == 255).all(), key


def test_bad_inputs_leave_with_their_reasons_and_the_counts_reconcile(built, decoded):
  got, rows = dead_letters(built['out'])
  assert got == sorted((stage, reason, key) for key, (stage, reason, _) in DEAD.items())
  for row in rows:
    assert DEAD[unprefixed(row['key'])][2] in row['detail'], row
  with open(os.path.join(built['out'], 'stats.json')) as f:
    stats = json.load(f)
  assert stats['reconciled'] and stats['written'] == len(decoded) == len(KEPT)
  assert stats['filtered'] == {}, stats['filtered']
  assert stats['dead_letter'] == {'missing_field': 2, 'corrupt_image': 2, 'image_too_large': 1}
  assert stats['inputs'] == len(CAPTIONS) == stats['written'] + sum(
      stats['filtered'].values()) + sum(stats['dead_letter'].values())
  for stage in stats['stages']:
    assert stage['in'] == stage['out'] + sum(stage['filtered'].values()) + sum(
        stage['dead_letter'].values()), stage
  assert [s['in'] for s in stats['stages'][1:]] == [s['out'] for s in stats['stages'][:-1]]
