r"""Cost of the checkpoint checksums (mofi_jax/checkpoint_checks.py) on the
demo's train state and on a 1 GB state, against the Orbax save of the same
state, on 8 simulated CPU devices (each hashes the shard it holds).

  python benchmarks/checkpoint_integrity.py            # demo state + 1 GiB
  python benchmarks/checkpoint_integrity.py --gib 4

Prints one line per state and a JSON line last. `checksum_s` is the median of
--repeats calls after a compile; `orbax_save_s` a synchronous save to /tmp.
"""
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import demo
from mofi_jax import checkpoint_checks, sharding, trainer

FLAGS = flags.FLAGS
flags.DEFINE_float('gib', 1.0, 'Size of the large synthetic state.')
flags.DEFINE_integer('repeats', 5, 'Timed checksum calls.')


def demo_state():
  c = demo.get_config('multitask')
  c.model.head.num_classes = 300
  c.model.text.vocab_size = 1000
  mesh = sharding.make_mesh(c.mesh)
  sharding.activate(mesh)
  return trainer.build(c, mesh).init(mesh, seed=0)


def large_state(gib):
  """float32 [rows, 4096] leaves of 256 MiB, sharded over all 8 devices."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  leaf_rows = 2**26 // 4096   # 256 MiB per leaf
  n = max(1, round(gib * 4))
  make = jax.jit(lambda k: jax.random.normal(k, (leaf_rows, 4096), jnp.float32),
                 out_shardings=NamedSharding(mesh, P('fsdp', None)))
  return {f'w{i}': make(jax.random.key(i)) for i in range(n)}


def nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_checksums(tree):
  checkpoint_checks.checksums(tree)   # compile
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    checkpoint_checks.checksums(tree)
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_orbax_save(tree):
  tmp = tempfile.mkdtemp(prefix='mofi_ckpt_bench_')
  try:
    start = time.perf_counter()
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, 'state'), tree)
    ckptr.wait_until_finished()
    return time.perf_counter() - start
  finally:
    shutil.rmtree(tmp)


def main(argv):
  del argv
  rows = []
  for name, tree in (('demo train state', demo_state()),
                     (f'{FLAGS.gib:g} GiB state', large_state(FLAGS.gib))):
    size = nbytes(tree)
    check_s, save_s = time_checksums(tree), time_orbax_save(tree)
    rows.append(dict(state=name, bytes=size, arrays=len(jax.tree.leaves(tree)),
                     checksum_s=round(check_s, 4), orbax_save_s=round(save_s, 2),
                     checksum_gib_per_s=round(size / 2**30 / check_s, 2),
                     checksum_over_save=round(check_s / save_s, 4)))
    r = rows[-1]
    print(f'{name}: {size / 2**20:,.1f} MiB in {r["arrays"]} arrays; checksums '
          f'{r["checksum_s"] * 1e3:.1f} ms ({r["checksum_gib_per_s"]} GiB/s over '
          f'{jax.device_count()} devices), Orbax save {save_s:.2f} s: checksums add '
          f'{100 * r["checksum_over_save"]:.1f}% of the save')
    jax.set_mesh(None)
    del tree
  print(json.dumps(dict(devices=jax.device_count(), cpus=os.cpu_count(), rows=rows)))


if __name__ == '__main__':
  app.run(main)
