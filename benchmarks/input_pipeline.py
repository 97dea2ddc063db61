r"""Input pipeline throughput: images/s per vCPU of read + decode + augment +
batch at 224 px from an I2E TFRecord corpus, and how that compares with what
a TPU host must feed (from `python -m mofi_jax.aot` reports).

  python benchmarks/input_pipeline.py --threads 1 \
      --aot_report /tmp/pod_table/mofi_b16_v5e-256.json

With no --corpus, a synthetic corpus in the production format is written once
to /tmp/mofi_bench_corpus_<size>px (JPEGs of --source_size px, the real
pipeline's input: web images are stored re-encoded, short side >= 224).
--threads 1 runs the whole tf.data graph on one thread. The per-vCPU figure is
images per second of the process's CPU time (all threads), which holds on a
shared machine where wall-clock rates depend on the neighbours' load; the
wall-clock rate is printed too. A TPU host must supply per-host batch / step
time images/s; the ratio printed is (per-vCPU rate x the host's vCPUs) / that
need.
"""
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
from absl import app, flags

from configs import common
from mofi_jax import tpu_specs
from bench_corpus import synthetic_corpus
from mofi_jax.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string('corpus', None, 'I2E corpus folder (default: synthetic).')
flags.DEFINE_integer('source_size', 256, 'Stored image size of the synthetic corpus.')
flags.DEFINE_integer('image_size', 224, 'Training resolution.')
flags.DEFINE_integer('batch', 64, 'Batch size.')
flags.DEFINE_integer('batches', 30, 'Timed batches (after --warmup).')
flags.DEFINE_integer('warmup', 5, 'Untimed batches first (fills the shuffle buffer).')
flags.DEFINE_integer('threads', 1, 'tf.data threads (1: the per-vCPU figure).')
flags.DEFINE_multi_string('aot_report', [], 'JSON written by mofi_jax.aot --json.')


def dataset(corpus):
  cfg = common.base_config('multitask').input
  cfg.update(image_size=FLAGS.image_size, batch_size=FLAGS.batch,
             shuffle_buffer=512)
  ds = pipeline.make_train_dataset(corpus, cfg, process_index=0, process_count=1,
                                   per_process_batch=FLAGS.batch)
  options = tf.data.Options()
  options.threading.private_threadpool_size = FLAGS.threads
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def images_per_s(ds):
  """(images per wall-clock second, images per CPU second)."""
  it = iter(ds)
  for _ in range(FLAGS.warmup):
    next(it)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(FLAGS.batches):
    batch = next(it)
  batch['image'].numpy()
  images = FLAGS.batches * FLAGS.batch
  return (images / (time.perf_counter() - wall),
          images / (time.process_time() - cpu))


def host_ratio(report_path, per_vcpu):
  with open(report_path) as f:
    r = json.load(f)
  if 'images_per_s_per_host' not in r:
    raise ValueError(f'{report_path}: no step time (run mofi_jax.aot with --cost)')
  chip = tpu_specs.CHIPS[r['chip']['name']]
  need = r['images_per_s_per_host']
  supply = per_vcpu * chip.host_vcpus
  return (f'{r["config"]} on {r["topology"]["slice"]}: a host must feed '
          f'{need:,.0f} images/s ({r["global_batch"] // r["topology"]["hosts"]} '
          f'per host / {r["step_time"]["seconds"]:.3f} s step); {chip.host_vcpus} '
          f'vCPUs x {per_vcpu:.0f} = {supply:,.0f} images/s: {supply / need:.1f}x '
          f'the need ({need / per_vcpu:.0f} vCPUs busy)')


def main(argv):
  del argv
  corpus = FLAGS.corpus or synthetic_corpus(FLAGS.source_size)
  rate, per_vcpu = images_per_s(dataset(corpus))
  print(f'input pipeline: {corpus} -> {FLAGS.image_size}px, batch {FLAGS.batch}, '
        f'{FLAGS.threads} thread(s) on a {os.cpu_count()}-vCPU host: '
        f'{rate:.1f} images/s wall-clock; {per_vcpu:.1f} images per CPU-second '
        f'= per vCPU (target >= 100)')
  for path in FLAGS.aot_report:
    print(host_ratio(path, per_vcpu))


if __name__ == '__main__':
  app.run(main)
