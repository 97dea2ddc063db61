"""End to end with img2dataset itself: images served from 127.0.0.1, downloaded by the
`img2dataset` command (one run with webdataset output, one with parquet output, each with
URLs that fail), both runs fed to build_i2e. Checked against the URL lists the test wrote:
which URL failed, which image is 1x1, which caption names which entity, and each image's
colour."""
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from PIL import Image

from configs import i2e as i2e_config
from data_prep.i2e import kb as kb_lib
from data_prep.i2e import metadata, pipeline
from mofi_jax.data import schema
from test_i2e_pipeline import ENTITIES, TinyClipLoader, written_records

NAMES = [e.label for e in ENTITIES[:3]]
RUNS = {'wds': 'webdataset', 'pq': 'parquet'}   # output folder -> img2dataset output_format
GOOD_PER_RUN = 6


def _jpeg(colour, size):
  """`colour` on average, with a pattern of +-20 seeded by it: flat images are each other's
  near-duplicates by pHash (dedup.near_duplicate_distance), as they should be."""
  rng = np.random.default_rng(abs(hash(tuple(colour))) % 2**32)
  signs = rng.permutation(np.repeat([-20, 20], 32)).reshape(8, 8, 1)   # balanced: mean kept
  tile = -(-size // 8)
  offset = signs.repeat(tile, 0).repeat(tile, 1)[:size, :size] if size >= 8 else 0
  pixels = np.broadcast_to(np.array(colour) + offset, (size, size, 3)).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, 'JPEG', quality=95)
  return out.getvalue()


def _url_list(run_index):
  """[(file name, caption, colour or None)]: good images, a 404, an HTML page, a 1x1 image."""
  rows = []
  for i in range(GOOD_PER_RUN):
    colour = (40 * i + 20, 120 * run_index + 30, 200 - 30 * i)
    rows.append((f'r{run_index}_{i}.jpg', f'photo of {NAMES[i % 3]} number {i}', colour))
  rows += [(f'r{run_index}_missing.jpg', f'{NAMES[0]} gone', None),
           (f'r{run_index}_page.jpg', f'{NAMES[1]} page', None),
           (f'r{run_index}_tiny.jpg', f'{NAMES[2]} pixel', None)]
  return rows


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp('www')
  for run_index in range(len(RUNS)):
    for name, _, colour in _url_list(run_index):  # (each run's 1x1 pixel its own colour)
      if colour is not None:
        (root / name).write_bytes(_jpeg(colour, 48))
      elif 'page' in name:
        (root / name).write_bytes(b'<html><body>moved</body></html>')
      elif 'tiny' in name:
        (root / name).write_bytes(_jpeg((0, 0, 200 * run_index), 1))
  handler = functools.partial(_QuietHandler, directory=str(root))
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def _img2dataset(url_list, out, output_format):
  """The img2dataset command line, as a user runs it."""
  command = [os.path.join(os.path.dirname(sys.executable), 'img2dataset'),
             f'--url_list={url_list}', '--input_format=parquet', '--url_col=url',
             '--caption_col=caption', f'--output_format={output_format}',
             f'--output_folder={out}', '--processes_count=1', '--thread_count=4',
             '--resize_mode=no', '--timeout=5', '--enable_wandb=False']
  # The server is local: no proxy may stand in between.
  env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE='1', no_proxy='127.0.0.1,localhost',
             NO_PROXY='127.0.0.1,localhost')
  result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope='module')
def downloads(server, tmp_path_factory):
  """{run folder: its url list rows}; both runs number their keys from 000000000."""
  root = tmp_path_factory.mktemp('downloads')
  lists = {}
  for run_index, (run, output_format) in enumerate(RUNS.items()):
    rows = _url_list(run_index)
    pq.write_table(pa.table({'url': [f'{server}/{n}' for n, _, _ in rows],
                             'caption': [c for _, c, _ in rows]}), root / f'{run}_urls.parquet')
    _img2dataset(str(root / f'{run}_urls.parquet'), str(root / run), output_format)
    lists[run] = [(f'{server}/{n}', c, colour) for n, c, colour in rows]
  return str(root), lists


@pytest.fixture(scope='module')
def corpus(downloads, tmp_path_factory):
  root, _ = downloads
  kb_dir = str(tmp_path_factory.mktemp('kb'))
  kb_lib.write_small_kb(kb_dir, ENTITIES)
  config = i2e_config.get_config()     # img2dataset's names are the defaults
  config.global_passes.min_images = 2
  config.select.threshold = -1.0       # A random-init CLIP: keep every linked entity.
  config.write.update(num_shards=2, vocab_size=300, text_len=16)
  out = str(tmp_path_factory.mktemp('corpus') / 'corpus')
  with test_pipeline.TestPipeline() as p:
    pipeline.build_i2e(p, pairs=[os.path.join(root, 'wds', '*.tar'),
                                 os.path.join(root, 'pq', '*.parquet')],
                       out_dir=out, config=config, kb_dir=kb_dir, clip_loader=TinyClipLoader())
  return out


def test_img2dataset_outputs_become_a_corpus_with_their_urls(downloads, corpus):
  _, lists = downloads
  meta, _ = schema.validate_corpus(corpus)
  with open(os.path.join(corpus, 'stats.json')) as f:
    stats = json.load(f)
  # Per run: 2 failed downloads (404, an HTML page), one 1x1 image; nothing malformed. Every
  # flat image has the same pHash, so the second 1x1 leaves at dedup as a near-duplicate of the
  # first, before clean sees its size.
  assert stats['filtered'] == {'download_failed': 4, 'near_duplicate': 1,
                               'image_too_small': 1}, stats['filtered']
  assert stats['dead_letter'] == {} and stats['written'] == 2 * GOOD_PER_RUN
  assert stats['inputs'] == 2 * len(lists['wds']) and meta['kind'] == 'i2e'

  # Keys carry their run's folder: both runs start at 000000000 and none collides. img2dataset
  # numbers keys by row of its URL list, so the key names the URL, caption and colour.
  want = {f'{run}/{i:09d}': row for run, rows in lists.items()
          for i, row in enumerate(rows[:GOOD_PER_RUN])}
  table = metadata.read_table(corpus).to_pylist()
  assert sorted(r['key'] for r in table) == sorted(want)
  by_id = {e.label: e.id for e in ENTITIES}
  for row in table:
    url, caption, _ = want[row['key']]
    assert (row['url'], row['alt_text']) == (url, caption)
    assert row['entity_ids'] == [by_id[caption.split()[2]]] and len(row['scores']) == 1

  records = written_records(corpus, key=str)   # keys as written, with their source id
  for key, (_, _, colour) in want.items():
    image = records[key]['image/encoded'][0]
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert('RGB'), np.float64)
    assert np.abs(pixels.mean(axis=(0, 1)) - colour).max() < 6, key
