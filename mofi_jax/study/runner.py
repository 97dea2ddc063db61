"""Trains and evaluates a list of study runs, each in its own workdir; finished ones are
skipped, so a killed study resumes where it stopped (each run resumes from its checkpoints)."""
import os
import time

import jax

from mofi_jax import inference, train
from mofi_jax.study import report


def say(msg):
  print(f'[study {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def train_all(runs, root, log=say):
  """Trains and evaluates every run under {root}/runs/; returns [{'arm', 'seed', 'workdir',
  'found_finished', 'config_file', 'metrics'}] (found_finished: by an earlier invocation)."""
  rows, durations = [], []
  for i, run in enumerate(runs):
    workdir = os.path.join(root, 'runs', run.arm, f'seed{run.seed}')
    eta = (sum(durations) / len(durations) * (len(runs) - i)) if durations else None
    log(f'model {i + 1}/{len(runs)}: {run.name} - training {run.config.total_steps} steps'
        + (f' (about {eta / 60:.1f} min left)' if eta else ''))
    start = time.time()
    found = finished(workdir, run.config.total_steps)
    if not found:
      train.train_and_evaluate(run.config, workdir)
    durations.append(time.time() - start)
    jax.set_mesh(None)
    rows.append(dict(arm=run.arm, seed=run.seed, workdir=workdir, found_finished=found,
                     config_file=os.path.join(workdir, inference.CONFIG_FILE),
                     metrics=report.final_metrics(workdir)))
  return rows


def finished(workdir, total_steps):
  ckpts = os.path.join(workdir, 'checkpoints', str(total_steps))
  return os.path.isdir(ckpts) and os.path.exists(os.path.join(workdir, 'eval_results.jsonl'))
