"""The demo at notebook scale: one corpus and one small run, shared by the notebooks.

  corpus = demo.ensure_corpus(root)            # raw web pairs -> Beam I2E pipeline
  config = demo.run_config(corpus, steps=150)  # configs/demo.py on that corpus
  workdir = demo.ensure_run(root, config)      # trains unless a finished run exists

Both are idempotent, so every notebook can start from nothing and later notebooks
reuse what earlier ones built.
"""
import os

import jax

from configs import demo as demo_config
from data_prep import demo_world

# Smaller than the default demo world: the notebooks run top to bottom in CI.
NOTEBOOK_WORLD = dict(builder='i2e', num_entities=120, images_per_entity=30,
                      retrieval_categories=20)


def ensure_corpus(root, **overrides):
  """Path of the I2E demo corpus under `root` (built by the Beam pipeline if missing)."""
  cfg = dict(NOTEBOOK_WORLD, **overrides)
  return demo_world.ensure_corpus(os.path.join(root, 'corpus'), cfg)


def run_config(corpus, steps=150, mode='multitask'):
  c = demo_config.get_config(mode)
  c.input.data_dir = corpus
  c.input.recipe = None
  c.total_steps = steps
  c.log_every = max(1, steps // 15)
  c.optim.warmup_steps = max(1, steps // 7)
  c.ckpt.update(every_steps=steps, keep=1)
  for ev in c.evals.values():
    ev.every_steps = max(1, steps // 3)
  return c


def ensure_run(root, config, name='run'):
  """Workdir of a finished run of `config` under `root`; trains (or resumes) if needed."""
  from mofi_jax import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, name)
  if not os.path.isdir(os.path.join(workdir, 'checkpoints', str(config.total_steps))):
    train.train_and_evaluate(config, workdir)
    jax.set_mesh(None)
  return workdir
