"""A sweep's results.csv (one row per run) and results.md (mean ± sample std over seeds)."""
import csv
import dataclasses
import math

import numpy as np

from mofi_jax.study import sweep_plots

CSV = 'results.csv'
# A corpus's selection figures against the ground truth (selection.selection_metrics keys).
CORPUS_KEYS = ('precision', 'recall', 'ambiguous_recall', 'distractors_removed',
               'drawn_entities_kept')
POINT_KEYS = ('point', 'x', 'link_top_k', 'corpus_entities', 'corpus_images',
              *(f'selection_{k}' for k in CORPUS_KEYS))


def write_csv(path, rows):
  point_keys = [k for k in POINT_KEYS if any(k in r for r in rows)]
  metric_keys = sorted({k for r in rows for k in r['metrics']})
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow([*point_keys, 'arm', 'seed', 'config', *metric_keys])
    for r in rows:
      writer.writerow([_cell(r.get(k)) for k in point_keys] + [r['arm'], r['seed'],
                                                               r['config_file']]
                      + [_cell(r['metrics'].get(k)) for k in metric_keys])


def read_csv(path):
  """[{column: str}] of a results.csv."""
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _cell(v):
  if v is None:
    return ''
  return f'{v:.6f}' if isinstance(v, float) else str(v)


def summarise(rows, metrics):
  """{(point, arm): {metric: (mean, sample std or nan, [values])}} in row order."""
  groups = {}
  for r in rows:
    groups.setdefault((r['point'], r['arm']), []).append(r)
  out = {}
  for key, runs in groups.items():
    out[key] = {}
    for m in metrics:
      values = [r['metrics'][m] for r in runs if m in r['metrics']]
      if values:
        v = np.asarray(values, np.float64)
        out[key][m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                       values)
  return out


def write_markdown(path, name, design, rows, metrics, *, minutes):
  metrics = [m for m in metrics if any(m in r['metrics'] for r in rows)]
  summary = summarise(rows, metrics)
  points = list(dict.fromkeys(r['point'] for r in rows))
  first = {p: next(r for r in rows if r['point'] == p) for p in points}
  found = sum(bool(r.get('found_finished')) for r in rows)
  lines = [f'# Sweep: {name}', '',
           f'- Design (mofi_jax/study/sweeps.py): `{_design_line(design)}`.',
           f'- Wall time of this invocation {minutes:.1f} min ({found} of {len(rows)} runs '
           'found finished by an earlier one; worlds built here included). Mean ± sample std '
           'over seeds; one row per run in results.csv.', '',
           '| point | x | corpus entities | corpus images | selection precision | '
           'selection recall |', '|---|---|---|---|---|---|']
  for p in points:
    r = first[p]
    x = 'none' if r['x'] is None else 'all linked' if r['x'] <= -1e8 else f'{r["x"]:g}'
    lines.append(f'| {p} | {x} | {r["corpus_entities"]} | {r["corpus_images"]} | '
                 f'{_num(r.get("selection_precision"))} | {_num(r.get("selection_recall"))} |')
  lines += ['', '| point | model | ' + ' | '.join(metrics) + ' |',
            '|---|---|' + '---|' * len(metrics)]
  for (p, arm), values in summary.items():
    cells = [_mean_std(values[m]) if m in values else 'n/a' for m in metrics]
    lines.append(f'| {p} | {arm} | ' + ' | '.join(cells) + ' |')
  lines += ['', *[f'![{png}]({png})' for png in sweep_plots.FILES[name]]]
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _design_line(design):
  fields = dataclasses.asdict(design)
  if 'corpora' in fields:
    fields['corpora'] = [c['name'] for c in fields['corpora']]
  return ', '.join(f'{k}={v}' for k, v in fields.items())


def _num(v):
  return 'n/a' if v is None else f'{v:.3f}'


def _mean_std(stat):
  mean, std, values = stat
  return f'{mean:.3f}' if len(values) < 2 else f'{mean:.3f} ± {std:.3f} (n={len(values)})'
