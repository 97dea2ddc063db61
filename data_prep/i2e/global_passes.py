"""GlobalPasses: entity frequencies, rare-entity removal, class indices, eval de-duplication.

  g = selected | GlobalPasses(min_images=5, eval_dedup_dirs=('/data/gpr1200',))
  g['main']           SelectedPair, rare entities removed (order and scores kept)
  g['filtered']       'near_duplicate_of_eval', 'rare_entity_only'
  g['dead_letter']    'corrupt_image' (only if an image cannot be hashed; clean checks first)
  g['entity_counts']  (entity_id, images) for every entity before the min_images cut
  g['classes']        one element: ((entity_id, images), ...) of the kept entities in class
                      order: most frequent first, ties by Q-number (Q2 before Q10)

Near-duplicates: 64-bit perceptual hashes (imagehash.phash); an image within
`phash_max_distance` bits of any eval image is dropped before entities are counted, so
the counts are those of the written images. Eval hashes are a side input (eval sets are
small, e.g. GPR1200's 12,000 images). Near-duplicates within the corpus leave earlier, in
dedup (near_dup.py, on small records), so they never count towards min_images.

Only (entity_id, count) pairs and the class list travel to one worker: side inputs
sized by the entity count.
"""
import dataclasses
import re

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import types
from mofi_jax.data import image_limits

STAGE = 'global'
EVAL_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.gif', '.bmp')
_QID = re.compile(r'^Q(\d+)$')


def qid_order(entity_id):
  """Sort key: Q-numbers numerically, then anything else by its string."""
  match = _QID.match(entity_id)
  return (0, int(match.group(1)), '') if match else (1, 0, entity_id)


def class_order(entity_counts, min_images):
  """[(entity_id, count)] -> kept entities, most frequent first, ties by Q-number."""
  kept = [(e, int(n)) for e, n in entity_counts if n >= min_images]
  return tuple(sorted(kept, key=lambda en: (-en[1], qid_order(en[0]))))


def drop_rare(selected, kept_ids):
  """SelectedPair -> the same with only `kept_ids` entities, or Filtered if none is left.

  `choices` (how selection decided each mention, the metadata table's `mentions` column)
  stay as selection made them: they are the audit record of the CLIP decision, and a
  mention whose chosen entity was cut here is told by that entity missing from entity_ids.
  """
  keep = [i for i, e in enumerate(selected.entity_ids) if e in kept_ids]
  if not keep:
    return types.Filtered(STAGE, 'rare_entity_only', selected.pair.key)
  if len(keep) == len(selected.entity_ids):
    return selected
  return dataclasses.replace(selected, entity_ids=tuple(selected.entity_ids[i] for i in keep),
                             scores=tuple(selected.scores[i] for i in keep))


# ----------------------------------------------------------------------------- phash


def phash64(image_bytes):
  """64-bit perceptual hash (imagehash.phash, 8x8 DCT) as a Python int."""
  import imagehash  # pylint: disable=import-outside-toplevel
  # The eval folders' images have not been through clean: the same caps as the eval transforms.
  with image_limits.open_image(image_bytes) as image:
    bits = imagehash.phash(image.convert('RGB')).hash.flatten()
  return int(''.join('1' if b else '0' for b in bits), 2)


def min_hamming(value, hashes):
  """Smallest bit distance from int `value` to uint64 array `hashes` (inf if empty)."""
  if not len(hashes):
    return float('inf')
  return int(np.bitwise_count(np.bitwise_xor(hashes, np.uint64(value))).min())


def list_eval_images(folders):
  """Sorted image paths under each folder (non-recursive). Raises naming an empty folder."""
  paths = []
  for folder in folders:
    pattern = FileSystems.join(folder, '*')
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list
             if m.path.lower().endswith(EVAL_IMAGE_EXTENSIONS)]
    if not found:
      raise ValueError(f'global_passes.eval_dedup_dirs: {folder} holds no images '
                       f'({"/".join(EVAL_IMAGE_EXTENSIONS)}).')
    paths += found
  return sorted(paths)


def _hash_eval_image(path):
  with FileSystems.open(path) as f:
    data = f.read()
  try:
    return [phash64(data)]
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'eval image {path} cannot be decoded for near-duplicate checks '
                     f'({type(e).__name__}: {e}); remove it from the eval folder.') from e


class _NearDuplicateFn(beam.DoFn):
  def __init__(self, max_distance):
    self._max = max_distance

  def process(self, selected, eval_hashes):
    try:
      distance = min_hamming(phash64(selected.pair.image), eval_hashes)
    except Exception as e:  # pylint: disable=broad-except
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'corrupt_image', selected.pair.key, selected.pair.source,
          f'cannot hash: {type(e).__name__}: {e}'[:500]))
      return
    if distance <= self._max:
      yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(
          STAGE, 'near_duplicate_of_eval', selected.pair.key))
    else:
      yield selected


class DropNearDuplicates(beam.PTransform):
  """SelectedPair -> {'main', 'filtered': near duplicates of eval images, 'dead_letter'}."""

  def __init__(self, eval_dirs, max_distance=4):
    super().__init__()
    self._paths = list_eval_images(eval_dirs)  # At construction: a bad folder fails early.
    self._max = max_distance

  def expand(self, selected):
    p = selected.pipeline
    hashes = (p | 'EvalPaths' >> beam.Create(self._paths)
              | 'HashEval' >> beam.FlatMap(_hash_eval_image)
              | 'EvalHashList' >> beam.combiners.ToList()
              | 'EvalHashArray' >> beam.Map(lambda h: np.asarray(sorted(h), np.uint64)))
    out = selected | 'NearDuplicates' >> beam.ParDo(
        _NearDuplicateFn(self._max), beam.pvalue.AsSingleton(hashes)).with_outputs(
            types.DEAD_LETTER, types.FILTERED, main='main')
    return {'main': out.main, 'filtered': out[types.FILTERED],
            'dead_letter': out[types.DEAD_LETTER]}


class _DropRareFn(beam.DoFn):
  def process(self, selected, kept_ids):
    out = drop_rare(selected, kept_ids)
    if isinstance(out, types.Filtered):
      yield beam.pvalue.TaggedOutput(types.FILTERED, out)
    else:
      yield out


class GlobalPasses(beam.PTransform):
  """SelectedPair -> {'main', 'filtered', 'dead_letter', 'entity_counts', 'classes'}."""

  def __init__(self, min_images=5, eval_dedup_dirs=(), phash_max_distance=4):
    super().__init__()
    if min_images < 1:
      raise ValueError(f'GlobalPasses: min_images must be >= 1, got {min_images}.')
    self._min = min_images
    self._dedup = (DropNearDuplicates(eval_dedup_dirs, phash_max_distance)
                   if eval_dedup_dirs else None)

  def expand(self, selected):
    p = selected.pipeline
    if self._dedup is not None:
      dedup = selected | 'DropNearDuplicates' >> self._dedup
    else:
      dedup = {'main': selected, 'filtered': p | 'NoNearDup' >> beam.Create([]),
               'dead_letter': p | 'NoDeadLetter' >> beam.Create([])}
    counts = (dedup['main']
              | 'EntityOnes' >> beam.FlatMap(lambda s: [(e, 1) for e in s.entity_ids])
              | 'CountPerEntity' >> beam.CombinePerKey(sum))
    classes = (counts | 'AllCounts' >> beam.combiners.ToList()
               | 'ClassOrder' >> beam.Map(class_order, self._min))
    kept_ids = classes | 'KeptIds' >> beam.Map(lambda c: frozenset(e for e, _ in c))
    kept = dedup['main'] | 'DropRare' >> beam.ParDo(
        _DropRareFn(), beam.pvalue.AsSingleton(kept_ids)).with_outputs(
            types.FILTERED, main='main')
    return {
        'main': kept.main,
        'filtered': (dedup['filtered'], kept[types.FILTERED]) | 'AllFiltered' >> beam.Flatten(),
        'dead_letter': dedup['dead_letter'],
        'entity_counts': counts,
        'classes': classes,
    }
