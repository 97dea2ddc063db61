"""mofi_jax.data.image_limits: the pixel and aspect-ratio caps, and both eval transforms
('tf', 'mofi') on the images that used to exhaust memory, run in a subprocess under an
8 GiB address-space limit: each ends in a clear one-line error or in the right pixels."""
import functools
import io
import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from mofi_jax.data import eval_transform, image_limits
from mofi_jax.evals import image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def blank_png(width, height, mode='1'):
  """A PNG of one colour: a few KB on disk, whatever its pixel count (mode '1' holds a
  13000x13000 image in 21 MB while it is written)."""
  out = io.BytesIO()
  Image.new(mode, (width, height)).save(out, 'PNG')
  return out.getvalue()


def noise_png(width, height, seed=0):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, 'PNG')
  return out.getvalue()


@pytest.mark.parametrize('width,height,error', [
    (32, 1, None), (1, 32, None), (33, 1, image_limits.ExtremeAspectRatio),
    (320, 10, None), (10, 321, image_limits.ExtremeAspectRatio),
    (9459, 9459, None),  # 89,472,681 pixels: just under
    (9460, 9459, image_limits.TooManyPixels), (0, 5, image_limits.ExtremeAspectRatio)])
def test_check_size_bounds(width, height, error):
  if error is None:
    image_limits.check_size(width, height)
  else:
    with pytest.raises(error, match=f'{width}x{height}.*limit'):
      image_limits.check_size(width, height)


def test_the_pixel_cap_is_pils_default_and_ours_even_if_pil_is_relaxed(monkeypatch):
  assert image_limits.MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485
  data = blank_png(10000, 10000)  # 100 Mpx: PIL only warns (it raises over 179 Mpx)
  with pytest.raises(image_limits.TooManyPixels, match='100000000 pixels.*89478485'):
    image_limits.open_image(data)
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)  # someone switched PIL's check off
  with pytest.raises(image_limits.TooManyPixels, match='10000x10000.*over the limit'):
    image_limits.open_image(data)
  assert image_limits.header_size(data, check=False) == (10000, 10000)


def test_warnings_filters_are_left_as_they_were():
  before = list(warnings.filters)
  for data in (blank_png(10000, 10000), blank_png(64, 64), b'not an image'):
    try:
      image_limits.header_size(data)
    except image_limits.ImageLimitError:
      pass
  assert warnings.filters == before


def test_header_size_reads_no_pixels_and_passes_unknown_formats():
  assert image_limits.header_size(blank_png(300, 20)) == (300, 20)
  assert image_limits.header_size(b'<html>not an image</html>') is None
  with pytest.raises(image_limits.ExtremeAspectRatio, match='5000x1'):
    image_limits.header_size(blank_png(5000, 1))


# A child process: both transforms, eagerly and through tf.data, on each named PNG. Only
# the transforms' own refusals are caught; anything else (MemoryError, a crash) leaves a
# traceback and a non-zero exit status.
_CHILD = textwrap.dedent('''
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    import numpy as np
    import tensorflow as tf
    from mofi_jax.data import eval_transform, image_limits
    size, out_dir, paths = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for path in paths:
      data = open(path, 'rb').read()
      for method in ('tf', 'mofi'):
        transform = eval_transform.EvalTransform(size, method=method)
        for mode in ('eager', 'graph'):
          try:
            if mode == 'eager':
              image = transform(tf.constant(data)).numpy()
            else:
              ds = tf.data.Dataset.from_tensors(data).map(transform)
              image = next(iter(ds)).numpy()
          except (ValueError, tf.errors.InvalidArgumentError) as e:  # incl. ImageLimitError
            line = (getattr(e, 'message', None) or str(e)).strip().splitlines()[0]
            print(f'{path}|{method}|{mode}|error|{line}')
            continue
          name = f'{method}-{mode}-{path.rsplit("/", 1)[-1]}.npy'
          np.save(f'{out_dir}/{name}', image)
          print(f'{path}|{method}|{mode}|ok|{name}')
    ''')


def run_limited(tmp_path, size, images):
  """{(name, method, mode): ('error', first line) | ('ok', pixels)} from the child."""
  paths = []
  for name, data in images.items():
    paths.append(str(tmp_path / name))
    with open(paths[-1], 'wb') as f:
      f.write(data)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-c', _CHILD, str(size), str(tmp_path)] + paths,
                        capture_output=True, text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = {}
  for line in proc.stdout.splitlines():
    path, method, mode, outcome, detail = line.split('|', 4)
    key = (os.path.basename(path), method, mode)
    results[key] = ((outcome, detail) if outcome == 'error' else
                    (outcome, np.load(tmp_path / detail)))
  assert len(results) == 4 * len(images), proc.stdout
  return results


def test_extreme_and_huge_images_fail_clearly_under_an_8_gib_address_space(tmp_path):
  # 1x100000 asked the 'tf' path for a 60 GB tensor and 'mofi' for 112 GiB; 1x5000 for GBs.
  images = {'tall.png': blank_png(1, 100000, 'RGB'), 'wide.png': blank_png(100000, 1, 'RGB'),
            'line.png': blank_png(5000, 1, 'RGB'), 'huge.png': blank_png(13000, 13000),
            'big.png': blank_png(10000, 10000)}
  results = run_limited(tmp_path, 224, images)
  for (name, method, mode), (outcome, line) in results.items():
    assert outcome == 'error', (name, method, mode)
    if name in ('huge.png', 'big.png'):
      assert re.search(r'(169|100)000000 pixels.*89478485', line), line
    else:
      assert 'aspect ratio' in line and 'limit of 32:1' in line, line


def test_elongated_images_under_the_cap_match_the_full_resize(tmp_path):
  # 64x2000 (31:1): torchvision's Resize makes it 224x7000 before the crop.
  from test_mofi_transform import reference_mofi_image  # pylint: disable=import-outside-toplevel
  from test_preprocess import reference_eval_image  # pylint: disable=import-outside-toplevel
  data = noise_png(2000, 64)
  results = run_limited(tmp_path, 224, {'long.png': data})
  for mode in ('eager', 'graph'):
    np.testing.assert_array_equal(results[('long.png', 'mofi', mode)][1],
                                  reference_mofi_image(data, 224))
    np.testing.assert_allclose(results[('long.png', 'tf', mode)][1],
                               reference_eval_image(data, 224), atol=1e-3, rtol=0)


@pytest.mark.parametrize('method', eval_transform.EVAL_PREPROCESSINGS)
def test_image_folders_name_the_refused_file(tmp_path, method):
  paths = []
  for i, data in enumerate([noise_png(40, 30), blank_png(5000, 1), blank_png(10000, 10000)]):
    paths.append(str(tmp_path / f'0_{i}.png'))
    with open(paths[-1], 'wb') as f:
      f.write(data)
  transform = eval_transform.EvalTransform(32, method=method)
  with pytest.raises(image_folder.FolderError, match=r'0_1\.png: unreadable image \(.*5000x1.*'
                     r'limit of 32:1'):
    list(image_folder.image_batches(paths[:2], [0, 0], transform, 2))
  with pytest.raises(image_folder.FolderError, match=r'0_2\.png: unreadable image \(.*100000000 '
                     r'pixels.*89478485'):
    list(image_folder.image_batches([paths[0], paths[2]], [0, 0], transform, 2))


def animated_gif(width, height, frames):
  """A GIF of `frames` uniform frames, alternating colours (PIL drops repeated frames):
  a few KB a frame on disk, width x height pixels each when decoded."""
  out = io.BytesIO()
  images = [Image.new('P', (width, height), i % 2) for i in range(frames)]
  images[0].save(out, 'GIF', save_all=True, append_images=images[1:], duration=40)
  return out.getvalue()


def test_a_gif_counts_every_frame_tf_would_decode(tmp_path):
  """TF's GIF decoder decodes every frame even when it keeps the first; 50 frames of
  2000x1000 are 100 Mpx to decode from a file of a few hundred KB. PIL (the 'mofi' path)
  decodes only the first frame, so that path still gives the image."""
  data = animated_gif(2000, 1000, 50)
  assert len(data) < 2_000_000
  with pytest.raises(image_limits.TooManyPixels, match=r'animated GIF of 50 frames of 2000x1000'):
    image_limits.header_size(data, all_frames=True)
  assert image_limits.header_size(data) == (2000, 1000)
  results = run_limited(tmp_path, 32, {'anim.gif': data, 'short.gif': animated_gif(64, 48, 3)})
  for mode in ('eager', 'graph'):
    outcome, line = results[('anim.gif', 'tf', mode)]
    assert outcome == 'error' and 'animated GIF of 50 frames' in line, line
    assert results[('anim.gif', 'mofi', mode)][0] == 'ok'
    for method in ('tf', 'mofi'):
      assert results[('short.gif', method, mode)][0] == 'ok'


def test_bytes_pil_cannot_identify_are_refused_before_tf_decodes_them(tmp_path):
  results = run_limited(tmp_path, 32, {'page.jpg': b'<html><body>404</body></html>'})
  for mode in ('eager', 'graph'):
    outcome, line = results[('page.jpg', 'tf', mode)]
    assert outcome == 'error' and 'PIL cannot identify' in line, line
