"""The output folder of `python -m mofi_jax.embed`: clip-retrieval's layout, written shard by
shard so that a killed run loses at most the shards in flight.

  img_emb/img_emb_{i}.npy          float16 [n_i, D], L2-normalised rows
  text_emb/text_emb_{i}.npy        float16 [n_i, D] of the captions (--captions)
  metadata/metadata_{i}.parquet    n_i rows, same order: METADATA_COLUMNS
  done/shard_{i}.json              written last: the shard's counts (seen, embedded, skipped)
  embed_info.json                  model, input, shard size, preprocessing: what was asked
  stats.json                       the done shards' counts summed
  .mofi_jax-output.json            safe_outputs' marker: this folder is ours

A shard's files are written under .tmp/ and renamed into place, its done marker last; a
shard without one is written again from the start, so the files of an interrupted and
resumed run are byte for byte those of an uninterrupted one.
"""
import io
import json
import os

import numpy as np

from mofi_jax import safe_outputs

TOOL = 'mofi_jax.embed'
INFO_FILE, STATS_FILE = 'embed_info.json', 'stats.json'
METADATA_COLUMNS = ('image_path', 'key', 'url', 'caption', 'width', 'height')
_TMP, _DONE = '.tmp', 'done'


class MismatchError(ValueError):
  """--out holds an embedding run with other arguments."""


def emb_path(out, kind, shard):
  return os.path.join(out, kind, f'{kind}_{shard}.npy')


def metadata_path(out, shard):
  return os.path.join(out, 'metadata', f'metadata_{shard}.parquet')


def done_path(out, shard):
  return os.path.join(out, _DONE, f'shard_{shard}.json')


def _write_atomic(out, path, data, tmp_name):
  """Writes `data` under <out>/.tmp/ and renames it to `path` (same file system)."""
  tmp = os.path.join(out, _TMP, tmp_name)
  with open(tmp, 'wb') as f:
    f.write(data)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  os.replace(tmp, path)


def _json_bytes(value):
  return (json.dumps(value, indent=2, sort_keys=True) + '\n').encode()


def _differences(old, new, prefix=''):
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      diffs += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      diffs.append(f'{prefix}{key} was {a!r}, now {b!r}')
  return diffs


def check_output(out, info, overwrite, inputs):
  """Whether `out` must be emptied first: raises for a folder that is not ours (unless
  empty), for one inside an input, and for an earlier run whose `info` differs on the keys
  of `info` (a subset before the model is loaded) unless `overwrite`."""
  safe_outputs.check_apart(out, inputs)
  if not safe_outputs.owned_by(out, TOOL):
    safe_outputs.check_output(out, TOOL, overwrite, inputs=inputs)
    return False   # missing or empty: nothing to remove
  old = read_info(out)
  diffs = _differences({k: old.get(k) for k in info}, info) if old else []
  if diffs and not overwrite:
    raise MismatchError(f'--out {out}: holds embeddings made with other arguments '
                        f'({"; ".join(diffs)}); use another --out, or --overwrite to '
                        'replace them.')
  return overwrite


def open_output(out, info, overwrite, inputs):
  """Prepares `out` for a run described by `info`: a new folder, or an earlier run with the
  same `info` to resume. `overwrite` removes an earlier run first (only ours: safe_outputs);
  a folder that is not ours is never touched."""
  if check_output(out, info, overwrite, inputs):
    safe_outputs.remove_tree(out, TOOL)
  os.makedirs(os.path.join(out, _TMP), exist_ok=True)
  safe_outputs.write_marker(out, TOOL)
  _write_atomic(out, os.path.join(out, INFO_FILE), _json_bytes(info), f'info.{os.getpid()}')


def read_info(out):
  try:
    with open(os.path.join(out, INFO_FILE), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_done(out, shard):
  return os.path.isfile(done_path(out, shard))


def clear_temporaries(out, shard):
  """Removes what a killed run left of `shard` under .tmp/ (only this process writes it)."""
  folder = os.path.join(out, _TMP)
  for name in os.listdir(folder):
    if name.startswith(f'{shard}.'):
      os.remove(os.path.join(folder, name))


def _npy_bytes(array):
  buf = io.BytesIO()
  np.save(buf, np.asarray(array, np.float16))
  return buf.getvalue()


def _parquet_bytes(rows):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  types = dict(width=pa.int32(), height=pa.int32())
  table = pa.table({c: pa.array([r.get(c) for r in rows], types.get(c, pa.string()))
                    for c in METADATA_COLUMNS})
  buf = io.BytesIO()
  pq.write_table(table, buf)
  return buf.getvalue()


def write_shard(out, shard, image_emb, text_emb, rows, counts):
  """The shard's files, each atomically, then its done marker (counts: seen, embedded,
  skipped {reason: n})."""
  _write_atomic(out, emb_path(out, 'img_emb', shard), _npy_bytes(image_emb), f'{shard}.img')
  if text_emb is not None:
    _write_atomic(out, emb_path(out, 'text_emb', shard), _npy_bytes(text_emb), f'{shard}.text')
  _write_atomic(out, metadata_path(out, shard), _parquet_bytes(rows), f'{shard}.meta')
  _write_atomic(out, done_path(out, shard), _json_bytes(dict(counts, shard=shard)), f'{shard}.done')


def done_shards(out):
  """The done markers' file names (one per finished shard)."""
  folder = os.path.join(out, _DONE)
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def write_stats(out, num_shards):
  """stats.json: the counts of every done shard summed (all processes' shards);
  num_shards: how many the inputs make, known once a process has passed over them all."""
  folder = os.path.join(out, _DONE)
  done = [json.load(open(os.path.join(folder, n), encoding='utf-8')) for n in done_shards(out)]
  reasons = {}
  for d in done:
    for reason, n in d['skipped'].items():
      reasons[reason] = reasons.get(reason, 0) + n
  stats = dict(shards_done=len(done), num_shards=num_shards,
               complete=num_shards is not None and len(done) == num_shards,
               seen=sum(d['seen'] for d in done), embedded=sum(d['embedded'] for d in done),
               skipped=sum(reasons.values()), skipped_by_reason=dict(sorted(reasons.items())))
  _write_atomic(out, os.path.join(out, STATS_FILE), _json_bytes(stats), f'stats.{os.getpid()}')
  return stats
