r"""Calibrates select.threshold (the CLIP score an entity needs) on hand-checked pairs.

  python -m data_prep.calibrate_select --metadata CORPUS --labels LABELS.jsonl \
      [--min_precision 0.9] [--out calibration]

LABELS.jsonl holds one hand-checked pair a line: {"key": "<the record's key>",
"entity_ids": ["Q90", ...]}, the entities the image really shows among those its alt-text
names ([] where it shows none). A few hundred pairs are enough for a curve.

The corpus's metadata table (data_prep/i2e/metadata.py) keeps, per mention, every candidate's
link and CLIP score, so each threshold is re-decided here without running CLIP: a mention
keeps the candidate select.py chooses (argmax of clip + link_weight * link, the build's
link_weight from corpus.json) iff its CLIP score is >= the threshold. Per threshold,
precision = kept entities that are labelled right / kept entities, recall = labelled
entities kept / labelled entities (an entity the linker never offered counts as missed).

The rule that picks the threshold: with --min_precision P, the threshold of highest recall
among those whose precision is >= P (ties: the higher threshold); without, the threshold
of highest F1 (ties: the higher threshold). Thresholds are the labelled mentions' own
scores, so every step of the curve is tried; what is written is the shortest decimal
between the chosen step and halfway to the next lower one (the same decisions on these
labels, no stored float32 score sitting on it), with its figures recomputed there.

Pairs all of whose mentions fell below the build's threshold are not in the corpus, so the
curve starts at the build's threshold: build the corpus to calibrate with
--config.select.threshold=-1 to see the whole range. The min_images cut is not re-applied.

Writes OUT/select_threshold.json (the value, its figures, the rule, the flag to use) and
OUT/select_threshold.png (precision and recall against the threshold).
"""
import argparse
import json
import math
import os
import sys

from mofi_jax import cli_errors

PROG = 'python -m data_prep.calibrate_select'
TABLE_ROWS = 15


class CalibrationError(ValueError):
  """A malformed input: the message names the file and the field."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):   # one line, not argparse's usage block
    raise CalibrationError(message)


def parse_args(argv):
  parser = _Parser(prog=PROG, description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--metadata', required=True, help='corpus folder (build_i2e --out)')
  parser.add_argument('--labels', required=True, help='JSON lines: {"key", "entity_ids"}')
  parser.add_argument('--min_precision', type=float, default=None,
                      help='choose the highest recall at this precision (default: max F1)')
  parser.add_argument('--out', default='calibration', help='folder for the JSON and PNG')
  args = parser.parse_args(argv)
  if args.min_precision is not None and not 0 < args.min_precision <= 1:
    raise CalibrationError(f'--min_precision must be in (0, 1], got {args.min_precision}')
  return args


# ----------------------------------------------------------------------------- inputs


def read_labels(path):
  """{key: frozenset(entity ids)} from LABELS.jsonl; CalibrationError naming line and field."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  labels = {}
  with tf.io.gfile.GFile(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        key, ids = _label(json_line(path, number, line), path, number)
        if key in labels:
          raise CalibrationError(f'{path} line {number}: key {key!r} is labelled twice')
        labels[key] = ids
  if not labels:
    raise CalibrationError(f'{path}: no labelled pair')
  return labels


def json_line(path, number, line):
  try:
    return json.loads(line)
  except ValueError as e:
    raise CalibrationError(f'{path} line {number}: not JSON ({e})') from e


def _label(item, path, number):
  where = f'{path} line {number}'
  if not isinstance(item, dict):
    raise CalibrationError(f'{where}: expected an object {{"key", "entity_ids"}}')
  for field in ('key', 'entity_ids'):
    if field not in item:
      raise CalibrationError(f'{where}: missing field {field!r}')
  key, ids = item['key'], item['entity_ids']
  if not isinstance(key, str) or not key:
    raise CalibrationError(f'{where}: field "key" must be a non-empty string, got {key!r}')
  if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
    raise CalibrationError(f'{where}: field "entity_ids" must be a list of strings, '
                           f'got {ids!r}')
  return key, frozenset(ids)


def read_build_select(corpus):
  """(link_weight, threshold) of the build, from corpus.json's i2e_config.select."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from mofi_jax.data import schema  # pylint: disable=import-outside-toplevel
  path = os.path.join(corpus, schema.META_FILE)
  with tf.io.gfile.GFile(path) as f:
    meta = json.load(f)
  select = (meta.get('i2e_config') or {}).get('select') or {}
  values = [select.get(k) for k in ('link_weight', 'threshold')]
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    raise CalibrationError(f'{path}: field i2e_config.select.link_weight/threshold missing or '
                           'not a number (an I2E corpus written by build_i2e has them)')
  return tuple(float(v) for v in values)


def read_mentions(corpus, keys):
  """{key: [(entity_ids, link_scores, clip_scores)]} of the labelled keys' mentions."""
  from data_prep.i2e import metadata  # pylint: disable=import-outside-toplevel
  table = metadata.read_table(corpus)
  where = f'{corpus}/{metadata.FOLDER}'
  for column in ('key', 'mentions'):
    if column not in table.column_names:
      raise CalibrationError(f'{where}: column {column!r} missing')
  out = {}
  for key, mentions in zip(table.column('key').to_pylist(),
                           table.column('mentions').to_pylist()):
    if key in keys:
      out[key] = [_mention(m, where, key) for m in mentions or ()]
  return out


def _mention(m, where, key):
  fields = ('entity_ids', 'link_scores', 'clip_scores')
  if not isinstance(m, dict) or any(not isinstance(m.get(f), list) for f in fields):
    raise CalibrationError(f'{where}: key {key!r}: a mention lacks {"/".join(fields)}')
  if not len(m['entity_ids']) == len(m['link_scores']) == len(m['clip_scores']) > 0:
    raise CalibrationError(f'{where}: key {key!r}: mention {m.get("mention")!r} has '
                           'entity_ids, link_scores and clip_scores of different lengths')
  return tuple(m['entity_ids']), tuple(m['link_scores']), tuple(m['clip_scores'])


def check_keys(labels, mentions, labels_path, corpus):
  missing = sorted(set(labels) - set(mentions))
  if missing:
    raise CalibrationError(
        f'{labels_path}: field "key": {len(missing)} labelled key(s) not in the metadata '
        f'table of {corpus}, e.g. {missing[0]!r} (build the corpus with '
        '--config.select.threshold=-1 so that no labelled pair is filtered)')


# ----------------------------------------------------------------------------- the curve


def best_candidates(mentions, link_weight):
  """{key: [(entity id, CLIP score)]}: each mention's candidate as select.choose picks it."""
  out = {}
  for key, ms in mentions.items():
    out[key] = []
    for ids, link, clip in ms:
      best = max(range(len(ids)), key=lambda j: (clip[j] + link_weight * link[j], link[j], -j))
      out[key].append((ids[best], float(clip[best])))
  return out


def scores_at(threshold, chosen, labels):
  """dict(threshold, kept, precision, recall, f1) of keeping what scores >= threshold."""
  kept = correct = 0
  for key, gold in labels.items():
    ids = {e for e, score in chosen.get(key, ()) if score >= threshold}
    kept += len(ids)
    correct += len(ids & gold)
  wanted = sum(len(g) for g in labels.values())
  precision = correct / kept if kept else 1.0
  recall = correct / wanted if wanted else 1.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return dict(threshold=threshold, kept=kept, precision=precision, recall=recall, f1=f1)


def curve(chosen, labels, floor):
  """scores_at every distinct chosen score >= floor (each step of the curve), ascending."""
  steps = sorted({s for ms in chosen.values() for _, s in ms if s >= floor})
  if not steps:
    raise CalibrationError('no labelled mention has a CLIP score at or above the build\'s '
                           f'threshold {floor}')
  return [scores_at(t, chosen, labels) for t in steps]


def choose_threshold(points, min_precision=None):
  """The rule (module docstring): the point of highest recall at precision >= min_precision,
  or of highest F1; ties go to the higher threshold."""
  if min_precision is None:
    return max(points, key=lambda p: (p['f1'], p['threshold']))
  good = [p for p in points if p['precision'] >= min_precision]
  if not good:
    best = max(p['precision'] for p in points)
    raise CalibrationError(f'--min_precision {min_precision}: no threshold reaches it on these '
                           f'labels (the best precision is {best:.3f})')
  return max(good, key=lambda p: (p['recall'], p['threshold']))


def written_value(step, lower):
  """A round threshold with the decisions of `step`: the shortest decimal below it and at
  least halfway to the next lower step (scores are stored as float32: none sits on it)."""
  low = (step + lower) / 2 if lower is not None else step - 1e-3
  for places in range(1, 9):
    value = (math.ceil(step * 10**places) - 1) / 10**places
    if value >= low:
      return round(value, places)
  return low


# ----------------------------------------------------------------------------- outputs


def table(points, chosen):
  """At most TABLE_ROWS evenly spaced points and the chosen one, as text."""
  step = max(1, math.ceil(len(points) / TABLE_ROWS))
  rows = sorted({id(p): p for p in points[::step] + [chosen]}.values(),
                key=lambda p: p['threshold'])
  lines = [f'{"threshold":>10s} {"kept":>6s} {"precision":>9s} {"recall":>7s} {"F1":>6s}']
  for p in rows:
    mark = '  <- chosen' if p is chosen else ''
    lines.append(f'{p["threshold"]:10.4f} {p["kept"]:6d} {p["precision"]:9.3f} '
                 f'{p["recall"]:7.3f} {p["f1"]:6.3f}{mark}')
  return '\n'.join(lines)


def plot(points, chosen, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  xs = [p['threshold'] for p in points]   # a threshold in (previous step, step] decides
                                          # as the step does: steps drawn 'pre'.
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.step(xs, [p['precision'] for p in points], where='pre', label='precision')
  ax.step(xs, [p['recall'] for p in points], where='pre', label='recall')
  ax.axvline(chosen['threshold'], color='grey', linestyle='--',
             label=f'chosen {chosen["threshold"]:.4f}')
  ax.set_xlabel('select.threshold (CLIP score: cosine - text bias)')
  ax.set_ylim(0, 1.02)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def calibrate(args):
  """Reads, sweeps, chooses, writes; returns the JSON record it wrote."""
  labels = read_labels(args.labels)
  link_weight, build_threshold = read_build_select(args.metadata)
  mentions = read_mentions(args.metadata, labels)
  check_keys(labels, mentions, args.labels, args.metadata)
  chosen_by_key = best_candidates(mentions, link_weight)
  points = curve(chosen_by_key, labels, build_threshold)
  pick = choose_threshold(points, args.min_precision)
  index = points.index(pick)
  lower = points[index - 1]['threshold'] if index else None
  final = scores_at(written_value(pick['threshold'], lower), chosen_by_key, labels)
  rule = (f'highest recall at precision >= {args.min_precision}' if args.min_precision
          is not None else 'highest F1')
  record = dict(threshold=final['threshold'], precision=final['precision'],
                recall=final['recall'], f1=final['f1'], kept=final['kept'], rule=rule,
                labelled_pairs=len(labels), build_threshold=build_threshold,
                link_weight=link_weight,
                flag=f'--config.select.threshold={final["threshold"]}')
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'select_threshold.json'), 'w') as f:
    json.dump(record, f, indent=1)
  plot(points, final, os.path.join(args.out, 'select_threshold.png'))
  print(table(points, pick))
  return record


def main(argv=None):
  try:
    record = calibrate(parse_args(sys.argv[1:] if argv is None else argv))
  except cli_errors.input_errors() as e:
    cli_errors.exit_with(PROG, e)
  print(f'chosen by {record["rule"]}: threshold {record["threshold"]} (precision '
        f'{record["precision"]:.3f}, recall {record["recall"]:.3f}, on '
        f'{record["labelled_pairs"]} labelled pairs); build with {record["flag"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
