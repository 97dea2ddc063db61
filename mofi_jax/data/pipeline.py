"""tf.data input for training on an I2E corpus, and the GPR1200-layout eval loader.

Determinism: every random choice is either an op-level seeded tf.data op (shuffle) or a
stateless op whose seed is derived from (seed, hash of image/key, epoch):
  * file order: `stateless_shuffle(files, seed=[seed, epoch])`, one order per epoch;
  * record order: a stateless permutation within each block of `shuffle_buffer`
    consecutive records (`block_shuffle`);
  * per-example seed: `fold_in(fold_in([seed, 0], hash(image/key)), epoch)` (hash:
    `tf.strings.to_hash_bucket_fast`, epoch: completed passes over this process's
    files), split into the augmentation seed and the entity-text seed.
So the same image gets the same crop and the same entity text within an epoch, whatever
its position in the stream or the number of processes. Two datasets built with the same
arguments yield bit-identical batches, and the iterator is checkpointable with
`clu.data.dataset_iterator.TfDatasetIterator(ds, checkpoint=True)`. The checkpoint is
symbolic: a few KB of reader cursors per process, whatever the image size, batch or
shuffle block (benchmarks/input_checkpoint.py measures it).

Text: with `text_source='entity'` each entity's `entity_template` text is tokenised once
into a [C, L] table and one of the image's (kept) entities is gathered; with
`text_source='alt_text'` the stored `alt_text/tokens` are re-fitted to L (truncated with
<eot> kept last, then padded), so the tokenizer never runs inside the pipeline.

Bad records: a record that fails (fields, labels or image; the builder's clean stage lets
none through, but a corpus may come from elsewhere or be damaged) is skipped, logged with
its shard, key and reason, and counted; above `max_bad_record_rate` of the records read
by this process (measured over at least _BAD_RECORD_WINDOW records) the input stops with
one line naming the count and the last bad record. See skip_bad_records.

A 'pairs' corpus (schema.CORPUS_KINDS: alt-texts, no entities) needs
`text_source='alt_text'`; its labels are all -1 with zero weights, so only a
contrastive model trains on it (run_setup.resolve_from_corpus checks the mode).
"""
import os
import re

from absl import logging
import numpy as np
import tensorflow as tf

from mofi_jax.data import preprocess
from mofi_jax.data import schema
from mofi_jax.data import tokenizer as tokenizer_lib

TEXT_SOURCES = ('entity', 'alt_text')
DEFAULT_ENTITY_TEMPLATE = '{name}, {description}'
# Shards whose first record is checked at build time; enough to catch a wrong corpus
# without reading thousands of GCS objects on every start (skip_bad_records handles the
# rest).
_VALIDATE_SHARDS = 4
_MAX_CYCLE = 16
DEFAULT_MAX_BAD_RECORD_RATE = 0.001
# The bad-record rate is taken over at least this many records: one bad record among the
# first ten read is not a 10% rate.
_BAD_RECORD_WINDOW = 1000
_GUARD_BLOCK = 16  # Records per guarded block (skip_bad_records).
_HASH_BUCKETS = 2**63 - 1
_REQUIRED = object()


def _get(cfg, key, default=_REQUIRED):
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  if value is _REQUIRED:
    raise ValueError(f'cfg_input.{key} is required by make_train_dataset but is missing.')
  return value


def process_files(files, process_index, process_count):
  """This process's shards: sorted list, strided by process (disjoint and covering)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}.')
  files = sorted(files)
  if len(files) < process_count:
    raise schema.CorpusError(
        f'{len(files)} shard(s) cannot feed {process_count} processes: every process needs '
        f'at least one shard ({os.path.dirname(files[0]) if files else "no files"}).')
  return files[process_index::process_count]


def make_train_dataset(corpus_dir, cfg_input, *, process_index, process_count,
                       per_process_batch, seed=None):
  """Infinite, deterministic dataset of batches for this process.

  Yields dicts: image f32 [b,S,S,3], labels i32 [b,K] (-1 padded), label_weights f32
  [b,K] (1/n over the n kept labels), text i32 [b,L]. `seed` defaults to cfg_input.seed.
  Optional cfg_input keys: `threads` (decode/augment parallelism; default: the
  host's CPUs), `prefetch_batches` (default 2) and `max_bad_record_rate` (default
  DEFAULT_MAX_BAD_RECORD_RATE; 0: stop at the first bad record).
  """
  seed = _get(cfg_input, 'seed') if seed is None else seed
  global_batch = _get(cfg_input, 'batch_size', None)
  if global_batch is not None and global_batch != per_process_batch * process_count:
    raise ValueError(f'cfg_input.batch_size={global_batch} != per_process_batch '
                     f'{per_process_batch} x process_count {process_count}.')
  meta, table = schema.validate_corpus(corpus_dir, max_shards=_VALIDATE_SHARDS)
  kind = schema.corpus_kind(meta)
  check_corpus_kind(kind, _get(cfg_input, 'text_source'), corpus_dir)
  files = process_files(schema.list_shards(corpus_dir), process_index, process_count)
  tok = tokenizer_lib.load_tokenizer(os.path.join(corpus_dir, schema.TOKENIZER_FILE))
  example_fn = _example_fn(cfg_input, table, tok, base_seed=[seed, 0], kind=kind)

  threads = _get(cfg_input, 'threads', None) or os.cpu_count()
  ds = tf.data.Dataset.counter().flat_map(
      lambda epoch: _epoch_records(files, seed, epoch, threads))
  ds = block_shuffle(ds, _get(cfg_input, 'shuffle_buffer'), seed)
  describe_fn = lambda record: schema.record_error(record, len(table), kind)
  ds = skip_bad_records(ds, example_fn, describe_fn, threads,
                        _get(cfg_input, 'max_bad_record_rate', DEFAULT_MAX_BAD_RECORD_RATE))
  ds = ds.batch(per_process_batch, drop_remainder=True)
  return ds.with_options(train_options()).prefetch(_get(cfg_input, 'prefetch_batches', 2))


def train_options():
  """tf.data options of every training input: deterministic, symbolically checkpointed."""
  options = tf.data.Options()
  options.deterministic = True
  # The iterator checkpoint holds cursors (file offsets, block position), not
  # buffered records or decoded batches: every stage after the readers is a
  # pure function of position, recomputed on restore (see block_shuffle).
  options.experimental_symbolic_checkpoint = True
  # No autotuning: its model thread sleeps up to 60 s between rounds and the
  # iterator's destructor waits for it, so a finished run sat silent for up
  # to a minute before exiting. Parallelism is explicit instead.
  options.autotune.enabled = False
  return options


def block_shuffle(ds, block, seed):
  """A uniform random order within each run of `block` consecutive elements.

  Block b is permuted by `stateless_shuffle` seeded with fold_in([seed, 1], b),
  so the order is a function of position alone. Unlike `Dataset.shuffle`,
  whose buffer must be saved with the iterator (`block` raw records, hundreds
  of MB at 224 px), a symbolic checkpoint of this needs only the reader
  cursors at the block's start: restore re-reads at most `block` records.
  Memory is that of a shuffle buffer of `block`.
  """
  base = tf.constant([seed, 1], tf.int64)

  def permute(index, elements):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(block), seed=tf.random.experimental.stateless_fold_in(base, index))
    return tf.nest.map_structure(lambda t: tf.gather(t, order), elements)
  # No prefetch between map and unbatch: TF 2.21 segfaults when such an
  # iterator is destroyed mid-read (reproduced with `next(iter(ds))` in a
  # loop). The next block is read when the consumer reaches it.
  return ds.batch(block, drop_remainder=True).enumerate().map(permute).unbatch()


def skip_bad_records(ds, example_fn, describe_fn, threads, max_rate, block=_GUARD_BLOCK):
  """`ds.map(example_fn)` for elements {'file', 'record', ...}, without those that fail.

  Blocks of `block` consecutive elements each run through a small dataset consumed inside
  the map function: `example_fn`, errors ignored (tf.data's ignore_errors, whose iterator
  cannot be checkpointed symbolically: here none outlives the call), batched with their
  positions in the block. A block, not a record, pays for building that dataset: a
  dataset per record cost a quarter of the throughput on 2 cores. The Python that names
  a bad record, `describe_fn(record bytes) -> str or None`, runs only for blocks with one.
  Unlike ignore_errors alone, the log then names the shard, key and reason, and the count
  stops a run that reads mostly junk (a wrong corpus) with one line.
  """
  def guarded(xs):
    n = tf.shape(xs['record'], out_type=tf.int64)[0]
    good = tf.data.Dataset.from_tensor_slices((tf.range(n), xs)).map(
        lambda i, x: (i, example_fn(x))).ignore_errors()
    none = tf.nest.map_structure(lambda s: tf.zeros([0] + s.shape.as_list(), s.dtype),
                                 good.element_spec)
    kept, examples = good.batch(block).concatenate(
        tf.data.Dataset.from_tensors(none)).take(1).get_single_element()
    failed = tf.where(tf.scatter_nd(kept[:, None], tf.ones_like(kept), [n]) == 0)[:, 0]
    texts = tf.cond(tf.size(failed) > 0, lambda: _bad_record_texts(xs, failed, describe_fn),
                    lambda: tf.zeros([0], tf.string))
    return examples, failed, texts, n
  ds = ds.batch(block).map(guarded, num_parallel_calls=threads, deterministic=True)
  ds = ds.scan(tf.zeros([2], tf.int64), _bad_record_counter(max_rate))
  return ds.unbatch()


def _bad_record_texts(xs, failed, describe_fn):
  """['shard PATH, key K: reason'] for the records of block `xs` at positions `failed`."""
  def describe(paths, records, positions):
    texts = []
    for i in positions.numpy():
      reason = describe_fn(records[i].numpy()) or (
          'failed in the input pipeline, though its fields and image check out')
      texts.append(f'shard {paths[i].numpy().decode()}, {reason}')
    return tf.constant(texts, tf.string)
  texts = tf.py_function(describe, [xs['file'], xs['record'], failed], tf.string)
  texts.set_shape([None])
  return texts


def _bad_record_counter(max_rate):
  """scan step over blocks: counts (read, bad), logs each bad record, stops above
  `max_rate` of those read."""
  def report(texts, positions, read, bad):
    read, bad = int(read), int(bad)
    for text, position in zip(texts.numpy(), positions.numpy()):
      bad, at, text = bad + 1, read + int(position) + 1, text.decode()
      logging.warning('Input: skipped bad record %d (of %d read by this process): %s', bad,
                      at, text)
      if bad > max_rate * max(at, _BAD_RECORD_WINDOW):
        return (f'Input: {bad} bad records in {at} read by this process, over '
                f'input.max_bad_record_rate={max_rate} (over at least {_BAD_RECORD_WINDOW} '
                f'records; each is named in the log); the last: {text}')
    return ''

  def step(counts, element):
    examples, failed, texts, n = element
    stop = tf.cond(tf.size(texts) > 0,
                   lambda: tf.py_function(report, [texts, failed, counts[0], counts[1]],
                                          tf.string),
                   lambda: tf.constant(''))
    check = tf.debugging.Assert(tf.strings.length(stop) == 0, [stop])
    counts = counts + tf.stack([n, tf.size(texts, out_type=tf.int64)])
    with tf.control_dependencies([check]):
      return counts, tf.nest.map_structure(tf.identity, examples)
  return step


def check_corpus_kind(kind, text_source, corpus_dir, mode=None):
  """A 'pairs' corpus has no entities: it trains only mode 'contrastive' on alt-texts.

  `mode` (config.model.mode) is checked when given; the input pipeline does not know it.
  """
  if kind != 'pairs' or (text_source == 'alt_text' and mode in (None, 'contrastive')):
    return
  got = ([f'model.mode={mode!r}'] if mode else []) + [f'input.text_source={text_source!r}']
  raise schema.CorpusError(
      f"{corpus_dir}: a 'pairs' corpus (corpus.json kind; no entities) trains only "
      f"model.mode='contrastive' with input.text_source='alt_text', got {', '.join(got)}.")


def _epoch_records(files, seed, epoch, threads):
  """One pass over `files` in a per-epoch seeded order, records interleaved round-robin."""
  order = tf.random.experimental.stateless_shuffle(
      tf.constant(files), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
  cycle = min(len(files), _MAX_CYCLE)
  ds = tf.data.Dataset.from_tensor_slices(order).interleave(
      lambda f: tf.data.TFRecordDataset(f).map(lambda r: (f, r)),
      cycle_length=cycle, block_length=1,
      num_parallel_calls=min(cycle, threads), deterministic=True)
  return ds.map(lambda f, r: dict(file=f, record=r, epoch=epoch))


def _example_fn(cfg_input, table, tok, base_seed, kind):
  """Returns the per-record map function: parse, check, augment, labels, text."""
  size = _get(cfg_input, 'image_size')
  max_entities = _get(cfg_input, 'max_entities')
  scale = tuple(_get(cfg_input, 'rrc_scale', (0.4, 1.0)))
  text_fn = _text_fn(cfg_input, table, tok)
  num_entities = len(table)
  base_seed = tf.constant(base_seed, tf.int64)

  def fn(x):
    ex = schema.parse_examples(x['record'], example_names=x['file'])
    classes = ex['entity/class']
    if kind == 'pairs':
      ok, expected = tf.size(classes) == 0, 'none in a pairs corpus'
    else:
      ok = (tf.size(classes) > 0) & tf.reduce_all((classes >= 0) & (classes < num_entities))
      expected = '1+ indices in [0, %d)' % num_entities
    check = tf.debugging.Assert(ok, [
        f'Bad field entity/class (expected {expected}) in',
        x['file'], 'image/key', ex['image/key'], 'entity/class', classes])
    with tf.control_dependencies([check]):
      classes = tf.identity(classes)
    key_hash = tf.strings.to_hash_bucket_fast(ex['image/key'], _HASH_BUCKETS)
    ex_seed = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base_seed, key_hash), x['epoch'])
    aug_seed, text_seed = tf.unstack(tf.random.experimental.stateless_split(ex_seed, 2))
    labels, weights = _labels(classes, max_entities)
    image = preprocess.train_image(ex['image/encoded'], size, aug_seed, scale=scale)
    return dict(image=image, labels=labels, label_weights=weights,
                text=text_fn(ex, labels, text_seed))
  return fn


def _labels(classes, k):
  """First `k` classes padded with -1, and weights 1/n on the n kept ones."""
  kept = classes[:k]
  n = tf.size(kept)
  labels = tf.pad(tf.cast(kept, tf.int32), [[0, k - n]], constant_values=-1)
  weights = tf.pad(tf.fill([n], 1.0 / tf.cast(n, tf.float32)), [[0, k - n]])
  return tf.ensure_shape(labels, [k]), tf.ensure_shape(weights, [k])


def _text_fn(cfg_input, table, tok):
  """(parsed example, labels [K], seed [2]) -> int32 [L] token row."""
  source = _get(cfg_input, 'text_source')
  length = _get(cfg_input, 'text_len')
  eot = tokenizer_lib.eot_id(tok)
  if source == 'alt_text':
    return lambda ex, labels, seed: fit_tokens(ex['alt_text/tokens'], length, eot)
  if source != 'entity':
    raise ValueError(f'cfg_input.text_source must be one of {TEXT_SOURCES}, got {source!r}.')
  texts = entity_texts(table, _get(cfg_input, 'entity_template', DEFAULT_ENTITY_TEMPLATE))
  token_table = tf.constant(tokenizer_lib.tokenize(tok, texts, length))

  def fn(ex, labels, seed):
    del ex
    n = tf.reduce_sum(tf.cast(labels >= 0, tf.int32))
    pick = tf.random.stateless_uniform([], seed, minval=0, maxval=n, dtype=tf.int32)
    return tf.gather(token_table, labels[pick])
  return fn


def entity_texts(table, template):
  try:
    return [template.format(name=n, description=d)
            for n, d in zip(table.names, table.descriptions)]
  except (KeyError, IndexError) as e:
    raise ValueError(f'cfg_input.entity_template {template!r} may only use {{name}} and '
                     f'{{description}} ({e!r}).') from e


def fit_tokens(tokens, length, eot):
  """1-D `<bos> ... <eot>` ids -> int32 [length]: truncated keeping <eot> last, 0-padded."""
  head = tokens[:tf.minimum(tf.size(tokens), length) - 1]
  row = tf.concat([tf.cast(head, tf.int32), tf.constant([eot], tf.int32)], 0)
  row = tf.pad(row, [[0, length - tf.size(row)]], constant_values=tokenizer_lib.PAD_ID)
  return tf.ensure_shape(row, [length])


# ----------------------------------------------------------------------------------------
# GPR1200-layout retrieval folder.

_EVAL_NAME_RE = re.compile(r'^(\d+)_(.+)\.(jpe?g|png)$', re.IGNORECASE)
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
IMAGES_PER_CATEGORY = 10


def list_eval_images(folder):
  """(paths, categories, names) in the official order: by category, then file name."""
  folder = os.fspath(folder)
  if not tf.io.gfile.isdir(folder):
    raise schema.CorpusError(f'{folder}: retrieval folder not found.')
  rows = []
  for name in tf.io.gfile.listdir(folder):
    if not name.lower().endswith(_IMAGE_EXTENSIONS):
      continue  # e.g. categories.json
    match = _EVAL_NAME_RE.match(name)
    if not match:
      raise schema.CorpusError(f'{os.path.join(folder, name)}: file name must be '
                               '{category}_{name}.jpg with an integer category.')
    rows.append((int(match.group(1)), name))
  if not rows:
    raise schema.CorpusError(f'{folder}: no images named {{category}}_{{name}}.jpg.')
  rows.sort()
  categories = np.array([c for c, _ in rows], np.int64)
  counts = np.bincount(categories)
  bad = np.flatnonzero(counts != IMAGES_PER_CATEGORY)
  if bad.size:
    raise schema.CorpusError(
        f'{folder}: category {bad[0]} has {counts[bad[0]]} images, expected exactly '
        f'{IMAGES_PER_CATEGORY} (categories must be 0..R-1 with {IMAGES_PER_CATEGORY} each).')
  names = [n for _, n in rows]
  return [os.path.join(folder, n) for n in names], categories, names


def make_eval_images(folder, size, batch_size=256):
  """Returns (images f32 [N,S,S,3] via eval_image, categories int64 [N], file names)."""
  paths, categories, names = list_eval_images(folder)
  ds = tf.data.Dataset.from_tensor_slices(paths).map(
      lambda p: preprocess.eval_image(tf.io.read_file(p), size),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
  images = np.concatenate([b.numpy() for b in ds], 0)
  return images, categories, names
