r"""Builds a faiss index of an embedded collection, with its recall measured.

  python -m mofi_jax.index --embeddings DIR --out INDEX [--max_memory 4GB] [--factory STR]
      [--metric ip] [--overwrite]

DIR is clip-retrieval's layout (mofi_jax/search_index.py), as `python -m mofi_jax.embed`
writes it. Rows are L2-normalised, so the metric is the inner product (= cosine).

Choosing the index (`choose_factory`; --factory overrides), n rows of dimension d, budget B
(--max_memory), in this order:
  1. `Flat` (exact) when n <= 100,000 and its 4*n*d bytes fit in B/2: brute force over
     100k x 512 is ~10 ms a query on one core, and exact needs no tuning.
  2. `HNSW32` when n <= 2,000,000 and its (4*d + 8*32)*n bytes (vectors plus level-0
     links) fit in 0.8*B: best recall per query time, but no compression and a slow build.
     Else `HNSW32,SQfp16` when its (2*d + 8*32)*n bytes fit: the vectors as float16, which
     is how embed stores them, so nothing is lost (1M x 512 in 1.28 GB).
  3. `IVF{k},Flat` when its (4*d + 8)*n bytes fit in 0.8*B (exact distances, coarse lists).
  4. `IVF{k},PQ{m},Refine(SQ8)`: k = the power of two nearest 4*sqrt(n), at most n/39 (faiss
     wants 39 training points per list); m = the largest divisor of d up to 256 (8-bit
     codes, d/m dimensions per sub-quantizer; past 256 the sub-quantizers' training
     dominates the build) whose (m + d + 8)*n bytes (PQ codes, the refine stage's 8-bit
     scalar-quantised copy of each row, ids) plus 4*k*d for the centroids fit in 0.8*B.
     PQ codes alone cap recall@10 near 0.92 on 100k x 512 whatever nprobe; the refine
     stage re-ranks k_factor times k PQ candidates on the SQ8 rows (d bytes a row).
     `RFlat` (float32 rows, 4*d bytes) is never chosen: wherever it fits, rule 3 does.
     No m fits: an error that says how much memory is needed.
autofaiss (criteo/autofaiss, get_optimal_index_keys_v2) differs: Flat only below 1,000
rows, HNSW up to M=32 whenever it fits (float32 only), IVF-Flat below 1M rows, and OPQ + IVF_HNSW
coarse quantiser + PQ otherwise; its k rule (nearest power of two of 4*sqrt(n)) is ours.

Building: the training sample is min(n, max(64*k, 39*256), 200,000) rows drawn with a fixed
seed, read from the memory-mapped shards; every row is then added shard by shard in chunks
of 65,536, so an IVF build never holds the float32 collection in memory.

Recall: min(1,000, max(1, n/10)) rows drawn with another seed, kept out of the training
sample, are the queries. Their exact top-10 among the other rows (float32 brute force over
the shards; the query's own row excluded from both lists) is compared with the index's;
recall@10 = |approx top-10 & exact top-10| / |exact top-10|, summed over the queries
(fewer than 10 where the collection is that small; null for one row). nprobe (IVF: powers
of two, then every list) or efSearch (HNSW) is raised until recall@10 >= 0.95 or its largest value; with a refine stage
each nprobe is tried with k_factor_rf (the refine's candidate multiplier) in K_FACTORS
before the next; the figure stored is the one at the chosen setting. index_info.json keeps
the factory, search_params, recall@10, build time and the shards' row offsets;
recall_queries.npy the query rows.

INDEX is written to a temporary sibling and renamed when complete; a non-empty INDEX is
refused unless --overwrite, which replaces only an earlier index (mofi_jax/safe_outputs.py).
Bad input exits non-zero with one line naming the file.
"""
import argparse
import json
import math
import os
import re
import shutil
import time

import numpy as np

from mofi_jax import cli_errors, safe_outputs, search_index

TOOL = 'mofi_jax.index'
FLAT_MAX_ROWS = 100_000
HNSW_M, HNSW_MAX_ROWS = 32, 2_000_000
HEADROOM = 0.8
PQ_MAX_M = 256
TRAIN_MAX_ROWS = 200_000
CHUNK_ROWS = 65_536
EXACT_BLOCK = 4_096
RECALL_QUERIES, RECALL_K, RECALL_TARGET = 1000, 10, 0.95
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)
K_FACTORS = (2, 4, 8, 16)
REFINE = 'Refine(SQ8)'
_UNITS = {'': 1, 'B': 1, 'KB': 2**10, 'MB': 2**20, 'GB': 2**30, 'TB': 2**40}


def parse_memory(text):
  """'4GB', '512MB', '1.5G', '1000000' -> bytes (binary units)."""
  m = re.fullmatch(r'\s*([0-9.]+)\s*([KMGT]?B?)\s*', str(text).upper())
  if not m or m.group(1).count('.') > 1:
    raise ValueError(f'--max_memory {text!r}: expected a size such as 4GB or 512MB.')
  unit = m.group(2) if m.group(2).endswith('B') or not m.group(2) else m.group(2) + 'B'
  return int(float(m.group(1)) * _UNITS[unit])


def ivf_lists(n):
  return max(1, min(2 ** round(math.log2(4 * math.sqrt(n))), n // 39))


def choose_factory(n, d, max_bytes):
  """The faiss index_factory string for n rows of dimension d in max_bytes (docstring)."""
  budget = HEADROOM * max_bytes
  if n <= FLAT_MAX_ROWS and 4 * n * d <= max_bytes / 2:
    return 'Flat'
  if n <= HNSW_MAX_ROWS:
    for bytes_per_value, codes in ((4, ''), (2, ',SQfp16')):
      if (bytes_per_value * d + 8 * HNSW_M) * n <= budget:
        return f'HNSW{HNSW_M}{codes}'
  k = ivf_lists(n)
  if (4 * d + 8) * n + 4 * k * d <= budget:
    return f'IVF{k},Flat'
  for m in sorted((m for m in range(1, min(d, PQ_MAX_M) + 1) if d % m == 0), reverse=True):
    if (m + d + 8) * n + 4 * k * d <= budget:   # PQ codes, SQ8 refine codes, ids; centroids
      return f'IVF{k},PQ{m},{REFINE}'
  need = (1 + d + 8) * n + 4 * k * d
  raise ValueError(f'--max_memory {max_bytes} bytes: too small for {n} rows of dimension {d} '
                   f'(the smallest index, IVF{k},PQ1,{REFINE}, needs about '
                   f'{need / HEADROOM:.0f}).')


def read_collection(embeddings_dir):
  """(shards [{embeddings, metadata, rows, start}], n, d): every shard opened and its
  metadata row count checked (embedding values are checked as they are read)."""
  shards, start, dim = [], 0, None
  for emb_path, meta_path in search_index.list_shards(embeddings_dir):
    array = search_index.open_embeddings(emb_path)
    if dim is None:
      dim = array.shape[1]
    if array.shape[1] != dim:
      raise search_index.IndexInputError(f'{emb_path}: rows of dimension {array.shape[1]}, '
                                         f'but shard 0 has {dim}.')
    rows = search_index.metadata_rows(meta_path)
    if rows != len(array):
      raise search_index.IndexInputError(f'{meta_path}: {rows} rows, but {emb_path} has '
                                         f'{len(array)}.')
    shards.append(dict(embeddings=emb_path, metadata=meta_path, rows=len(array), start=start))
    start += len(array)
  if start == 0:
    raise search_index.IndexInputError(f'{embeddings_dir}: the shards hold no rows.')
  return shards, start, dim


def iter_chunks(shards):
  """(first collection row, float32 [c, d]) over the whole collection, checked."""
  for shard in shards:
    array = search_index.open_embeddings(shard['embeddings'])
    for i in range(0, len(array), CHUNK_ROWS):
      yield shard['start'] + i, search_index.checked_chunk(array[i:i + CHUNK_ROWS],
                                                          shard['embeddings'], i)


def gather_rows(shards, rows):
  """float32 [len(rows), d] of the sorted collection rows `rows` (memory-mapped reads)."""
  out = []
  for shard in shards:
    lo, hi = np.searchsorted(rows, [shard['start'], shard['start'] + shard['rows']])
    if hi > lo:
      local = rows[lo:hi] - shard['start']
      array = search_index.open_embeddings(shard['embeddings'])
      out.append(search_index.checked_chunk(array[local], shard['embeddings'], 0))
  return np.concatenate(out)


def sample_rows(n, size, seed, exclude=()):
  rng = np.random.default_rng(seed)
  pool = np.setdiff1d(np.arange(n), exclude) if len(exclude) else np.arange(n)
  return np.sort(rng.choice(pool, min(size, len(pool)), replace=False))


def exact_neighbours(shards, queries, query_rows, k):
  """[Q, <=k] exact top-k rows of each query over the collection, its own row excluded
  (-1 where the collection has fewer than k other rows)."""
  best_s = np.full((len(queries), 0), -np.inf, np.float32)
  best_r = np.zeros((len(queries), 0), np.int64)
  for first, chunk in iter_chunks(shards):
    for i in range(0, len(chunk), EXACT_BLOCK):   # bounds the [Q, block] score matrices
      scores = queries @ chunk[i:i + EXACT_BLOCK].T
      rows = np.arange(first + i, first + i + scores.shape[1])
      scores[query_rows[:, None] == rows[None, :]] = -np.inf
      if scores.shape[1] > k:   # the block's own top-k first: merging stays [Q, 2k]
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, rows = np.take_along_axis(scores, part, 1), rows[part]
      else:
        rows = np.broadcast_to(rows, scores.shape)
      s = np.concatenate([best_s, scores], axis=1)
      r = np.concatenate([best_r, rows], axis=1)
      top = np.argsort(-s, axis=1, kind='stable')[:, :k]
      best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
  return np.where(np.isfinite(best_s), best_r, -1)   # -1: fewer than k other rows


def recall_at_k(index, queries, query_rows, exact, k=RECALL_K):
  """Share of the queries' exact top-k (own row excluded) found in the index's top-k; None
  for a one-row collection (no neighbours to find)."""
  _, found = index.search(queries, k + 1)
  hits = wanted = 0
  for own, approx, truth in zip(query_rows, found, exact):
    approx = [r for r in approx if r != own and r >= 0][:k]
    truth = {r for r in truth[:k].tolist() if r >= 0}
    hits, wanted = hits + len(set(approx) & truth), wanted + len(truth)
  return hits / wanted if wanted else None


def tune(index, factory, queries, query_rows, exact):
  """(search_params string, recall@10): the cheapest setting reaching RECALL_TARGET, else
  the most thorough one tried."""
  import faiss  # pylint: disable=import-outside-toplevel
  if factory.startswith('IVF'):
    nlist = int(re.match(r'IVF(\d+)', factory).group(1))
    probes = [2 ** i for i in range(nlist.bit_length()) if 2 ** i < nlist] + [nlist]
    settings = [f'nprobe={p}' for p in probes]   # powers of two up to every list
    if re.search(r',(Refine\(|RFlat)', factory):   # re-ranking: its candidate multiplier too
      settings = [f'{p},k_factor_rf={f}' for p in settings for f in K_FACTORS]
  elif factory.startswith('HNSW'):
    settings = [f'efSearch={e}' for e in EF_SEARCHES]
  else:
    return '', recall_at_k(index, queries, query_rows, exact)
  space = faiss.ParameterSpace()
  for params in settings:
    space.set_index_parameters(index, params)
    recall = recall_at_k(index, queries, query_rows, exact)
    if recall is None or recall >= RECALL_TARGET:
      break
  return params, recall


def _no_polysemous_training(index):
  """index_factory's PQ trains polysemous codes (100x the training time), which only a
  Hamming-threshold search uses; we never do."""
  import faiss  # pylint: disable=import-outside-toplevel
  try:
    inner = faiss.downcast_index(faiss.extract_index_ivf(index))
  except RuntimeError:   # not an IVF index
    inner = faiss.downcast_index(index)
  if hasattr(inner, 'do_polysemous_training'):
    inner.do_polysemous_training = False


def _presize(index, n):
  """Sizes the code and graph arrays of an index that stores rows (Flat, HNSW) for n rows
  before the chunked adds. Each add grows them as std::vector does, by doubling, and the
  copy holds the old and the new array at once: 1.5x the codes at the peak (0.5 GB more
  for HNSW32,SQfp16 at 1M x 512). resize(n) then resize(0) keeps the capacity."""
  import faiss  # pylint: disable=import-outside-toplevel
  inner = faiss.downcast_index(index)
  storage = faiss.downcast_index(inner.storage) if hasattr(inner, 'storage') else inner
  if isinstance(getattr(storage, 'code_size', None), int) and hasattr(storage, 'codes'):
    storage.codes.resize(n * storage.code_size)
    storage.codes.resize(0)
  if hasattr(inner, 'hnsw'):   # level 0 holds 2M links a row, the levels above ~M/(M-1)
    links = n * (2 * inner.hnsw.nb_neighbors(1) + 2)
    inner.hnsw.neighbors.resize(links)
    inner.hnsw.neighbors.resize(0)


def build(embeddings_dir, tmp, max_bytes, factory=None, seed=0):
  """Writes the index folder's files into `tmp`; returns index_info."""
  import faiss  # pylint: disable=import-outside-toplevel
  started = time.time()
  shards, n, d = read_collection(embeddings_dir)
  factory = factory or choose_factory(n, d, max_bytes)
  try:
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
  except RuntimeError as e:
    raise ValueError(f'--factory {factory!r}: faiss cannot build it for dimension {d} '
                     f'({str(e).strip().splitlines()[-1][:200]}).') from e
  _no_polysemous_training(index)
  query_rows = sample_rows(n, min(RECALL_QUERIES, max(1, n // 10)), seed + 1)
  if not index.is_trained:
    k = ivf_lists(n) if not factory.startswith('IVF') else int(
        re.match(r'IVF(\d+)', factory).group(1))
    train_rows = sample_rows(n, min(max(64 * k, 39 * 256), TRAIN_MAX_ROWS), seed, query_rows)
    try:
      index.train(gather_rows(shards, train_rows))
    except RuntimeError as e:   # faiss: e.g. fewer training rows than centroids
      raise ValueError(f'{factory}: cannot train on {len(train_rows)} of {n} rows '
                       f'({str(e).strip().splitlines()[-1][:200]}).') from e
  _presize(index, n)
  for _, chunk in iter_chunks(shards):
    index.add(chunk)
  queries = gather_rows(shards, query_rows)
  exact = exact_neighbours(shards, queries, query_rows, RECALL_K)
  params, recall = tune(index, factory, queries, query_rows, exact)
  faiss.write_index(index, os.path.join(tmp, search_index.INDEX_FILE))
  np.save(os.path.join(tmp, search_index.QUERIES_FILE), query_rows)
  os.makedirs(os.path.join(tmp, search_index.META_DIR))
  for i, shard in enumerate(shards):
    shutil.copyfile(shard['metadata'], os.path.join(tmp, search_index.META_DIR,
                                                   search_index.meta_name(i)))
  info = dict(factory=factory, metric='ip', rows=n, dim=d, search_params=params,
              recall_at_10=recall, recall_queries=len(query_rows),
              recall_definition='|index top-10 & exact top-10| / |exact top-10| summed over rows of '
                                'the collection (recall_queries.npy), own row excluded',
              build_seconds=round(time.time() - started, 3), max_memory_bytes=max_bytes,
              embeddings=os.path.abspath(embeddings_dir), faiss_version=faiss.__version__,
              shards=[dict(embeddings=s['embeddings'], rows=s['rows'], start=s['start'])
                      for s in shards])
  with open(os.path.join(tmp, search_index.INFO_FILE), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=2, sort_keys=True)
  return info


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m mofi_jax.index')
  parser.add_argument('--embeddings', required=True, help='img_emb/ + metadata/ folder')
  parser.add_argument('--out', required=True, help='index folder to write')
  parser.add_argument('--max_memory', default='4GB', help='memory budget of the index')
  parser.add_argument('--factory', help='faiss index_factory string (default: chosen by size)')
  parser.add_argument('--metric', default='ip', choices=('ip',),
                      help='inner product: rows are L2-normalised, so the cosine')
  parser.add_argument('--overwrite', action='store_true', help='replace an earlier index')
  return parser.parse_args(argv)


def run(args):
  max_bytes = parse_memory(args.max_memory)
  with safe_outputs.staged_output(args.out, TOOL, args.overwrite,
                                  inputs=[('--embeddings', args.embeddings)]) as tmp:
    info = build(args.embeddings, tmp, max_bytes, args.factory)
  print(json.dumps({k: v for k, v in info.items() if k != 'shards'}, sort_keys=True))
  return info


def main(argv=None):
  return cli_errors.run_command(TOOL, parse_args, run, argv)

if __name__ == '__main__':
  main()
