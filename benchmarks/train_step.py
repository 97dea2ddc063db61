r"""Train-step throughput: images/s, achieved FLOP/s (compiler cost analysis) and
MFU against a matmul peak measured on the same machine, in the model's dtype.
Two MFUs: the compiler's FLOPs (everything the step executes, remat included)
and the model's FLOPs (step_analysis.model_flops: 3x the forward matmuls, the
PaLM definition) over step time x peak.

  python benchmarks/train_step.py --config configs/mofi_b16.py:supervised \
      --config.model.image.variant=S/16 --config.model.dtype=float32 \
      --config.model.remat=none --config.input.batch_size=32 \
      --config.model.head.num_classes=1000 --config.model.head.pad_multiple=1024 \
      --config.model.attention=head_major --config.loss.head_dtype=float32

(The paper configs default to TPU settings: the splash kernel, which runs only
on TPU, and a bf16 entity head.)

Feeds random batches (no input pipeline), so it measures the model and loss.
The layer stack is unrolled (model.scan=False) unless --keep_scan: XLA's cost
analysis counts a while-loop body once, so a scanned stack would report ~1/depth
of the real FLOPs and a meaningless MFU.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mofi_jax import run_setup, sharding, step_analysis, telemetry, trainer
from mofi_jax.models import mofi

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file[:variant].')
flags.DEFINE_integer('steps', 10, 'Timed steps (after one warm-up step).')
flags.DEFINE_integer('matmul_size', 4096,
                     'Square matmul size for the peak; 0 skips the peak and MFU.')
flags.DEFINE_integer('vocab_size', 49408, 'Text vocabulary if the config has -1.')
flags.DEFINE_integer('num_classes', 1000, 'Entity classes if the config has -1.')
flags.DEFINE_bool('keep_scan', False, 'Keep model.scan from the config.')
flags.DEFINE_string('profile_dir', None,
                    'Also trace one more step with jax.profiler (Perfetto trace) here.')


def measure_matmul_peak(n, dtype, reps=10):
  """Best-of FLOP/s of an n x n x n matmul in `dtype` on each device, times the devices."""
  return telemetry.measured_matmul_flops(jax.devices()[0], dtype, n=n, reps=reps) * (
      jax.device_count())


def random_batch(config, num_classes, vocab):
  rng = np.random.default_rng(0)
  b, s = config.input.batch_size, config.input.image_size
  k, l = config.input.max_entities, config.input.text_len
  labels = rng.integers(0, num_classes, (b, k)).astype(np.int32)
  text = rng.integers(1, vocab, (b, l)).astype(np.int32)
  return dict(image=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),   # as train feeds
              labels=labels, label_weights=np.full((b, k), 1 / k, np.float32),
              text=text)


def flops_of(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def main(argv):
  del argv
  config = FLAGS.config
  with config.unlocked():
    if config.model.text.vocab_size == -1:
      config.model.text.vocab_size = FLAGS.vocab_size
    if config.model.head.num_classes == -1:
      config.model.head.num_classes = FLAGS.num_classes
    if not FLAGS.keep_scan:
      config.model.scan = False
  num_classes = config.model.head.num_classes
  mesh = sharding.make_mesh(config.mesh)
  run_setup.check_attention_platform(config, mesh)
  sharding.activate(mesh)
  setup = trainer.build(config, mesh)
  state = setup.init(mesh, config.seed)
  batch = sharding.global_batch(mesh, random_batch(
      config, num_classes, config.model.text.vocab_size))
  t = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  flops = flops_of(compiled)
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready((state, m))
  step_s = (time.perf_counter() - t) / FLAGS.steps
  if FLAGS.profile_dir:
    with jax.profiler.trace(FLAGS.profile_dir, create_perfetto_trace=True):
      state, m = compiled(state, batch)
      jax.block_until_ready((state, m))
  dtype = jnp.bfloat16 if config.model.dtype == 'bfloat16' else jnp.float32
  peak = FLAGS.matmul_size and measure_matmul_peak(FLAGS.matmul_size, dtype)
  image = mofi.image_kwargs(config.model.image)
  print(f'config: mode={config.model.mode} image={image.get("variant") or image} '
        f'{config.input.image_size}px batch={config.input.batch_size} '
        f'classes={num_classes} dtype={config.model.dtype} '
        f'devices={jax.device_count()} ({jax.devices()[0].platform})')
  print(f'compile_s={compile_s:.1f} step_s={step_s:.4f} '
        f'images_per_s={config.input.batch_size / step_s:.1f}')
  model_flops = step_analysis.model_flops(config)
  if not peak:
    print(f'flops_per_step={flops:.4g} achieved_flops_per_s={flops / step_s:.4g} '
          f'model_flops_per_step={model_flops:.4g}')
    return
  print(f'flops_per_step={flops:.4g} achieved_flops_per_s={flops / step_s:.4g} '
        f'matmul_peak_flops_per_s={peak:.4g} mfu={flops / step_s / peak:.3f}')
  print(f'model_flops_per_step={model_flops:.4g} '
        f'model_mfu={model_flops / step_s / peak:.3f}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
