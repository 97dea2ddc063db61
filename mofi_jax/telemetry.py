"""What a training run reports besides its TensorBoard events: metrics.jsonl and throughput.

metrics.jsonl (process 0, in the workdir beside the event files): one JSON object a line,
{"step": s, "<name>": value, ...}, every scalar the run writes (train/, perf/, evals), as
big_vision's metrics and open_clip's results.jsonl keep them. A resumed run first drops the
lines of steps after the one it restored (the interrupted run wrote them; they will be
written again), so the file reads as one run's.

Weights & Biases (`WandbWriter`, config.log.wandb.enabled; wandb is imported only then, on
process 0): every scalar and the hyperparameters go to a W&B run in <workdir>/wandb/. The
run id is kept in <workdir>/wandb_run_id, so a resumed run continues the same W&B run
(resume='allow'); W&B keeps the first value logged at a step, so the steps an interrupted
run logged after its last checkpoint keep that run's values. `mode` '' leaves WANDB_MODE
(or W&B's default) in charge; 'offline' writes the run files only (`wandb sync` uploads
them later).

Throughput (`Throughput`), logged each log interval under perf/:
  images_per_s, images_per_s_per_chip   global batch x steps / wall time of the interval
  tflops_per_chip                       model FLOPs (step_analysis.model_flops: 3x the
                                        forward matmuls, no remat) x steps / wall / chips
  mfu                                   tflops_per_chip / the chip's peak:
                                        config.log.peak_flops_per_chip if > 0; else
                                        tpu_specs for a TPU; else (CPU, GPU) the rate of a
                                        square matmul in the model's dtype measured on one
                                        device at start-up (logged once as
                                        perf/peak_tflops_per_chip); absent if -1
  input_wait_share                      time in the input feed's next() / wall time: the
                                        share of the interval spent waiting for batches
"""
import contextlib
import json
import os
import secrets
import string
import time

import jax
from clu import metric_writers
from clu.metric_writers import interface

from mofi_jax import step_analysis, tpu_specs

METRICS_FILE = 'metrics.jsonl'
# jax Device.device_kind -> tpu_specs chip (most specific first).
_TPU_KINDS = (('v6 lite', 'v6e'), ('v6e', 'v6e'), ('v5 lite', 'v5e'), ('v5e', 'v5e'),
              ('v5p', 'v5p'), ('v5', 'v5p'), ('v4', 'v4'))


def _plain(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)


class _ScalarWriter(interface.MetricWriter):
  """A MetricWriter that keeps scalars (and hparams) only: the rest is TensorBoard's."""

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata

  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_texts(self, step, texts):
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def write_hparams(self, hparams):
    del hparams

  def flush(self):
    pass


class JsonlWriter(_ScalarWriter):
  """CLU MetricWriter appending scalars to <workdir>/metrics.jsonl (see the docstring)."""

  def __init__(self, workdir, first_step=0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self._drop_after(first_step)
    self._file = open(self.path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def _drop_after(self, step):
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding='utf-8') as f:
      kept = [line for line in f if (s := _step_of(line)) is not None and s <= step]
    tmp = f'{self.path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write_scalars(self, step, scalars):
    record = {'step': int(step), **{k: _plain(v) for k, v in sorted(scalars.items())}}
    self._file.write(json.dumps(record, sort_keys=False) + '\n')
    self._file.flush()


  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def _step_of(line):
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None   # a line cut short by a kill: dropped


class WandbWriter(_ScalarWriter):
  """CLU MetricWriter logging scalars and hyperparameters to W&B (see the docstring)."""
  RUN_ID_FILE = 'wandb_run_id'

  def __init__(self, workdir, cfg):
    import wandb  # pylint: disable=import-outside-toplevel
    path = os.path.join(workdir, self.RUN_ID_FILE)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        run_id = f.read().strip()
    else:
      # W&B's id alphabet (lowercase letters and digits), drawn here: wandb 0.31 has no
      # public generator.
      run_id = ''.join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
      with open(path, 'w', encoding='utf-8') as f:
        f.write(run_id + '\n')
    self._run = wandb.init(project=cfg.get('project') or 'mofi_jax',
                           entity=cfg.get('entity') or None, name=cfg.get('name') or None,
                           id=run_id, resume='allow', dir=workdir,
                           mode=cfg.get('mode') or None)

  def write_scalars(self, step, scalars):
    self._run.log({k: _plain(v) for k, v in scalars.items()}, step=int(step))

  def write_hparams(self, hparams):
    self._run.config.update(dict(hparams), allow_val_change=True)

  def close(self):
    self._run.finish()


def create_writer(workdir, first_step, log_config=None):
  """TensorBoard + logging (CLU's default writer); on process 0 also metrics.jsonl, and
  W&B when log_config.wandb.enabled."""
  default = metric_writers.create_default_writer(workdir,
                                                 just_logging=jax.process_index() > 0)
  if jax.process_index() > 0:
    return default
  writers = [default, JsonlWriter(workdir, first_step)]
  wandb_cfg = (log_config or {}).get('wandb') or {}
  if wandb_cfg.get('enabled'):
    writers.append(WandbWriter(workdir, wandb_cfg))
  return metric_writers.MultiWriter(writers)


def chip_peak_flops(devices, configured=0.0, measure=None):
  """Peak FLOP/s of one device: config.log.peak_flops_per_chip when > 0; None when -1 (no
  MFU); else tpu_specs' bf16 peak for a TPU, else `measure(device)` (CPU, GPU), else None."""
  if configured > 0:
    return float(configured)
  if configured < 0:
    return None
  kind = devices[0].device_kind.lower() if devices[0].platform == 'tpu' else ''
  for needle, chip in _TPU_KINDS:
    if needle in kind:
      return tpu_specs.CHIPS[chip].peak_bf16_flops
  return None if measure is None or devices[0].platform == 'tpu' else measure(devices[0])


# Matmul sizes for the measured peak: big enough to reach the device's rate, small enough
# to take well under a second at start-up.
MATMUL_SIZES = {'cpu': 1024, 'gpu': 8192}


def measured_matmul_flops(device, dtype='float32', n=None, reps=5, clock=time.perf_counter):
  """Best-of-`reps` FLOP/s of an [n, n] @ [n, n] matmul in `dtype` on `device`."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = n or MATMUL_SIZES.get(device.platform, 2048)
  # From the host, not jnp.ones: under a multi-process mesh (jax.set_mesh) that would be a
  # global array spanning other processes' devices.
  x = jax.device_put(np.ones((n, n), jnp.dtype(dtype)), device)
  matmul = jax.jit(lambda a: a @ a)
  best = float('inf')
  with jax.set_mesh(None):   # one device, not the run's mesh (restored on exit)
    matmul(x).block_until_ready()   # compile
    for _ in range(reps):
      start = clock()
      matmul(x).block_until_ready()
      best = min(best, clock() - start)
  return 2 * n ** 3 / best


class Throughput:
  """Images/s, TFLOP/s and MFU per chip, and the input-wait share, per log interval."""

  def __init__(self, config, devices, first_step):
    self.batch = config.input.batch_size
    self.chips = len(devices)
    self.flops_per_step = step_analysis.model_flops(config)
    dtype = config.get('model', {}).get('dtype', 'float32')
    self.peak = chip_peak_flops(devices, config.get('log', {}).get('peak_flops_per_chip', 0.0),
                                # this process's own device: others' are not addressable
                                measure=lambda _: measured_matmul_flops(jax.local_devices()[0],
                                                                        dtype))
    self._peak_logged = False
    self.restart(first_step)

  def restart(self, step):
    """Starts the next interval at `step`, now (after an eval or a save, whose time is
    not the training step's)."""
    self._step, self._time, self._waiting = step, time.perf_counter(), 0.0

  @contextlib.contextmanager
  def waiting_for_input(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._waiting += time.perf_counter() - start

  def report(self, step):
    """perf/ scalars since the last report (call after the step's results are ready)."""
    now = time.perf_counter()
    wall, steps = max(now - self._time, 1e-9), step - self._step
    flops_per_chip = self.flops_per_step * steps / wall / self.chips
    out = {'perf/images_per_s': self.batch * steps / wall,
           'perf/images_per_s_per_chip': self.batch * steps / wall / self.chips,
           'perf/tflops_per_chip': flops_per_chip / 1e12,
           'perf/input_wait_share': self._waiting / wall}
    if self.peak:
      out['perf/mfu'] = flops_per_chip / self.peak
      if not self._peak_logged:
        out['perf/peak_tflops_per_chip'] = self.peak / 1e12
        self._peak_logged = True
    self.restart(step)
    return out
