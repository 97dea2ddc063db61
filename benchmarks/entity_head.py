r"""The 2M-way entity loss, forward + backward, on 8 simulated CPU devices:
the class-sharded tiled loss against two baselines on the same sharded inputs.

  python benchmarks/entity_head.py                # C=2,000,000, batch 128, dim 64

  tiled   losses.entity_xent_sharded (the library's loss: online log-sum-exp
          over tiles, logits recomputed in the backward pass)
  floor   the bare matmuls any exact method needs, per device on its class
          shard: logits = x W, then dx = g W^T and dW = x^T g (3 matmuls; the
          [batch, C/8] logits are stored between them)
  naive   dense logits + optax softmax cross-entropy, jitted with the same
          shardings and left to GSPMD

Prints, per variant: the best time of --reps runs, the compiled per-device
temporaries (memory_analysis), and the measured peak of the process's resident
memory while the runs execute, above what it was just before them (sampled
every millisecond; each variant runs in its own process).
The tiled loss computes the logits twice (the forward pass keeps only the
log-sum-exp), so on matmul-bound hardware it needs 4/3 of the floor's FLOPs.
"""
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from mofi_jax import losses, sharding

FLAGS = flags.FLAGS
flags.DEFINE_integer('classes', 2_000_000, 'Entity classes C.')
flags.DEFINE_integer('batch', 128, 'Global batch.')
flags.DEFINE_integer('dim', 64, 'Embedding dimension.')
flags.DEFINE_integer('tile', 8192, 'Classes per tile of the tiled loss.')
flags.DEFINE_integer('reps', 3, 'Timed runs (after one warm-up run).')
flags.DEFINE_string('variant', None, 'Run one variant here and print JSON '
                    '(used by the parent process).')
VARIANTS = ('tiled', 'floor', 'naive')


def rss_bytes():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


class PeakRss:
  """Samples this process's resident memory in a thread while active."""

  def __enter__(self):
    self.base = self.peak = rss_bytes()
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._done.wait(0.001):
      self.peak = max(self.peak, rss_bytes())

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()

  @property
  def growth(self):
    return self.peak - self.base


def inputs(mesh):
  rng = np.random.default_rng(0)
  b, d, c = FLAGS.batch, FLAGS.dim, FLAGS.classes
  rows = NamedSharding(mesh, P(sharding.mesh_axes('batch')))
  cols = NamedSharding(mesh, P(None, sharding.mesh_axes('classes')))
  bias_sh = NamedSharding(mesh, P(sharding.mesh_axes('classes')))
  x = jax.device_put(rng.normal(size=(b, d)).astype(np.float32), rows)
  kernel = jax.device_put((rng.normal(size=(d, c)) * 0.05).astype(np.float32), cols)
  bias = jax.device_put(np.zeros(c, np.float32), bias_sh)
  labels = jax.device_put(rng.integers(0, c, (b,)).astype(np.int32), rows)
  return x, kernel, bias, labels


def tiled_fn(mesh):
  def loss(x, kernel, bias, labels):
    return losses.entity_xent_sharded(
        x, kernel, bias, labels[:, None], jnp.ones((labels.shape[0], 1)),
        num_classes=FLAGS.classes, mesh=mesh, tile_size=FLAGS.tile)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def naive_fn(mesh):
  del mesh
  def loss(x, kernel, bias, labels):
    logits = x @ kernel + bias
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def floor_fn(mesh):
  """x W, then g W^T and x^T g on each device's class shard; g stands for the
  softmax gradient (one cheap elementwise op on the stored logits)."""
  batch, classes = sharding.mesh_axes('batch'), sharding.mesh_axes('classes')
  gather = tuple(a for a in batch if a in classes)

  def local(x, w, bias):
    x = jax.lax.all_gather(x, gather, axis=0, tiled=True)
    logits = x @ w + bias
    g = logits * (1.0 / x.shape[0])
    dx = jax.lax.psum_scatter(g @ w.T, gather, scatter_dimension=0, tiled=True)
    return jnp.sum(logits[:, 0]), dx, x.T @ g, g.sum(0)

  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(batch), P(None, classes), P(classes)),
                     out_specs=(P(), P(batch), P(None, classes), P(classes)),
                     check_vma=False)
  return jax.jit(lambda x, w, b, labels: fn(x, w, b))


def run_variant(name):
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, model=1))
  args = inputs(mesh)
  fn = {'tiled': tiled_fn, 'floor': floor_fn, 'naive': naive_fn}[name](mesh)
  compiled = fn.lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  with PeakRss() as rss:
    jax.block_until_ready(compiled(*args))
    best = float('inf')
    for _ in range(FLAGS.reps):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      best = min(best, time.perf_counter() - t)
  return dict(variant=name, seconds=best, temp_bytes_per_device=temp,
              peak_rss_growth_bytes=rss.growth)


def main(argv):
  del argv
  if FLAGS.variant:
    print(json.dumps(run_variant(FLAGS.variant)))
    return
  results = {}
  for name in VARIANTS:
    cmd = [sys.executable, __file__, f'--variant={name}'] + [
        a for a in sys.argv[1:] if not a.startswith('--variant')]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    results[name] = json.loads(out.stdout.strip().splitlines()[-1])
  print(f'entity loss fwd+bwd: C={FLAGS.classes:,} batch={FLAGS.batch} '
        f'dim={FLAGS.dim} tile={FLAGS.tile}, 8 simulated CPU devices '
        f'({os.cpu_count()} cores)')
  floor = results['floor']['seconds']
  for name, r in results.items():
    print(f'{name:6s} {r["seconds"]:.3f} s ({r["seconds"] / floor:.2f}x floor)  '
          f'temporaries {r["temp_bytes_per_device"] / 2**20:8.1f} MiB/device  '
          f'peak RSS growth {r["peak_rss_growth_bytes"] / 2**20:8.1f} MiB')


if __name__ == '__main__':
  app.run(main)
