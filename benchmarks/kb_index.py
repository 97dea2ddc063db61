r"""Which mapped structure holds the alias index: marisa-trie against LMDB (and a Python dict).

  python benchmarks/kb_index.py --kb /tmp/scale_1m/kb      # a KB built by build_kb

Builds the alias index (normalised alias -> 'Q-id<TAB>quality' values) of the KB's Parquet
alias table three ways and prints, for each: build seconds, file bytes, open seconds, exact
lookups per second (a fixed sample of aliases, half of them absent), and the resident memory
a fresh process adds to hold it and run the lookups (measured in a child process). LMDB
needs `pip install lmdb` (not a dependency of the project); without it that row is skipped.
"""
import argparse
import glob
import json
import multiprocessing
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq


def alias_rows(kb_dir):
  rows = []
  for path in sorted(glob.glob(os.path.join(kb_dir, 'aliases-*.parquet'))):
    t = pq.read_table(path)
    rows += zip(t['alias'].to_pylist(), t['entity_id'].to_pylist(), t['quality'].to_pylist())
  return rows


def build_marisa(rows, path):
  import marisa_trie  # pylint: disable=import-outside-toplevel
  marisa_trie.BytesTrie((a, f'{q}\t{w!r}'.encode()) for a, q, w in rows).save(path)


def open_marisa(path):
  import marisa_trie  # pylint: disable=import-outside-toplevel
  trie = marisa_trie.BytesTrie().mmap(path)
  return lambda key: trie.get(key) or []


def build_lmdb(rows, path):
  import lmdb  # pylint: disable=import-outside-toplevel
  env = lmdb.open(path, map_size=1 << 36, subdir=True, max_dbs=1)
  db = env.open_db(b'aliases', dupsort=True)
  with env.begin(write=True, db=db) as txn:
    for a, q, w in sorted(rows):
      txn.put(a.encode(), f'{q}\t{w!r}'.encode(), dupdata=True)
  env.close()


def open_lmdb(path):
  import lmdb  # pylint: disable=import-outside-toplevel
  env = lmdb.open(path, readonly=True, lock=False, subdir=True, max_dbs=1)
  txn = env.begin(db=env.open_db(b'aliases', create=False, dupsort=True))
  def get(key):
    cur = txn.cursor()
    return list(cur.iternext_dup()) if cur.set_key(key.encode()) else []
  return get


def build_dict(rows, path):
  with open(path, 'w') as f:
    json.dump(rows, f)


def open_dict(path):
  with open(path) as f:
    index = {}
    for a, q, w in json.load(f):
      index.setdefault(a, []).append(f'{q}\t{w!r}'.encode())
  return lambda key: index.get(key, [])


KINDS = dict(marisa=(build_marisa, open_marisa), lmdb=(build_lmdb, open_lmdb),
             dict=(build_dict, open_dict))


def _rss_kib():
  with open('/proc/self/status') as f:
    return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:'))


def _probe(kind, path, keys, out):
  before = _rss_kib()
  start = time.perf_counter()
  get = KINDS[kind][1](path)
  opened = time.perf_counter() - start
  start = time.perf_counter()
  hits = sum(len(get(k)) for k in keys)
  lookups = len(keys) / (time.perf_counter() - start)
  out.put(dict(open_s=round(opened, 4), lookups_per_s=round(lookups), hits=hits,
               added_rss_mib=round((_rss_kib() - before) / 1024, 1)))


def disk_bytes(path):
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--kb', required=True, help='a KB folder (data_prep.build_kb)')
  parser.add_argument('--lookups', type=int, default=200_000)
  args = parser.parse_args(argv)
  rows = alias_rows(args.kb)
  rng = np.random.default_rng(0)
  present = [rows[i][0] for i in rng.integers(len(rows), size=args.lookups // 2)]
  keys = present + [k + ' zz' for k in present]
  work = tempfile.mkdtemp(prefix='kb_index_bench_')
  results = {}
  ctx = multiprocessing.get_context('spawn')
  for kind, (build, _) in KINDS.items():
    path = os.path.join(work, kind)
    try:
      start = time.perf_counter()
      build(rows, path)
    except ImportError as e:
      print(f'{kind}: skipped ({e})')
      continue
    built = time.perf_counter() - start
    queue = ctx.Queue()
    proc = ctx.Process(target=_probe, args=(kind, path, keys, queue))
    proc.start()
    probe = queue.get()
    proc.join()
    results[kind] = dict(build_s=round(built, 1), file_mib=round(disk_bytes(path) / 2**20, 1),
                         **probe)
    print(f'{kind:7s} {json.dumps(results[kind])}')
  shutil.rmtree(work, ignore_errors=True)
  print(json.dumps(dict(alias_rows=len(rows), **results)))


if __name__ == '__main__':
  main()
