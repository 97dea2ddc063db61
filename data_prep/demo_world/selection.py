"""Selection quality of a demo I2E corpus against the generator's ground truth."""
import json
import os

import tensorflow as tf

from data_prep.i2e import metadata
from mofi_jax.data import schema


class GroundTruthMismatch(RuntimeError):
  """The corpus holds image keys the ground truth does not know."""


def read_selected(corpus_dir):
  """{image/key: [entity ids]} of every record of the corpus."""
  out = {}
  for path in schema.list_shards(corpus_dir):
    for record in tf.data.TFRecordDataset(path):
      feats = tf.train.Example.FromString(record.numpy()).features.feature
      key = feats['image/key'].bytes_list.value[0].decode('utf-8')
      out[key] = [i.decode('utf-8') for i in feats['entity/id'].bytes_list.value]
  return out


def selection_metrics(corpus_dir, ground_truth_path):
  """Precision and recall of the corpus's entities against the ground truth.

  precision  kept entities that are drawn in their image / kept entities
  recall     mentioned true entities kept / mentioned true entities (an entity the
             alt-text never names cannot be found from it; pairs the pipeline dropped
             count as misses)
  ambiguous_recall  ambiguous mentions (a name several entities share) whose intended
             sense is kept / all of them
  distractors_removed  mentioned distractors (named, not drawn) not kept / all of them
  text_only_precision  the precision of keeping every mentioned entity (no CLIP), the
             baseline selection improves on.
  entities / entities_never_drawn / drawn_entities_kept  the class table: its size, its
             entities that no image draws (KB-only ones that survived selection), and the
             share of the drawn entities it has.
  baseline_top1  precision, recall, ambiguous_recall and distractors_removed of the
             text-only linker: each mention's top-1 link candidate, kept if its CLIP score
             passes the same threshold (baseline_selected), on the same written pairs.
  """
  selected = read_selected(corpus_dir)
  unknown = sorted(set(selected) - _keys(ground_truth_path))
  if unknown:
    raise GroundTruthMismatch(f'{corpus_dir}: image keys {unknown[:3]} are not in '
                              f'{ground_truth_path}; corpus and ground truth do not match.')
  table_ids = set(schema.load_entities(corpus_dir).ids)
  n, drawn = _count(selected, ground_truth_path)
  out = dict(_ratios(n), text_only_precision=_ratio(
      n['mentioned_true'], n['mentioned_true'] + n['distractors']),
             images_kept=len(selected), entities=len(table_ids),
             entities_never_drawn=len(table_ids - drawn),
             drawn_entities_kept=_ratio(len(table_ids & drawn), len(drawn)), counts=n)
  baseline = baseline_selected(corpus_dir)
  if baseline is not None:
    b, _ = _count(baseline, ground_truth_path)
    out['baseline_top1'] = dict(_ratios(b), counts=b)
  return out


def baseline_selected(corpus_dir):
  """{key: [entity ids]} the text-only top-1 linker keeps, from the metadata table; None for
  a corpus without one (builder='direct')."""
  if not tf.io.gfile.isdir(os.path.join(corpus_dir, metadata.FOLDER)):
    return None
  threshold = schema.load_corpus_meta(corpus_dir)['i2e_config']['select']['threshold']
  out = {}
  for row in metadata.read_table(corpus_dir).select(['key', 'mentions']).to_pylist():
    kept = sorted({m['entity_ids'][0] for m in row['mentions']
                   if m['clip_scores'][0] >= threshold})
    if kept:
      out[row['key']] = kept
  return out


def _count(selected, ground_truth_path):
  """The counts behind the metrics, and the set of drawn entities."""
  drawn = set()
  n = dict(pairs=0, kept=0, kept_true=0, mentioned_true=0, mentioned_true_kept=0,
           distractors=0, distractors_kept=0, ambiguous=0, ambiguous_kept=0)
  with open(ground_truth_path) as f:
    for line in f:
      truth = json.loads(line)
      drawn.update(truth['true'])
      kept = set(selected.get(truth['key'], ()))
      n['pairs'] += 1
      n['kept'] += len(kept)
      n['kept_true'] += len(kept & set(truth['true']))
      n['mentioned_true'] += len(set(truth['mentioned_true']))
      n['mentioned_true_kept'] += len(kept & set(truth['mentioned_true']))
      n['distractors'] += len(set(truth['distractors']))
      n['distractors_kept'] += len(kept & set(truth['distractors']))
      ambiguous = {m['entity'] for m in truth['mentions'] if m['ambiguous']}
      n['ambiguous'] += len(ambiguous)
      n['ambiguous_kept'] += len(kept & ambiguous)
  return n, drawn


def _ratio(a, b):
  return round(a / b, 4) if b else None


def _ratios(n):
  return dict(precision=_ratio(n['kept_true'], n['kept']),
              recall=_ratio(n['mentioned_true_kept'], n['mentioned_true']),
              ambiguous_recall=_ratio(n['ambiguous_kept'], n['ambiguous']),
              distractors_removed=_ratio(n['distractors'] - n['distractors_kept'],
                                         n['distractors']))


def _keys(ground_truth_path):
  with open(ground_truth_path) as f:
    return {json.loads(line)['key'] for line in f}
