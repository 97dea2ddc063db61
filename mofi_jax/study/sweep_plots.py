"""A sweep's figures: each metric against the sweep's variable, one line per model, seeds as
dots and their min..max as bars. Returns the plotted means, so that tests can read them."""
import matplotlib

matplotlib.use('Agg')  # files only
import matplotlib.ticker  # pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

FILES = {'entities': ['entities_curves.png'], 'selection': ['selection_curves.png']}
CORPUS_METRICS = ('selection_precision', 'selection_recall', 'selection_ambiguous_recall')


def plot(name, out, rows, metrics):
  if name == 'entities':
    return entity_curves(f'{out}/{FILES[name][0]}', rows, metrics)
  return selection_curves(f'{out}/{FILES[name][0]}', rows, metrics)


def model_series(rows, metric, positions):
  """{arm: [(x position, mean, min, max, [seed values])]} of `metric`, points in row order;
  positions: {point: x}."""
  values = {}
  for r in rows:
    if metric in r['metrics']:
      values.setdefault(r['arm'], {}).setdefault(r['point'], []).append(r['metrics'][metric])
  return {arm: [(positions[p], float(np.mean(v)), min(v), max(v), v) for p, v in pts.items()]
          for arm, pts in values.items()}


def _broken(x, y, break_at):
  """x, y with a NaN inserted before position `break_at`: the line stops there, markers stay."""
  if break_at is None or break_at not in x:
    return x, y
  i = list(x).index(break_at)
  return np.insert(x, i, np.nan), np.insert(y, i, np.nan)


def _draw(ax, series, break_at=None, colors=None):
  """colors: {label: colour}, so that a model keeps its colour in panels that lack another."""
  for arm, pts in series.items():
    x, mean, lo, hi = (np.array([p[i] for p in pts], np.float64) for i in range(4))
    line, = ax.plot(*_broken(x, mean, break_at), marker='o', label=arm,
                    color=(colors or {}).get(arm))
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt='none', ecolor=line.get_color(),
                capsize=3, alpha=0.7)
    for xi, (*_, seeds) in zip(x, pts):
      ax.scatter([xi] * len(seeds), seeds, s=8, color=line.get_color(), alpha=0.5)


def entity_curves(path, rows, metrics):
  """One panel per metric, and a last one for each world's corpus: its selection against
  the ground truth and the share of the world's entities it kept."""
  positions = {r['point']: r['x'] for r in rows}
  shown = [m for m in metrics if any(m in r['metrics'] for r in rows)]
  cols = min(3, len(shown) + 1)
  nrows = -(-(len(shown) + 1) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 4 * nrows), squeeze=False)
  axes = axes.ravel()
  for ax in axes[len(shown) + 1:]:
    ax.axis('off')
  out = {'corpus': _corpus_panel(axes[len(shown)], rows)}
  colors = {arm: f'C{i}' for i, arm in enumerate(dict.fromkeys(r['arm'] for r in rows))}
  for ax, m in zip(axes, shown):
    out[m] = model_series(rows, m, positions)
    _draw(ax, out[m], colors=colors)
    ax.set(xscale='log', xlabel='entities in the world (log)', ylabel=m, title=m)
    _log_ticks(ax, sorted(set(positions.values())))
  axes[0].legend(fontsize=8)
  fig.suptitle('held-out categories, fixed images per entity and compute; bars = seed range')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return out


def _corpus_panel(ax, rows):
  by_point = {r['point']: r for r in rows}   # the corpus fields are the same in each row
  x = [r['x'] for r in by_point.values()]
  series = {k.replace('selection_', ''): [r.get(k) for r in by_point.values()]
            for k in CORPUS_METRICS + ('selection_drawn_entities_kept',)}
  for label, v in series.items():
    ax.plot(x, [np.nan if y is None else y for y in v], marker='o', label=label)
  ax.set(xscale='log', xlabel='entities in the world (log)', title='each world\'s I2E corpus')
  _log_ticks(ax, x)
  ax.legend(fontsize=8)
  return series


def _log_ticks(ax, x):
  ax.set_xticks(x, [f'{v:g}' for v in x])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def selection_curves(path, rows, metrics):
  """Left: the corpus against the ground truth, and its size; right: the models' metrics.
  Corpora sit at evenly spaced positions in design order (labelled by name); lines join the
  CLIP thresholds only, the other linkers stand apart."""
  points = list(dict.fromkeys(r['point'] for r in rows))
  positions = {p: i for i, p in enumerate(points)}
  first = {p: next(r for r in rows if r['point'] == p) for p in points}
  break_at = next((positions[p] for p in points if first[p].get('link_top_k')), None)
  x = np.arange(len(points), dtype=np.float64)
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  corpus = {k: [first[p].get(k) for p in points] for k in CORPUS_METRICS}
  for k, v in corpus.items():
    left.plot(*_broken(x, np.array([np.nan if y is None else y for y in v]), break_at),
              marker='o', label=k.replace('selection_', ''))
  size = left.twinx()
  size.plot(*_broken(x, np.array([first[p]['corpus_images'] for p in points], np.float64),
                     break_at), 'k--', marker='s', label='images kept')
  size.set_ylabel('images kept (dashed)')
  left.set(ylabel='against the ground truth', title='corpus')
  left.legend(fontsize=8, loc='lower left')
  out = {'corpus': corpus}
  for m in [m for m in metrics if any(m in r['metrics'] for r in rows)]:
    out[m] = model_series(rows, m, positions)
    _draw(right, {f'{arm} {m}': s for arm, s in out[m].items()}, break_at)
  right.set(title='models trained on each corpus (held-out set)', ylabel='metric')
  right.legend(fontsize=8)
  for ax in (left, right):
    ax.set_xticks(range(len(points)), points, rotation=25, ha='right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return out
