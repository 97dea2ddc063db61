"""`python -m mofi_jax.index` and mofi_jax/search_index.py: a Flat index equals float64 brute
force, approximate indexes reach their stored recall (recomputed here with NumPy), the
factory rules, the row -> metadata table across shards, and one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mofi_jax import index as index_cli
from mofi_jax import search_index

pytest.importorskip('faiss')


def write_collection(folder, sizes, d, seed=0, dtype=np.float16, vectors=None):
  """clip-retrieval's layout: random unit rows (or `vectors`), metadata with small row
  groups (so that lookups cross them). Returns the float64 [n, d] rows as stored."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, 'img_emb'), exist_ok=True)
  os.makedirs(os.path.join(folder, 'metadata'), exist_ok=True)
  if vectors is None:
    vectors = rng.normal(size=(sum(sizes), d))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  start, stored = 0, []
  for i, n in enumerate(sizes):
    part = np.asarray(vectors[start:start + n]).astype(dtype)
    np.save(os.path.join(folder, 'img_emb', f'img_emb_{i}.npy'), part)
    stored.append(part.astype(np.float64))
    rows = range(start, start + n)
    pq.write_table(pa.table({'image_path': [f'/photos/{r:05d}.jpg' for r in rows],
                             'url': [f'https://example.com/{r}' for r in rows],
                             'caption': [f'caption of {r}' for r in rows]}),
                   os.path.join(folder, 'metadata', f'metadata_{i}.parquet'), row_group_size=64)
    start += n
  return np.concatenate(stored)


def build(tmp_path, sizes, d, *flags, seed=0):
  emb = str(tmp_path / 'emb')
  vectors = write_collection(emb, sizes, d, seed)
  out = str(tmp_path / 'index')
  info = index_cli.main(['--embeddings', emb, '--out', out, *flags])
  return vectors, out, info


def exact_top(vectors, queries, k):
  scores = np.asarray(queries, np.float64) @ vectors.T
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return order, np.take_along_axis(scores, order, 1)


# ----------------------------------------------------------------------------------------
# Factory rules (a pure function).

@pytest.mark.parametrize('n, d, budget, expected', [
    (1_000, 512, '4GB', 'Flat'),
    (100_000, 512, '4GB', 'Flat'),                   # 205 MB <= 2 GB
    (100_001, 512, '4GB', 'HNSW32'),                 # past the exact-search row limit
    (50_000, 512, '150MB', 'HNSW32'),                # Flat's 102 MB > 75 MB; HNSW 115 MB fits
    (1_000_000, 512, '4GB', 'HNSW32'),               # 2.3 GB <= 3.2 GB
    (1_000_000, 512, '2GB', 'HNSW32,SQfp16'),        # 1.28 GB <= 1.72 GB; HNSW32's 2.3 GB is not
    (1_000_000, 512, '1.4GB', 'IVF4096,PQ256,Refine(SQ8)'),   # HNSW-fp16's 1.28 GB > 1.2 GB;
                                                     # 776 MB of PQ + SQ8 codes and ids fit
    (3_000_000, 512, '8GB', 'IVF8192,Flat'),         # HNSW past its row limit; 6.19 GB <= 6.87
    (3_000_000, 512, '4GB', 'IVF8192,PQ256,Refine(SQ8)'),   # HNSW past its row limit; 2.3 GB
    (100_000_000, 512, '64GB', 'IVF32768,PQ16,Refine(SQ8)'),  # 54.4 GB; PQ32's 56 GB > 55 GB
    (1_000_000_000, 512, '1TB', 'IVF131072,PQ256,Refine(SQ8)'),  # 776 GB
    (4_000, 32, '400KB', 'IVF102,PQ32,Refine(SQ8)'),        # k capped at n / 39; 301 KB
    (4_000, 32, '300KB', 'IVF102,PQ16,Refine(SQ8)'),        # PQ32's 301 KB > 246 KB
])
def test_choose_factory(n, d, budget, expected):
  assert index_cli.choose_factory(n, d, index_cli.parse_memory(budget)) == expected


@pytest.mark.parametrize('n, budget', [(1_000_000, '1MB'),
                                       (1_000_000_000, '64GB')])   # SQ8 refine codes: 512 GB
def test_choose_factory_refuses_a_budget_too_small(n, budget):
  with pytest.raises(ValueError, match='too small'):
    index_cli.choose_factory(n, 512, index_cli.parse_memory(budget))


@pytest.mark.parametrize('text, value', [('4GB', 4 << 30), ('512MB', 512 << 20), ('1.5G', 3 << 29),
                                         ('1000', 1000), ('300kb', 300 << 10)])
def test_parse_memory(text, value):
  assert index_cli.parse_memory(text) == value


# ----------------------------------------------------------------------------------------
# Exact and approximate indexes against NumPy.


def test_flat_equals_float64_brute_force(tmp_path):
  vectors, out, info = build(tmp_path, [300, 500, 200], 24)
  assert info['factory'] == 'Flat' and info['recall_at_10'] == 1.0
  rng = np.random.default_rng(7)
  queries = rng.normal(size=(20, 24))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  scores, rows = search_index.SearchIndex(out).raw_search(queries, 10)
  want_rows, want_scores = exact_top(vectors, queries.astype(np.float32), 10)
  np.testing.assert_array_equal(rows, want_rows)
  np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize('n, recall', [(1, None), (5, 1.0)])
def test_tiny_collections_recall(tmp_path, n, recall):
  """Fewer than 10 other rows: recall counts the neighbours there are."""
  _, _, info = build(tmp_path, [n], 8)
  assert info['recall_at_10'] == recall and info['recall_queries'] == 1


def recomputed_recall(vectors, out, k=10):
  """recall@10 of the index at its stored settings, with the exact neighbours from float64
  NumPy over all rows (the query's own row excluded)."""
  idx = search_index.SearchIndex(out)
  query_rows = np.load(os.path.join(out, search_index.QUERIES_FILE))
  queries = vectors[query_rows]
  scores = queries @ vectors.T
  scores[np.arange(len(query_rows)), query_rows] = -np.inf
  exact = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  _, found = idx.raw_search(queries, k + 1)
  hits = [len(set([r for r in f if r != q][:k]) & set(e)) for q, f, e in
          zip(query_rows, found, exact)]
  return sum(hits) / (k * len(query_rows)), idx.info


@pytest.mark.parametrize('flags, kind, params', [
    (['--max_memory', '400KB'], 'IVF102,PQ32,Refine(SQ8)', ('nprobe', 'k_factor_rf')),
    (['--factory', 'IVF102,PQ32'], 'IVF102,PQ32', ('nprobe',)),   # no re-ranking stage
    (['--factory', 'HNSW32'], 'HNSW32', ('efSearch',)),
    (['--factory', 'HNSW32,SQfp16'], 'HNSW32,SQfp16', ('efSearch',))])
def test_approximate_index_recall_matches_stored_figure(tmp_path, flags, kind, params):
  vectors, out, info = build(tmp_path, [1500, 2000, 500], 32, *flags)
  assert info['factory'] == kind
  recall, stored = recomputed_recall(vectors, out)
  assert stored['recall_at_10'] == info['recall_at_10']
  assert recall == pytest.approx(stored['recall_at_10'], abs=2e-3)   # float32 vs float64 ties
  assert stored['recall_queries'] == 400
  assert recall >= (0.9 if kind == 'IVF102,PQ32' else 0.95)
  assert tuple(p.split('=')[0] for p in stored['search_params'].split(',')) == params
  assert stored['build_seconds'] > 0


def test_metadata_of_rows_across_shards(tmp_path):
  vectors, out, _ = build(tmp_path, [150, 1, 300, 90], 8)
  table = pa.concat_tables([pq.read_table(str(tmp_path / 'emb' / 'metadata' / f'metadata_{i}.parquet'))
                            for i in range(4)]).to_pylist()
  idx = search_index.SearchIndex(out)
  for row in [0, 63, 64, 149, 150, 151, 214, 450, len(table) - 1]:
    assert idx.rows.metadata(row) == table[row]
  hits = idx.search(vectors[[151, 500]].astype(np.float32), k=3)
  assert [h[0]['row'] for h in hits] == [151, 500]
  for query_hits in hits:
    for hit in query_hits:
      assert {k: hit[k] for k in ('image_path', 'url', 'caption')} == table[hit['row']]
  assert [h['rank'] for h in hits[0]] == [1, 2, 3]
  above = idx.search(vectors[[151]].astype(np.float32), k=10, threshold=0.99)[0]
  assert [h['row'] for h in above] == [151]


# ----------------------------------------------------------------------------------------
# Bad inputs: one line, non-zero exit, nothing written.


def exit_message(main, prog, argv):
  """The one line a command's main(argv) exits with (non-zero), checked to be one line."""
  with pytest.raises(SystemExit) as exit_info:
    main(list(argv))
  message = str(exit_info.value.code)
  assert message.startswith(f'{prog}: error:') and '\n' not in message, message
  return message


def index_error(*argv):
  return exit_message(index_cli.main, 'mofi_jax.index', argv)


def test_bad_embeddings_give_one_line_errors(tmp_path):
  emb = str(tmp_path / 'emb')
  write_collection(emb, [50, 50, 50], 8)
  out = str(tmp_path / 'out')
  run = lambda: index_error('--embeddings', emb, '--out', out)

  os.rename(f'{emb}/img_emb/img_emb_1.npy', f'{emb}/img_emb_1.npy')
  assert 'img_emb_1.npy: missing' in run()
  np.save(f'{emb}/img_emb/img_emb_1.npy', np.ones((50, 9), np.float16) / 3)
  assert 'img_emb_1.npy: rows of dimension 9, but shard 0 has 8' in run()
  np.save(f'{emb}/img_emb/img_emb_1.npy', (np.ones((49, 8)) / np.sqrt(8)).astype(np.float16))
  assert 'metadata_1.parquet: 50 rows, but' in run()
  bad = np.load(f'{emb}/img_emb_1.npy')
  bad[7, 3] = np.nan
  np.save(f'{emb}/img_emb/img_emb_1.npy', bad)
  assert 'img_emb_1.npy: row 7 has NaN' in run()
  np.save(f'{emb}/img_emb/img_emb_1.npy', np.ones((50, 8), np.float32))
  assert 'row 0 has norm 2.8284' in run()
  os.rename(f'{emb}/img_emb_1.npy', f'{emb}/img_emb/img_emb_1.npy')
  os.remove(f'{emb}/metadata/metadata_2.parquet')
  assert 'metadata_2.parquet: missing' in run()
  assert not os.path.exists(out) and os.listdir(tmp_path) == ['emb']
  assert 'no img_emb_{i}.npy shards' in index_error('--embeddings', str(tmp_path / 'none'),
                                                     '--out', out)
  assert 'max_memory' in index_error('--embeddings', emb, '--out', out, '--max_memory', 'lots')
  with open(f'{emb}/stats.json', 'w', encoding='utf-8') as f:   # an embed run still going
    json.dump(dict(complete=False, shards_done=2, num_shards=3), f)
  assert 'stats.json: the embedding run is not complete (2 of 3 shards done)' in run()


def test_out_is_replaced_only_when_it_is_an_index(tmp_path):
  _, out, _ = build(tmp_path, [40], 8)
  emb = str(tmp_path / 'emb')
  assert 'not empty' in index_error('--embeddings', emb, '--out', out)
  info = index_cli.main(['--embeddings', emb, '--out', out, '--overwrite'])   # our own
  assert info['rows'] == 40
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'keep.txt').write_text('mine')
  assert 'replaces only an earlier output of mofi_jax.index' in index_error(
      '--embeddings', emb, '--out', str(other), '--overwrite')
  assert (other / 'keep.txt').read_text() == 'mine'
  assert 'same folder as --embeddings' in index_error('--embeddings', emb, '--out', emb)


def test_command_line_exit_status(tmp_path):
  """The module as a user runs it: JSON on success; one line and status 1 on bad input."""
  emb = str(tmp_path / 'emb')
  write_collection(emb, [30], 8)
  ok = subprocess.run([sys.executable, '-m', 'mofi_jax.index', '--embeddings', emb, '--out',
                       str(tmp_path / 'i')], capture_output=True, text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)['factory'] == 'Flat'
  bad = subprocess.run([sys.executable, '-m', 'mofi_jax.index', '--embeddings',
                        str(tmp_path / 'nothing'), '--out', str(tmp_path / 'j')],
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 1 and bad.stderr.count('\n') == 1, bad.stderr
