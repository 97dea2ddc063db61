"""An embedded collection and its faiss index: read, validate, query, fetch metadata.

Shared by `python -m mofi_jax.index` (builds), `python -m mofi_jax.search` (queries) and
any server that answers queries: nothing here loads a model.

Embeddings folder (clip-retrieval's layout, written by `python -m mofi_jax.embed`):
  img_emb/img_emb_{i}.npy           float16/float32 [n_i, D], L2-normalised rows
  metadata/metadata_{i}.parquet     n_i rows, same order
Shards are numbered 0..S-1 with no gap; row r of the collection is row r - start_i of shard
i, where start_i is the sum of the earlier shards' sizes (the row-offset table).

Index folder (written by `index`):
  index.faiss                       faiss index; its ids are collection rows
  index_info.json                   factory, search parameters, recall@10, build time, and
                                    the shards with their row offsets
  metadata/metadata_{i}.parquet     copies of the collection's metadata shards
  recall_queries.npy                the collection rows used as recall queries (int64)
A row's metadata is read from its shard's Parquet row group alone (pyarrow), never the
whole table.
"""
import bisect
import collections
import functools
import json
import os
import re
import threading

import numpy as np

EMB_DIR, EMB_PATTERN = 'img_emb', re.compile(r'^img_emb_(\d+)\.npy$')
META_DIR, META_PATTERN = 'metadata', re.compile(r'^metadata_(\d+)\.parquet$')
INDEX_FILE = 'index.faiss'
INFO_FILE = 'index_info.json'
QUERIES_FILE = 'recall_queries.npy'
STATS_FILE = 'stats.json'   # python -m mofi_jax.embed's counts, with 'complete'
# float16 rounding leaves norms within ~1e-3 of 1; anything further is not normalised.
NORM_TOLERANCE = 1e-2
GROUP_CACHE = 16   # metadata row groups kept decoded (RowTable)


class IndexInputError(ValueError):
  """An embeddings or index folder that cannot be used as asked (names the file)."""


def meta_name(i):
  return f'metadata_{i}.parquet'


def _numbered(folder, pattern):
  if not os.path.isdir(folder):
    return {}
  found = {}
  for name in os.listdir(folder):
    m = pattern.match(name)
    if m:
      found[int(m.group(1))] = os.path.join(folder, name)
  return found


def _check_complete(embeddings_dir):
  """An embed run still in progress (its stats.json says so) would be indexed in part."""
  path = os.path.join(embeddings_dir, STATS_FILE)
  if not os.path.isfile(path):
    return   # written by another tool (clip-retrieval): the shards alone say what is there
  try:
    with open(path, encoding='utf-8') as f:
      stats = json.load(f)
  except (OSError, ValueError) as e:
    raise IndexInputError(f'{path}: not readable JSON ({e}).') from e
  if isinstance(stats, dict) and stats.get('complete') is False:
    raise IndexInputError(f'{path}: the embedding run is not complete ({stats.get("shards_done")}'
                          f' of {stats.get("num_shards")} shards done); finish it first.')


def list_shards(embeddings_dir):
  """[(embedding .npy path, metadata .parquet path)] in shard order; checks that shards
  0..S-1 are all there, each with its metadata."""
  _check_complete(embeddings_dir)
  embs = _numbered(os.path.join(embeddings_dir, EMB_DIR), EMB_PATTERN)
  metas = _numbered(os.path.join(embeddings_dir, META_DIR), META_PATTERN)
  if not embs:
    raise IndexInputError(f'{os.path.join(embeddings_dir, EMB_DIR)}: no img_emb_{{i}}.npy '
                          'shards found (expected the layout of python -m mofi_jax.embed).')
  for i in range(max(embs) + 1):
    if i not in embs:
      raise IndexInputError(f'{os.path.join(embeddings_dir, EMB_DIR, f"img_emb_{i}.npy")}: '
                            f'missing; shards must be numbered 0..{max(embs)} with no gap.')
    if i not in metas:
      raise IndexInputError(f'{os.path.join(embeddings_dir, META_DIR, meta_name(i))}: '
                            f'missing (shard {i} has embeddings but no metadata).')
  extra = sorted(set(metas) - set(embs))
  if extra:
    raise IndexInputError(f'{metas[extra[0]]}: metadata shard without embeddings '
                          f'(img_emb_{extra[0]}.npy).')
  return [(embs[i], metas[i]) for i in sorted(embs)]


def open_embeddings(path):
  """The shard's [n, D] array, memory-mapped (float16 or float32)."""
  try:
    array = np.load(path, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError) as e:
    raise IndexInputError(f'{path}: not a readable .npy array ({e}).') from e
  if array.ndim != 2 or array.dtype not in (np.float16, np.float32):
    raise IndexInputError(f'{path}: expected a 2-D float16/float32 array, got '
                          f'{array.dtype} {tuple(array.shape)}.')
  return array


def metadata_rows(path):
  """The number of rows of a Parquet file, from its footer."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    return pq.ParquetFile(path).metadata.num_rows
  except (OSError, ValueError) as e:
    raise IndexInputError(f'{path}: not a readable Parquet file ({e}).') from e


def checked_chunk(chunk, path, first_row):
  """float32 copy of `chunk` (rows first_row.. of shard `path`); refuses non-finite or
  non-normalised rows, naming the file and row."""
  x = np.asarray(chunk, np.float32)
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise IndexInputError(f'{path}: row {first_row + int(np.argmax(bad))} has NaN or '
                          'infinite values.')
  norms = np.linalg.norm(x, axis=1)
  off = np.abs(norms - 1) > NORM_TOLERANCE
  if off.any():
    r = int(np.argmax(off))
    raise IndexInputError(f'{path}: row {first_row + r} has norm {norms[r]:.4f}; rows must '
                          'be L2-normalised (inner product is the cosine).')
  return x


class RowTable:
  """Collection row -> (shard, row in shard) -> metadata, through the row-offset table."""

  def __init__(self, meta_paths, starts):
    self.meta_paths = list(meta_paths)
    self.starts = list(starts)   # len(shards) + 1: starts[-1] is the total
    self._files = {}
    self._groups = collections.OrderedDict()   # (shard, group) -> Arrow table, the last few
    self._lock = threading.Lock()

  def __len__(self):
    return self.starts[-1]

  def locate(self, row):
    if not 0 <= row < len(self):
      raise IndexError(f'row {row} outside 0..{len(self) - 1}')
    shard = bisect.bisect_right(self.starts, row) - 1
    return shard, row - self.starts[shard]

  def _group_starts(self, shard):
    """Row offsets of the shard's row groups (its footer read once; no file kept open)."""
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    if shard not in self._files:
      meta = pq.read_metadata(self.meta_paths[shard])
      self._files[shard] = np.cumsum([0] + [meta.row_group(g).num_rows
                                            for g in range(meta.num_row_groups)])
    return self._files[shard]

  def metadata(self, row):
    """The metadata row (a dict) of collection row `row`; reads one row group."""
    shard, local = self.locate(row)
    group_starts = self._group_starts(shard)
    group = int(np.searchsorted(group_starts, local, side='right')) - 1
    table = self._group(shard, group)
    return _plain(table.slice(local - int(group_starts[group]), 1).to_pylist()[0])

  def _group(self, shard, group):
    """One row group as an Arrow table, read once while it stays among the last GROUP_CACHE
    read: a server's queries keep hitting the same shards, and reading a group decodes
    all of it (columnar, so a cached group costs its column bytes, not Python objects)."""
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    key = (shard, group)
    with self._lock:
      table = self._groups.get(key)
      if table is not None:
        self._groups.move_to_end(key)
        return table
    table = pq.ParquetFile(self.meta_paths[shard]).read_row_group(group)
    with self._lock:
      self._groups[key] = table
      while len(self._groups) > GROUP_CACHE:
        self._groups.popitem(last=False)
    return table


def _plain(row):
  """JSON-ready values (bytes become text where they decode)."""
  out = {}
  for key, value in row.items():
    if isinstance(value, bytes):
      value = value.decode('utf-8', 'replace')
    out[key] = value
  return out


class SearchIndex:
  """An index folder, loaded: `search(vectors, k)` -> per query, a list of hits."""

  def __init__(self, folder):
    import faiss  # pylint: disable=import-outside-toplevel
    self.folder = folder
    info_path = os.path.join(folder, INFO_FILE)
    try:
      with open(info_path, encoding='utf-8') as f:
        self.info = json.load(f)
      self.index = faiss.read_index(os.path.join(folder, INDEX_FILE))
    except (OSError, ValueError, RuntimeError) as e:
      raise IndexInputError(f'{folder}: not an index folder of python -m mofi_jax.index '
                            f'({type(e).__name__}: {str(e).splitlines()[0][:200]}).') from e
    if self.info.get('search_params'):
      faiss.ParameterSpace().set_index_parameters(self.index, self.info['search_params'])
    shards = self.info['shards']
    self.rows = RowTable([os.path.join(folder, META_DIR, meta_name(i))
                          for i in range(len(shards))],
                         [s['start'] for s in shards] + [self.info['rows']])

  @property
  def dim(self):
    return self.index.d

  def raw_search(self, vectors, k):
    """(scores [Q, k], rows [Q, k]) as faiss returns them (-1 rows where fewer found)."""
    x = np.ascontiguousarray(np.asarray(vectors, np.float32).reshape(-1, self.dim))
    return self.index.search(x, int(k))

  def search(self, vectors, k=10, threshold=None):
    """Per query row of `vectors`: [{rank, score, row, **metadata}], best first; only
    scores >= threshold when one is given."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != self.dim:
      raise IndexInputError(f'{self.folder}: queries of shape {vectors.shape}, but the index '
                            f'holds {self.dim}-d vectors (another model built it?).')
    scores, rows = self.raw_search(vectors, k)
    results = []
    for q_scores, q_rows in zip(scores, rows):
      hits = []
      for score, row in zip(q_scores, q_rows):
        if row < 0 or (threshold is not None and score < threshold):
          continue
        hits.append(dict(self.rows.metadata(int(row)), rank=len(hits) + 1,
                         score=float(score), row=int(row)))
      results.append(hits)
    return results


@functools.lru_cache(maxsize=4)
def load(folder):
  """SearchIndex of `folder`, cached (a server loads it once)."""
  return SearchIndex(os.path.abspath(folder))
