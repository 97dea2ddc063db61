"""Training batches from a labelled image set: fine-tuning with a fresh head
(configs/transfer.py), in place of the I2E corpus.

  config.input.dataset   'imagefolder' (class_name/*.jpg), 'folder' (GPR1200 layout) or a
                         TFDS name (read from data_dir, never downloaded)
  config.input.data_dir  the folder, or the TFDS data_dir
  config.input.split     the split to train on (default 'train')

Batches have the I2E pipeline's fields: image uint8 [b,S,S,3] (random-resized crop and
flip, preprocess.train_image), labels int32 [b,1] (the class), label_weights f32 [b,1] (1),
text int32 [b,L] (zeros: a classification set has no texts, so the model is 'supervised').
Like the I2E pipeline, the stream is a function of position alone, so the iterator's
symbolic checkpoint resumes it exactly, and each process reads only its own images:
  folders  process p takes every process_count-th file of the listing; each epoch visits
           them in a new order (a stateless shuffle of their indices, seeded by the epoch),
           so a batch mixes classes however the folder sorts them;
  TFDS     process p reads its even share of the split (tfds.even_splits) in file order,
           repeated and shuffled in blocks of input.shuffle_buffer (pipeline.block_shuffle):
           TFDS writes examples shuffled, so blocks already mix classes.
Each image is augmented with a seed folded from its position in the stream. An image that
does not decode is skipped and named in the log (pipeline.skip_bad_records).
"""
import hashlib
import io
import json
import os

import tensorflow as tf

from mofi_jax.data import pipeline, preprocess
from mofi_jax.evals import datasets

DEFAULT_SHUFFLE_BLOCK = 4096


class ClassificationInputError(ValueError):
  """config.input does not describe a usable labelled image set."""


def configured(cfg_input):
  """Whether config.input names a labelled image set rather than an I2E corpus."""
  return bool(cfg_input.get('dataset'))


def open_records(cfg_input, data_dir=None):
  """The split to train on (evals.datasets.Records); data_dir: cfg_input.data_dir resolved."""
  return datasets.open_records(cfg_input.dataset, data_dir or cfg_input.data_dir,
                               cfg_input.get('split') or 'train',
                               train_per_category=int(cfg_input.get('train_per_category', 5)))


def fingerprint(records):
  """Changes when the split's listing does (the saved input position is a cursor into it):
  a folder's files and labels, or a TFDS split's name, size and classes."""
  key = [records.name, records.split, records.num_examples, list(records.class_names)]
  if records.files is not None:
    paths, labels = records.files
    key += [list(paths), [int(y) for y in labels]]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def resolve(config, records):
  """config with model.head.num_classes from the split (where -1), checked otherwise."""
  if config.model.mode != 'supervised':
    raise ClassificationInputError(
        f'config.input.dataset={config.input.dataset!r} trains on labels only: '
        f"config.model.mode must be 'supervised', not {config.model.mode!r}.")
  config = config.copy_and_resolve_references()
  classes = len(records.class_names)
  with config.unlocked():
    if config.model.head.num_classes == -1:
      config.model.head.num_classes = classes
    elif config.model.head.num_classes != classes:
      raise ClassificationInputError(
          f'config.model.head.num_classes={config.model.head.num_classes}, but '
          f'{config.input.data_dir} ({config.input.dataset}) has {classes} classes.')
  return config


def _describe(record):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(record)) as image:
      image.load()
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    return f'not a decodable image ({type(e).__name__}: {e})'
  return None


def _folder_stream(files, process_index, process_count, seed, threads):
  """{'file', 'label', 'record'} of this process's files, every epoch in a new order."""
  paths, labels = files
  mine = list(range(process_index, len(paths), process_count))
  if not mine:
    raise ClassificationInputError(f'{len(paths)} images for {process_count} processes: '
                                   f'process {process_index} has none.')
  paths = tf.constant([paths[i] for i in mine])
  labels = tf.constant([int(labels[i]) for i in mine], tf.int64)
  base = tf.constant([seed, 3], tf.int64)

  def epoch_order(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(mine), dtype=tf.int64),
        seed=tf.random.experimental.stateless_fold_in(base, epoch))
    return tf.data.Dataset.from_tensor_slices(order)
  ds = tf.data.Dataset.counter().flat_map(epoch_order)
  return ds.map(lambda i: {'file': tf.gather(paths, i), 'label': tf.gather(labels, i),
                           'record': tf.io.read_file(tf.gather(paths, i))},
                num_parallel_calls=threads, deterministic=True)


def _tfds_stream(records, process_index, process_count):
  """{'file': 'NAME:SPLIT#p/i', 'label', 'record'} of this process's share, repeated."""
  name = f'{records.name}:{records.split}#{process_index}/'
  ds = records.tfds_read(process_index, process_count).repeat().enumerate()
  return ds.map(lambda i, ex: {'file': tf.strings.join([name, tf.strings.as_string(i)]),
                               'record': ex[0], 'label': tf.cast(ex[1], tf.int64)})


def make_train_dataset(records, cfg_input, *, process_index, process_count, per_process_batch,
                       seed):
  """Infinite, deterministic batches of `records` (open_records) for this process."""
  size, text_len = int(cfg_input.image_size), int(cfg_input.text_len)
  base = tf.constant([seed, 2 + process_index], tf.int64)
  scale = tuple(cfg_input.get('rrc_scale', (0.4, 1.0)))

  def example(x):
    key = tf.random.experimental.stateless_fold_in(base, x['index'])
    return dict(image=preprocess.train_image(x['record'], size, key, scale=scale),
                labels=tf.reshape(tf.cast(x['label'], tf.int32), [1]),
                label_weights=tf.ones([1], tf.float32),
                text=tf.zeros([text_len], tf.int32))

  threads = cfg_input.get('threads') or os.cpu_count()
  if records.files is not None:
    ds = _folder_stream(records.files, process_index, process_count, seed, threads)
  else:
    ds = _tfds_stream(records, process_index, process_count)
    block = int(cfg_input.get('shuffle_buffer') or DEFAULT_SHUFFLE_BLOCK)
    if records.num_examples:   # no bigger than this process's share
      block = min(block, max(1, records.num_examples // process_count))
    ds = pipeline.block_shuffle(ds, block, seed)
  ds = ds.enumerate().map(lambda i, x: {**x, 'index': i})
  ds = pipeline.skip_bad_records(
      ds, example, _describe, threads,
      cfg_input.get('max_bad_record_rate', pipeline.DEFAULT_MAX_BAD_RECORD_RATE))
  ds = ds.batch(per_process_batch, drop_remainder=True)
  return ds.with_options(pipeline.train_options()).prefetch(
      cfg_input.get('prefetch_batches', 2))
