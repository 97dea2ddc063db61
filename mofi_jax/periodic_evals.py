"""Runs the config's evaluators (`config.evals.<name>`) during training and
writes their results through CLU and to `<workdir>/eval_results.jsonl`."""
import json
import os

import jax
import tensorflow as tf
from absl import logging

from mofi_jax import evals


def from_config(config, *, data_dir, workdir):
  """{name: (evaluator, every_steps)}; paths may use {data_dir} and {workdir}."""
  out = {}
  for name, cfg in config.evals.items():
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.data_dir = cfg.data_dir.format(data_dir=data_dir, workdir=workdir)
    evaluator = evals.get_evaluator(cfg.type)(cfg, image_size=config.input.image_size)
    out[name] = (evaluator, int(cfg.every_steps))
  return out


def due(evaluators, step, last=False):
  return [name for name, (_, every) in evaluators.items()
          if last or step == 0 or step % every == 0]


def run(evaluators, names, step, embed_fn, writer, workdir):
  for name in names:
    results = evaluators[name][0].run(embed_fn)
    scalars = {f'{name}/{k}': float(v) for k, v in results.items()}
    writer.write_scalars(step, scalars)
    logging.info('eval %s at step %d: %s', name, step, scalars)
    if jax.process_index() == 0:
      with tf.io.gfile.GFile(os.path.join(workdir, 'eval_results.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, 'eval': name, **results}) + '\n')
