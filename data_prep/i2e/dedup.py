"""DedupPairs: key and image deduplication that shuffles small records, never images.

  index = p | ReadPairs(patterns).index()     # read.py: Copy records, no image bytes
  dedup = index['main'] | DedupPairs(read_fn, min_chars, max_chars)
  dedup['main']                                # types.Pair, each image once

Two passes over the input files:

1. read.py's index pass reads every file once and keeps, per record, a `Copy`: key, file,
   position, SHA-256 of the image bytes, and whether its alt-text passes clean.py's text
   checks (about 150 bytes, whatever the image size).
2. Decisions on Copies alone:
   - by key: the copy at the smallest (file, position) is kept; every other copy is a dead
     letter 'duplicate_key' naming its file and position (GroupByKey of Copies: duplicate
     keys are rare, and each group holds small records);
   - by image: among the kept copies whose text passes, the one with the smallest key is
     kept per SHA-256; the others are filtered 'duplicate_image', counted per image
     (`CombinePerKey` of (key, file, position, 1): combiner lifting merges copies before
     the shuffle, so a placeholder image seen a million times costs one record per worker).
     Copies whose text fails are kept here, so that clean.py drops them with their reason.
3. The survivors are grouped by file, (file -> positions), and each file is read again,
   emitting only those positions: the only image bytes that go on. They cross a shuffle once,
   at the shard write (write.py).

What is shuffled, per input pair (docs/i2e.md has the measured totals): the Copy twice (by
key, then its hash record by image) and a (file, position) once. Beam counters
'i2e_shuffle_bytes/<shuffle>' add the serialised sizes up while the job runs.
"""
import dataclasses
import typing

import apache_beam as beam

from data_prep.i2e import stats, types

STAGE = 'dedup'
count_shuffled = stats.count_shuffled


@dataclasses.dataclass(frozen=True)
class Copy:
  key: str
  path: str
  position: int
  sha256: str       # hex digest of the image bytes as read
  text_ok: bool     # the alt-text passes clean.py's text checks


def _copy_bytes(c):
  return len(c.key) + len(c.path) + len(c.sha256) + 9


def _key_record(c):
  count_shuffled('by_key', _copy_bytes(c))
  return c.key, c


def keep_first_copy(item):
  """(key, [Copy, ...]) -> the Copy at the smallest (path, position); others dead letters."""
  key, copies = item
  best = None
  for copy in copies:
    if best is None or (copy.path, copy.position) < (best.path, best.position):
      copy, best = best, copy
    if copy is not None:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'duplicate_key', key, copy.path, f'position {copy.position}; another copy of '
          f'key {key!r} comes first (by file, then position) and is kept'))
  yield best


class _FirstAndCount(beam.CombineFn):
  """(key, path, position) values -> (the smallest, how many)."""

  def create_accumulator(self):
    return None, 0

  def add_input(self, acc, value):
    return (value if acc[0] is None or value < acc[0] else acc[0]), acc[1] + 1

  def merge_accumulators(self, accs):
    best, n = None, 0
    for a, k in accs:
      if a is not None and (best is None or a < best):
        best = a
      n += k
    return best, n

  def extract_output(self, acc):
    return acc


def _hash_record(c):
  count_shuffled('by_image', _copy_bytes(c) - 1)   # the Copy less its text flag
  return c.sha256, (c.key, c.path, c.position)


def _winners(item):
  """(sha, ((key, path, position), n)) -> (path, position) of the kept copy; the other n-1
  are one Filtered record with their count."""
  _, ((key, path, position), n) = item
  if n > 1:
    yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(
        STAGE, 'duplicate_image', key, count=n - 1))
  yield path, position


def _by_file(path_position):
  count_shuffled('by_file', len(path_position[0]) + 8)
  return path_position


@beam.typehints.with_output_types(types.Pair)
class _RereadFn(beam.DoFn):
  """(path, positions) -> the Pairs at those positions; a position that does not come back
  (the file changed or broke between the passes) is a dead letter 'reread_failed'."""

  def __init__(self, read_fn):
    self._read_fn = read_fn

  def process(self, item):
    path, positions = item
    wanted, found = set(positions), set()
    try:
      for position, pair in self._read_fn.pairs_at(path, wanted):
        found.add(position)
        yield pair
    except Exception as e:  # pylint: disable=broad-except  # Any failure of a file is data.
      detail = f'{type(e).__name__}: {e}'
    else:
      detail = 'record missing on the second read'
    for position in sorted(wanted - found):
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'reread_failed', f'{path}:{position}', path, detail[:300]))


class DedupPairs(beam.PTransform):
  """Copy -> {'main': Pair, 'dead_letter': DeadLetter, 'filtered': Filtered} (docstring)."""

  def __init__(self, read_fn):
    super().__init__()
    self._read_fn = read_fn

  def expand(self, copies):
    by_key = (copies
              | 'KeyRecords' >> beam.Map(_key_record).with_output_types(typing.Tuple[str, Copy])
              | 'GroupByKey' >> beam.GroupByKey()
              | 'KeepFirstCopy' >> beam.FlatMap(keep_first_copy).with_outputs(
                  types.DEAD_LETTER, main='main'))
    text_ok = by_key.main | 'TextOk' >> beam.Filter(lambda c: c.text_ok)
    text_bad = by_key.main | 'TextBad' >> beam.Filter(lambda c: not c.text_ok)
    by_image = (text_ok
                | 'HashRecords' >> beam.Map(_hash_record)
                | 'FirstPerImage' >> beam.CombinePerKey(_FirstAndCount())
                | 'Winners' >> beam.FlatMap(_winners).with_outputs(types.FILTERED,
                                                                   main='main'))
    kept = ((by_image.main, text_bad | 'Positions' >> beam.Map(lambda c: (c.path, c.position)))
            | 'Kept' >> beam.Flatten()
            | 'ByFile' >> beam.Map(_by_file).with_output_types(typing.Tuple[str, int])
            | 'GroupByFile' >> beam.GroupByKey())
    pairs = kept | 'Reread' >> beam.ParDo(_RereadFn(self._read_fn)).with_outputs(
        types.DEAD_LETTER, main='main')
    dead = (by_key[types.DEAD_LETTER], pairs[types.DEAD_LETTER]) | 'AllDead' >> beam.Flatten()
    return {'main': pairs.main, 'dead_letter': dead, 'filtered': by_image[types.FILTERED]}
