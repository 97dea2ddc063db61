r"""Input-state checkpoint: bytes per host and the stall it puts on the
training thread, the old way (tf.data `shuffle` buffer, explicit iterator
state) against the current one (block shuffle, symbolic checkpoint).

  python benchmarks/input_checkpoint.py                    # batch 512, 224 px
  python benchmarks/input_checkpoint.py --batch 64 --shuffle_buffer 2000

The synthetic corpus is benchmarks/bench_corpus.py's (JPEGs of
--source_size px, as the I2E pipeline stores web images). Each mode builds the
training dataset as `mofi_jax.train` does, pulls --steps batches (the
prefetch and the shuffle buffer fill), then times `TfDatasetIterator.save`
(the stall: train.py calls it on the training thread before the async Orbax
save) and a restore into a fresh iterator, and checks that the next batch
after the restore equals the uninterrupted one. The last line is JSON.
"""
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
from absl import app, flags
from clu.data import dataset_iterator

from configs import common
from bench_corpus import synthetic_corpus
from mofi_jax.data import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch', 512, 'Per-host batch.')
flags.DEFINE_integer('image_size', 224, 'Training resolution.')
flags.DEFINE_integer('source_size', 256, 'Stored image size of the synthetic corpus.')
flags.DEFINE_integer('shuffle_buffer', 10_000, 'Records (base config: 10,000).')
flags.DEFINE_integer('steps', 4, 'Batches pulled before the save.')
flags.DEFINE_string('corpus', None, 'I2E corpus folder (default: synthetic).')
flags.DEFINE_multi_string('modes', ['shuffle_explicit', 'block_symbolic'],
                          'Which pipelines to measure.')


def make_iterator(corpus, mode):
  cfg = common.base_config('multitask').input
  cfg.update(image_size=FLAGS.image_size, batch_size=FLAGS.batch,
             shuffle_buffer=FLAGS.shuffle_buffer)
  real = pipeline.block_shuffle
  old = mode == 'shuffle_explicit'
  if old:   # the pipeline before: Dataset.shuffle, autotuned parallelism and prefetch
    pipeline.block_shuffle = lambda ds, n, seed: ds.shuffle(n, seed=seed)
    cfg.threads = cfg.prefetch_batches = tf.data.AUTOTUNE
  try:
    ds = pipeline.make_train_dataset(corpus, cfg, process_index=0, process_count=1,
                                     per_process_batch=FLAGS.batch)
  finally:
    pipeline.block_shuffle = real
  options = tf.data.Options()
  options.experimental_symbolic_checkpoint = not old
  options.autotune.enabled = old
  return dataset_iterator.TfDatasetIterator(ds.with_options(options), checkpoint=True)


def folder_bytes(folder):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


def measure(corpus, mode):
  it = make_iterator(corpus, mode)
  for _ in range(FLAGS.steps):
    next(it)
  time.sleep(2.0)   # let the prefetch buffer fill, as it does behind a train step
  tmp = tempfile.mkdtemp(prefix='mofi_input_ckpt_')
  try:
    start = time.perf_counter()
    it.save(os.path.join(tmp, 'process_0'))
    save_s = time.perf_counter() - start
    size = folder_bytes(tmp)
    want = next(it)
    fresh = make_iterator(corpus, mode)
    start = time.perf_counter()
    fresh.restore(os.path.join(tmp, 'process_0'))
    got = next(fresh)
    restore_s = time.perf_counter() - start
  finally:
    shutil.rmtree(tmp)
  exact = all(np.array_equal(got[k], want[k]) for k in want)
  return dict(mode=mode, bytes_per_host=size, mib_per_host=round(size / 2**20, 3),
              save_stall_s=round(save_s, 3), restore_and_first_batch_s=round(restore_s, 2),
              resume_exact=bool(exact))


def main(argv):
  del argv
  corpus = FLAGS.corpus or synthetic_corpus(FLAGS.source_size)
  results = [measure(corpus, mode) for mode in FLAGS.modes]
  for r in results:
    print(f'{r["mode"]:17s} {r["mib_per_host"]:10.3f} MiB per host, save stalls the '
          f'training thread {r["save_stall_s"]:.3f} s, restore + first batch '
          f'{r["restore_and_first_batch_s"]:.1f} s, resume exact: {r["resume_exact"]}')
  print(json.dumps(dict(batch_per_host=FLAGS.batch, image_size=FLAGS.image_size,
                        shuffle_buffer=FLAGS.shuffle_buffer, results=results)))


if __name__ == '__main__':
  app.run(main)
