"""Figures for notebooks: image grids, entity-frequency histograms, live training curves.

Everything returns or shows matplotlib figures; nothing here is needed to train.
"""
import io
import os
import threading

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from mofi_jax.study import report


def _as_array(image):
  if isinstance(image, (bytes, bytearray)):
    return np.asarray(Image.open(io.BytesIO(image)).convert('RGB'))
  image = np.asarray(image)
  if image.dtype != np.uint8:   # CLIP-normalised float -> displayable
    image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
  return image


def image_grid(images, titles=None, ncols=5, size=2.2, fontsize=7):
  """images: encoded bytes or arrays; titles: one string per image (may hold newlines)."""
  n = len(images)
  nrows = max(1, int(np.ceil(n / ncols)))
  fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.25),
                           squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis('off')
    if i < n:
      ax.imshow(_as_array(images[i]))
      if titles:
        ax.set_title(titles[i], fontsize=fontsize)
  fig.tight_layout()
  return fig


def entity_histogram(counts, title='images per entity (most frequent first)'):
  counts = np.asarray(counts)
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
  ax1.bar(np.arange(len(counts)), counts, width=1.0)
  ax1.set(xlabel='class index', ylabel='images', title=title)
  ax2.hist(counts, bins=30)
  ax2.set(xlabel='images per entity', ylabel='entities', title='entity-frequency histogram')
  fig.tight_layout()
  return fig


def training_curves(workdir, metrics=('train/loss',), evals=('retrieval/map',)):
  """Loss and eval curves read from what a run in `workdir` has written so far."""
  fig, axes = plt.subplots(1, len(metrics) + len(evals), figsize=(5 * (len(metrics) + len(evals)), 3.5),
                           squeeze=False)
  series = [(m, report.scalar_curve(workdir, m)) for m in metrics]
  series += [(e, _safe_eval_curve(workdir, e)) for e in evals]
  for ax, (name, points) in zip(axes.flat, series):
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, marker='o' if len(points) < 20 else None)
    ax.set(title=name, xlabel='step')
  fig.tight_layout()
  return fig


def _safe_eval_curve(workdir, key):
  # Nothing evaluated yet: no eval_results.jsonl.
  if not os.path.exists(os.path.join(workdir, 'eval_results.jsonl')):
    return []
  return report.eval_curve(workdir, key)


def train_with_live_curves(train_fn, workdir, refresh_s=10.0, **curve_kw):
  """Runs `train_fn()` in a thread and redraws the curves until it ends; re-raises its error."""
  from IPython import display  # pylint: disable=g-import-not-at-top
  errors = []

  def target():
    try:
      train_fn()
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  while thread.is_alive():
    thread.join(refresh_s)
    display.clear_output(wait=True)
    fig = training_curves(workdir, **curve_kw)
    display.display(fig)
    plt.close(fig)
  if errors:
    raise errors[0]
