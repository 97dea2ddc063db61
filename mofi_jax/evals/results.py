"""Evaluation results as JSON files beside the checkpoint they evaluate.

  <results_dir>/<eval>_<dataset>_step<N>.json      (results_dir defaults to <workdir>/eval)

The step is in the name, so results of different checkpoints never overwrite each other.
Re-running the same evaluation with the same options replaces its file (the same
checkpoint, the same numbers); different options get a suffix naming their hash, so no
earlier result is lost. Files are written to a temporary name and renamed into place.
"""
import hashlib
import json
import os
import re

import tensorflow as tf


def _slug(text):
  """`text` with anything but letters, digits, '.', '+' and '-' replaced by '-' ('_' separates
  the name's fields)."""
  return re.sub(r'[^A-Za-z0-9.+-]+', '-', str(text)).strip('-') or 'x'


def results_path(results_dir, eval_name, dataset, step, options):
  """Where results go; see the module docstring for the naming rule."""
  if not re.fullmatch(r'[a-z0-9_]+', eval_name):
    raise ValueError(f'Evaluation name {eval_name!r} must be lower-case letters, digits and _.')
  base = os.path.join(results_dir, f'{eval_name}_{_slug(dataset)}_step{int(step)}')
  path = f'{base}.json'
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      try:
        same = json.load(f).get('options') == _jsonable(options)
      except (json.JSONDecodeError, AttributeError):
        same = False
    if not same:
      digest = hashlib.sha1(json.dumps(_jsonable(options), sort_keys=True).encode()).hexdigest()
      path = f'{base}_{digest[:8]}.json'
  return path


def _jsonable(value):
  return json.loads(json.dumps(value, default=str))


def write(results_dir, *, eval_name, dataset, step, source, options, metrics):
  """Writes one evaluation's results atomically; returns the path."""
  tf.io.gfile.makedirs(results_dir)
  path = results_path(results_dir, eval_name, dataset, step, options)
  record = dict(eval=eval_name, dataset=dataset, step=int(step), source=source,
                options=_jsonable(options), metrics=_jsonable(metrics))
  tmp = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(json.dumps(record, indent=2, sort_keys=True) + '\n')
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path
