"""Collects each run's metrics and writes results.csv, results.md and the plots.

Metrics come from what training already wrote: `eval_results.jsonl` (the
evaluators' results at each eval step) and the TensorBoard event file (train
loss curves). Nothing is recomputed here except the t-SNE embeddings.
"""
import csv
import glob
import json
import os

import numpy as np
import tensorflow as tf


def final_metrics(workdir):
  """{'<eval>/<metric>': value} from the last step each evaluator ran at."""
  path = os.path.join(workdir, 'eval_results.jsonl')
  last = {}
  with tf.io.gfile.GFile(path) as f:
    for line in f:
      row = json.loads(line)
      name = row.pop('eval')
      step = row.pop('step')
      if step >= last.get(name, (-1, None))[0]:
        last[name] = (step, row)
  return {f'{name}/{k}': float(v) for name, (_, row) in sorted(last.items())
          for k, v in row.items() if isinstance(v, (int, float))}


def eval_curve(workdir, key):
  """[(step, value)] of one '<eval>/<metric>' over training."""
  name, metric = key.split('/', 1)
  out = []
  with tf.io.gfile.GFile(os.path.join(workdir, 'eval_results.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      if row['eval'] == name and metric in row:
        out.append((row['step'], float(row[metric])))
  return sorted(out)


def scalar_curve(workdir, tag):
  """[(step, value)] of a scalar CLU wrote to TensorBoard (e.g. 'train/loss')."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          v = (tf.make_ndarray(value.tensor) if value.HasField('tensor')
               else value.simple_value)
          out.append((int(event.step), float(np.asarray(v))))
  return sorted(out)


def aggregate(rows):
  """rows: [{'arm', 'seed', metrics...}] -> {arm: {metric: (mean, std, n)}}."""
  arms = {}
  for row in rows:
    arms.setdefault(row['arm'], []).append(row)
  out = {}
  for arm, runs in arms.items():
    keys = sorted({k for r in runs for k in r['metrics']})
    out[arm] = {}
    for k in keys:
      values = np.array([r['metrics'][k] for r in runs if k in r['metrics']], np.float64)
      std = float(values.std(ddof=1)) if len(values) > 1 else float('nan')
      out[arm][k] = (float(values.mean()), std, len(values))
  return out


def write_csv(path, rows):
  keys = sorted({k for r in rows for k in r['metrics']})
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['arm', 'seed', 'config', *keys])
    for r in rows:
      writer.writerow([r['arm'], r['seed'], r['config_file'],
                       *[_fmt(r['metrics'].get(k)) for k in keys]])


def _fmt(v):
  return '' if v is None else f'{v:.6f}'


def write_markdown(path, summary, *, metrics, header, arm_order):
  lines = [header, '', '| model | ' + ' | '.join(metrics) + ' |',
           '|---|' + '---|' * len(metrics)]
  for arm in arm_order:
    if arm not in summary:
      continue
    cells = []
    for k in metrics:
      if k in summary[arm]:
        mean, std, n = summary[arm][k]
        cells.append(f'{mean:.3f} ± {std:.3f} (n={n})' if n > 1 else f'{mean:.3f}')
      else:
        cells.append('n/a')
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
