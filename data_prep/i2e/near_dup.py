"""NearDuplicates: perceptual-hash dedup within the corpus, on small records only.

  out = records | NearDuplicates(max_distance=3)
  out['main']       NearRecord of the kept copies
  out['filtered']   Filtered 'near_duplicate', one per dropped copy

One product photo re-encoded five times (JPEG qualities, resizes) has five SHA-256s but
pHashes a few bits apart; left in, it counts five times towards its entity's min_images.
dedup.py runs this on the survivors of exact dedup, before the images are read again, so
what is shuffled is a NearRecord (key, file, position, pHash, caption length: ~60 bytes),
never image bytes.

The rule: a copy is dropped iff a better copy lies within `max_distance` bits of its
64-bit pHash (global_passes.phash64). Better is dedup.py's rank: the longer caption, then
the smaller key, so ranks are distinct and the result does not depend on order or bundling.
Each decision looks only at the copy's neighbours, so it can be made in parallel; where
near-duplicates chain (A near B near C, A not near C) both B and C leave, C for B.

Banding (multi-index hashing): the 64 bits are cut into max_distance + 1 bands. Two hashes
within max_distance bits differ in at most max_distance bands, so they agree exactly on at
least one (pigeonhole): grouping by (band, band value) finds every near pair, and a copy
is compared only with the copies of its buckets. Each copy is shuffled once per band, then
once as a verdict per band to combine them. At 1B copies and 4 bands of 16 bits a bucket
holds ~15k copies if hashes were uniform; the comparison inside a bucket runs on distinct
hashes only (numpy, in row blocks), so a hot hash (blank or flat images) costs its
distinct hashes, not its copies squared.
"""
import dataclasses

import apache_beam as beam
import numpy as np

from data_prep.i2e import stats, types

STAGE = 'dedup'
HASH_BITS = 64
BLOCK_ROWS = 1024     # Rows of the distance matrix computed at once (memory: rows x hashes).


@dataclasses.dataclass(frozen=True)
class NearRecord:
  rank: tuple         # (-caption characters, key): smaller is better, unique per copy
  path: str
  position: int
  phash: int          # 64-bit perceptual hash, 0 <= phash < 2**64

  @property
  def key(self):
    return self.rank[1]


def band_widths(max_distance):
  """Bit widths of the max_distance + 1 bands, as even as can be (64 = 16+16+16+16)."""
  bands = max_distance + 1
  if not 1 <= bands <= HASH_BITS:
    raise ValueError(f'near-duplicate max_distance must be in [0, {HASH_BITS - 1}], '
                     f'got {max_distance}.')
  base, extra = divmod(HASH_BITS, bands)
  return [base + (1 if b < extra else 0) for b in range(bands)]


def band_values(phash, widths):
  """[(band index, the hash's bits in that band)], high bits first."""
  out, shift = [], HASH_BITS
  for b, width in enumerate(widths):
    shift -= width
    out.append((b, (phash >> shift) & ((1 << width) - 1)))
  return out


def dropped_in_bucket(records, max_distance):
  """[NearRecord] sharing one band value -> [bool]: whether a better one is within reach."""
  order = sorted(range(len(records)), key=lambda i: records[i].rank)
  ordinal = np.empty(len(records), np.int64)
  ordinal[order] = np.arange(len(records))
  hashes = np.array([r.phash for r in records], np.uint64)
  unique, inverse = np.unique(hashes, return_inverse=True)
  best = np.full(len(unique), len(records), np.int64)       # best ordinal per distinct hash
  np.minimum.at(best, inverse, ordinal)
  reach = np.empty(len(unique), np.int64)                    # best ordinal within max_distance
  for lo in range(0, len(unique), BLOCK_ROWS):
    rows = unique[lo:lo + BLOCK_ROWS, None]
    near = np.bitwise_count(np.bitwise_xor(rows, unique[None, :])) <= max_distance
    reach[lo:lo + BLOCK_ROWS] = np.where(near, best[None, :], len(records)).min(axis=1)
  return list(reach[inverse.ravel()] < ordinal)


def _record_bytes(r):
  return len(r.key) + len(r.path) + 8 + 8 + 4


class _BandRecords(beam.DoFn):
  def __init__(self, widths):
    self._widths = widths

  def process(self, record):
    for band in band_values(record.phash, self._widths):
      stats.count_shuffled('near_dup_by_band', _record_bytes(record) + 4)
      yield band, record


def _verdicts(item, max_distance):
  _, records = item
  records = list(records)
  for record, dropped in zip(records, dropped_in_bucket(records, max_distance)):
    stats.count_shuffled('near_dup_verdicts', _record_bytes(record) + 1)
    yield dataclasses.astuple(record), bool(dropped)   # primitives: a deterministic key


def _route(item):
  fields, dropped = item
  record = NearRecord(*fields)
  if dropped:
    yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, 'near_duplicate',
                                                                  record.key))
  else:
    yield record


class NearDuplicates(beam.PTransform):
  """NearRecord -> {'main': NearRecord kept, 'filtered': Filtered 'near_duplicate'}."""

  def __init__(self, max_distance=3):
    super().__init__()
    self._widths = band_widths(max_distance)
    self._max = max_distance

  def expand(self, records):
    decided = (records
               | 'Bands' >> beam.ParDo(_BandRecords(self._widths))
               | 'GroupByBand' >> beam.GroupByKey()
               | 'Verdicts' >> beam.FlatMap(_verdicts, self._max)
               | 'AnyBand' >> beam.CombinePerKey(any)
               | 'Route' >> beam.FlatMap(_route).with_outputs(types.FILTERED, main='main'))
    return {'main': decided.main, 'filtered': decided[types.FILTERED]}
