"""`python -m mofi_jax.search` on a tiny random multitask model: an index of the tiny
corpus's held-out images, embedded here with inference.Encoder; every query's results equal
NumPy dot products of Encoder embeddings computed in the test."""
import glob
import json
import os
import shutil

import numpy as np
import pytest

from mofi_jax import index as index_cli
from mofi_jax import inference, search
from mofi_jax.data import pipeline
from test_evaluate import encoder, loaded_once, tiny_run  # pylint: disable=unused-import  # fixtures
from test_embed import png_header_bomb
from test_index import exit_message, write_collection

pytest.importorskip('faiss')
K = 5


@pytest.fixture(scope='module')
def collection(tiny_corpus, encoder, tmp_path_factory):
  """(index folder, image paths, float64 embeddings): the held-out images, in two shards,
  float32 (so that the index holds exactly what NumPy multiplies)."""
  paths = sorted(glob.glob(os.path.join(tiny_corpus, 'retrieval', '*.jpg')))
  images = [open(p, 'rb').read() for p in paths]  # pylint: disable=consider-using-with
  vectors = encoder.embed_images(encoder.preprocess(images))
  root = tmp_path_factory.mktemp('search_index')
  emb = str(root / 'emb')
  half = len(paths) // 2
  write_collection(emb, [half, len(paths) - half], vectors.shape[1], dtype=np.float32,
                   vectors=vectors)
  # The metadata names the real files (write_collection's are placeholders).
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  for i, part in enumerate([paths[:half], paths[half:]]):
    pq.write_table(pa.table({'image_path': part, 'caption': [os.path.basename(p) for p in part]}),
                   os.path.join(emb, 'metadata', f'metadata_{i}.parquet'))
  out = str(root / 'index')
  index_cli.main(['--embeddings', emb, '--out', out])
  return out, paths, vectors.astype(np.float64)


def run_search(capsys, *argv):
  search.main(list(argv))
  return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def expected(vectors, query, k=K):
  scores = vectors @ np.asarray(query, np.float64)
  order = np.argsort(-scores, kind='stable')[:k]
  return order.tolist(), scores[order]


def check_hits(hits, vectors, query, paths):
  rows, scores = expected(vectors, query)
  assert [h['row'] for h in hits] == rows
  assert [h['rank'] for h in hits] == list(range(1, K + 1))
  np.testing.assert_allclose([h['score'] for h in hits], scores, atol=1e-5)
  assert [h['image_path'] for h in hits] == [paths[r] for r in rows]


def test_image_query(collection, encoder, tiny_run, loaded_once, capsys):
  out, paths, vectors = collection
  hits = run_search(capsys, '--index', out, '--workdir', tiny_run, '--image', paths[7],
                    '--k', str(K))
  with open(paths[7], 'rb') as f:
    query = encoder.embed_images(encoder.preprocess([f.read()]))[0]
  check_hits(hits, vectors, query, paths)
  assert hits[0]['row'] == 7 and hits[0]['caption'] == os.path.basename(paths[7])


def test_text_query(collection, encoder, tiny_run, loaded_once, capsys):
  out, paths, vectors = collection
  hits = run_search(capsys, '--index', out, '--workdir', tiny_run, '--text',
                    'a cyan circle on a gradient background', '--k', str(K))
  query = encoder.embed_texts(['a cyan circle on a gradient background'])[0]
  check_hits(hits, vectors, query, paths)


def test_entity_query_uses_the_heads_class_vector(collection, encoder, tiny_run, loaded_once,
                                                  capsys):
  out, paths, vectors = collection
  qid = encoder.entities.ids[3]
  hits = run_search(capsys, '--index', out, '--workdir', tiny_run, '--entity', qid,
                    '--k', str(K))
  kernel = np.asarray(encoder.params['entity_head']['kernel'], np.float64)[:, 3]
  check_hits(hits, vectors, kernel / np.linalg.norm(kernel), paths)


class _NoHead:
  """The encoder as a model without an entity head (a CLIP) would be."""
  has_head = False

  def __init__(self, encoder):
    self._encoder = encoder

  def __getattr__(self, name):
    return getattr(self._encoder, name)


def test_entity_query_without_head_embeds_name_and_description(collection, encoder, tiny_run,
                                                               monkeypatch, capsys):
  out, paths, vectors = collection
  monkeypatch.setattr(inference, 'load', lambda workdir, step=None: _NoHead(encoder))
  table = encoder.entities
  hits = run_search(capsys, '--index', out, '--workdir', tiny_run, '--entity', table.ids[5],
                    '--k', str(K))
  text = pipeline.DEFAULT_ENTITY_TEMPLATE.format(name=table.names[5],
                                                 description=table.descriptions[5])
  check_hits(hits, vectors, encoder.embed_texts([text])[0], paths)


def test_folder_gives_near_duplicates_above_threshold(collection, encoder, tiny_run, loaded_once,
                                                      tmp_path, capsys):
  out, paths, vectors = collection
  folder = tmp_path / 'queries'
  (folder / 'sub').mkdir(parents=True)
  shutil.copy(paths[2], folder / 'a.jpg')
  shutil.copy(paths[11], folder / 'sub' / 'b.png')
  (folder / 'broken.jpg').write_bytes(b'<html>not an image</html>')
  (folder / 'bomb.png').write_bytes(png_header_bomb(30000, 30000))
  search.main(['--index', out, '--workdir', tiny_run, '--image', str(folder),
               '--threshold', '0.95', '--k', '50'])
  printed = capsys.readouterr()
  lines = [json.loads(line) for line in printed.out.splitlines()]
  assert f'skipped: {folder / "bomb.png"}: image_too_large' in printed.err
  assert f'skipped: {folder / "broken.jpg"}: unreadable_image' in printed.err
  by_query = {}
  for line in lines:
    by_query.setdefault(line['query'], []).append(line)
  assert sorted(by_query) == [str(folder / 'a.jpg'), str(folder / 'sub' / 'b.png')]
  for name, source in ((folder / 'a.jpg', 2), (folder / 'sub' / 'b.png', 11)):
    scores = vectors @ vectors[source]
    want = [int(r) for r in np.argsort(-scores, kind='stable') if scores[r] >= 0.95][:50]
    assert [h['row'] for h in by_query[str(name)]] == want and source in want


def cli_error(capsys, *argv):
  message = exit_message(search.main, 'mofi_jax.search', argv)
  assert capsys.readouterr().out == ''
  return message


def test_bad_queries_give_one_line_errors(collection, tiny_run, loaded_once, tmp_path, capsys):
  out, _, _ = collection
  model = ['--index', out, '--workdir', tiny_run]
  assert 'Q999999999: not in the model\'s entity table' in cli_error(
      capsys, *model, '--entity', 'Q999999999')
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'GIF89a not really')
  assert f'--image {broken}: cannot embed it (unreadable_image)' in cli_error(
      capsys, *model, '--image', str(broken))
  bomb = tmp_path / 'bomb.png'   # read as embed reads: header checks before any decoding
  bomb.write_bytes(png_header_bomb(30000, 30000))
  assert f'--image {bomb}: cannot embed it (image_too_large)' in cli_error(
      capsys, *model, '--image', str(bomb))
  assert 'no such file' in cli_error(capsys, *model, '--image', str(tmp_path / 'none.jpg'))
  assert '--k 0' in cli_error(capsys, *model, '--text', 'x', '--k', '0')
  assert 'not an index folder' in cli_error(capsys, '--index', str(tmp_path), '--workdir',
                                            tiny_run, '--text', 'x')


def test_embed_then_index_then_search(tiny_corpus, tiny_run, loaded_once, tmp_path, capsys):
  """The layout python -m mofi_jax.embed writes (float16, 4 shards, its stats.json) is what
  index reads: every held-out image finds itself first, named by its own metadata."""
  from mofi_jax import embed  # pylint: disable=import-outside-toplevel
  photos = os.path.join(tiny_corpus, 'retrieval')
  emb, out = str(tmp_path / 'emb'), str(tmp_path / 'index')
  embed.main(['--workdir', tiny_run, '--images', photos, '--out', emb, '--shard_size', '16',
              '--batch_size', '16'])
  info = index_cli.main(['--embeddings', emb, '--out', out])
  assert info['rows'] == 50 and [s['rows'] for s in info['shards']] == [16, 16, 16, 2]
  capsys.readouterr()
  lines = run_search(capsys, '--index', out, '--workdir', tiny_run, '--image', photos,
                     '--threshold', '0.99', '--k', '3')
  firsts = {line['query']: line for line in lines if line['rank'] == 1}
  paths = sorted(glob.glob(os.path.join(photos, '*.jpg')))
  assert sorted(firsts) == paths
  for path, hit in firsts.items():
    assert hit['image_path'] == path and hit['score'] == pytest.approx(1, abs=3e-3)
    assert hit['key'] == os.path.basename(path)
