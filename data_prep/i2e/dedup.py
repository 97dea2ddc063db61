"""DedupPairs: key and image deduplication that shuffles small records, never images.

  index = p | ReadPairs(patterns).index()     # read.py: Copy records, no image bytes
  dedup = index['main'] | DedupPairs(read_fn, near_duplicate_distance=3)
  dedup['main']                                # types.Pair, each image once

Two passes over the input files:

1. read.py's index pass reads every file once and keeps, per record, a `Copy`: key, file,
   position, SHA-256 of the image bytes, and whether its alt-text passes clean.py's text
   checks (about 150 bytes, whatever the image size).
2. Decisions on Copies alone:
   - by key: the copy at the smallest (file, position) is kept; every other copy is a dead
     letter 'duplicate_key' naming its file and position (GroupByKey of Copies: duplicate
     keys are rare, and each group holds small records);
   - by image: among the kept copies whose text passes, the best copy is kept per SHA-256;
     the others are filtered 'duplicate_image', counted per image (`CombinePerKey` of
     (rank, file, position, pHash) and 1: combiner lifting merges copies before the
     shuffle, so a placeholder image seen a million times costs one record per worker).
     Copies whose text fails are kept here, so that clean.py drops them with their reason;
   - near-duplicates (near_dup.py): among those survivors, a copy whose 64-bit pHash lies
     within `near_duplicate_distance` bits of a better copy's is filtered 'near_duplicate'
     (banded, so that only these small records are shuffled).
   The best copy has the better rank: (-caption characters, key), i.e. the longest caption
   after clean.normalize_text, then the smallest key. The issue asks for "the copy with
   mentions"; mentions are found after dedup (and after clean, whose text check decides
   what a mention finder sees), so what is known here stands in for them: only copies
   whose text passes clean's check compete, and the longer caption is the one with more
   words to find mentions in ("The Eiffel Tower at sunset, Paris" beats "image"). Merging
   the mentions of all copies would need the dropped copies' texts after linking, i.e.
   carrying every copy's text through mentions and link; it is not done.
3. The survivors are grouped by file, (file -> positions), and each file is read again,
   emitting only those positions: the only image bytes that go on. They cross a shuffle once,
   at the shard write (write.py).

What is shuffled, per input pair (docs/i2e.md has the measured totals): the Copy twice (by
key, then its hash record by image), a NearRecord once per band and once per band as a
verdict (near_dup.py), and a (file, position) once. Beam counters
'i2e_shuffle_bytes/<shuffle>' add the serialised sizes up while the job runs.
"""
import dataclasses
import hashlib
import typing

import apache_beam as beam

from data_prep.i2e import clean, global_passes, near_dup, stats, types

STAGE = 'dedup'
count_shuffled = stats.count_shuffled


@dataclasses.dataclass(frozen=True)
class Copy:
  key: str
  path: str
  position: int
  sha256: str       # hex digest of the image bytes as read
  text_ok: bool     # the alt-text passes clean.py's text checks
  text_chars: int = 0   # characters of the normalised alt-text (0 where text_ok is False)
  phash: int = -1       # 64-bit pHash of the image (-1: not hashed, the text fails, or the
                        # image does not decode; clean.py then says why)

  @property
  def rank(self):
    """Smaller is better: the longest caption, then the smallest key (unique per key)."""
    return -self.text_chars, self.key


def image_phash(image):
  """global_passes.phash64 of the bytes, -1 where they do not decode (clean reports it)."""
  try:
    return global_passes.phash64(image)
  except Exception:  # pylint: disable=broad-except  # A bad image is clean.py's to report.
    return -1


def copy_of(pair, path, position, text_check):
  """The Copy of a read Pair: what dedup decides on. Only a copy whose text passes competes
  for the best copy, so only those are measured and hashed (a decode per image)."""
  ok = bool(text_check(pair.text))
  return Copy(pair.key, path, position, hashlib.sha256(pair.image).hexdigest(), ok,
              len(clean.normalize_text(pair.text)) if ok else 0,
              image_phash(pair.image) if ok else -1)


def _copy_bytes(c):
  return len(c.key) + len(c.path) + len(c.sha256) + 9 + 4 + 8


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
  """(rank, path, position, phash) values -> (the smallest, how many)."""

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
  return c.sha256, (c.rank, c.path, c.position, c.phash)


def _winners(item):
  """(sha, ((rank, path, position, phash), n)) -> the kept copy's NearRecord; the other
  n-1 are one Filtered record with their count."""
  _, (best, n) = item
  record = near_dup.NearRecord(*best)
  if n > 1:
    yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(
        STAGE, 'duplicate_image', record.key, count=n - 1))
  yield record


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


def _without_near_duplicates(records, near):
  """NearRecords -> (kept, filtered): NearDuplicates on the hashed ones; the others stay."""
  hashed = records | 'Hashed' >> beam.Filter(lambda r: r.phash >= 0)
  unhashed = records | 'Unhashed' >> beam.Filter(lambda r: r.phash < 0)
  out = hashed | 'NearDuplicates' >> near
  return (out['main'], unhashed) | 'NearKept' >> beam.Flatten(), out['filtered']


class DedupPairs(beam.PTransform):
  """Copy -> {'main': Pair, 'dead_letter': DeadLetter, 'filtered': Filtered} (docstring).

  near_duplicate_distance: pHash bits (of 64) within which a copy is a near-duplicate of a
  better one; -1 turns near-duplicate dedup off.
  """

  def __init__(self, read_fn, near_duplicate_distance=3):
    super().__init__()
    self._read_fn = read_fn
    self._near = (near_dup.NearDuplicates(near_duplicate_distance)
                  if near_duplicate_distance >= 0 else None)

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
    winners, filtered = by_image.main, [by_image[types.FILTERED]]
    if self._near is not None:
      winners, near_filtered = _without_near_duplicates(winners, self._near)
      filtered.append(near_filtered)
    kept = ((winners | 'WinnerPositions' >> beam.Map(lambda r: (r.path, r.position)),
             text_bad | 'Positions' >> beam.Map(lambda c: (c.path, c.position)))
            | 'Kept' >> beam.Flatten()
            | 'ByFile' >> beam.Map(_by_file).with_output_types(typing.Tuple[str, int])
            | 'GroupByFile' >> beam.GroupByKey())
    pairs = kept | 'Reread' >> beam.ParDo(_RereadFn(self._read_fn)).with_outputs(
        types.DEAD_LETTER, main='main')
    dead = (by_key[types.DEAD_LETTER], pairs[types.DEAD_LETTER]) | 'AllDead' >> beam.Flatten()
    return {'main': pairs.main, 'dead_letter': dead,
            'filtered': filtered | 'AllFiltered' >> beam.Flatten()}
