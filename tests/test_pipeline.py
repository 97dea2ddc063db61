"""Tests for mofi_jax/data/pipeline.py against NumPy references computed from raw records."""
import io
import os
import re
import shutil

from clu.data import dataset_iterator
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import common
from records import raw_example
from test_schema import make_pairs_corpus
from mofi_jax import run_setup
from mofi_jax.data import pipeline
from mofi_jax.data import preprocess
from mofi_jax.data import schema
from mofi_jax.data import tokenizer as tokenizer_lib

TEMPLATE = '{name}, {description}'


def make_cfg(corpus_dir, **overrides):
  cfg = dict(data_dir=corpus_dir, image_size=16, max_entities=2, text_source='entity',
             entity_template=TEMPLATE, text_len=12, shuffle_buffer=32, rrc_scale=(0.4, 1.0),
             seed=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def take(ds, n):
  it = iter(ds)
  return [{k: v.numpy() for k, v in next(it).items()} for _ in range(n)]


def shard_records(path):
  out = []
  for record in tf.data.TFRecordDataset(path):
    f = tf.train.Example.FromString(record.numpy()).features.feature
    out.append(dict(classes=list(f['entity/class'].int64_list.value),
                    tokens=list(f['alt_text/tokens'].int64_list.value)))
  return out


def fit(ids, length, eot):
  ids = list(ids) if len(ids) <= length else list(ids[:length - 1]) + [eot]
  return np.array(ids + [0] * (length - len(ids)), np.int32)


@pytest.fixture(scope='module')
def tok(tiny_corpus):
  return tokenizer_lib.load_tokenizer(os.path.join(tiny_corpus, schema.TOKENIZER_FILE))


def ordered_batches(corpus_dir, process_index, num_batches, **overrides):
  """One shard per process and no shuffle buffer: rows follow the shard's record order."""
  cfg = make_cfg(corpus_dir, shuffle_buffer=1, **overrides)
  ds = pipeline.make_train_dataset(corpus_dir, cfg, process_index=process_index,
                                   process_count=4, per_process_batch=4)
  rows = take(ds, num_batches)
  records = shard_records(schema.list_shards(corpus_dir)[process_index])
  return {k: np.concatenate([b[k] for b in rows]) for k in rows[0]}, records


@pytest.mark.parametrize('process_index, max_entities', [(0, 2), (3, 1)])
def test_labels_and_entity_text_match_raw_records(tiny_corpus, tok, process_index, max_entities):
  batch, records = ordered_batches(tiny_corpus, process_index, 12, max_entities=max_entities)
  table = schema.load_entities(tiny_corpus)
  eot = tokenizer_lib.eot_id(tok)
  entity_tokens = [fit(tok.encode(TEMPLATE.format(name=n, description=d)).ids, 12, eot)
                   for n, d in zip(table.names, table.descriptions)]
  assert len(batch['labels']) > len(records)  # Wraps into the second epoch.
  chosen_positions = set()
  for i, (labels, weights, text) in enumerate(
      zip(batch['labels'], batch['label_weights'], batch['text'])):
    kept = records[i % len(records)]['classes'][:max_entities]
    expected = np.full(max_entities, -1)
    expected[:len(kept)] = kept
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(weights, np.where(expected >= 0, 1.0 / len(kept), 0.0))
    matches = [j for j, c in enumerate(kept) if np.array_equal(text, entity_tokens[c])]
    assert matches, f'row {i}: text is not the text of one of its entities {kept}'
    if len(kept) > 1:
      chosen_positions.update(matches)
  if max_entities == 2:
    assert chosen_positions == {0, 1}  # Both entities of multi-entity images get picked.


def test_alt_text_source_refits_stored_tokens(tiny_corpus, tok):
  batch, records = ordered_batches(tiny_corpus, 1, 6, text_source='alt_text', text_len=5)
  eot = tokenizer_lib.eot_id(tok)
  for i, text in enumerate(batch['text']):
    np.testing.assert_array_equal(text, fit(records[i % len(records)]['tokens'], 5, eot))


@pytest.mark.parametrize('source', ['entity', 'alt_text'])
def test_truncated_text_ends_with_eot(tiny_corpus, tok, source):
  cfg = make_cfg(tiny_corpus, text_source=source, text_len=4)
  ds = pipeline.make_train_dataset(tiny_corpus, cfg, process_index=0, process_count=1,
                                   per_process_batch=8)
  for b in take(ds, 4):
    n = np.count_nonzero(b['text'], axis=1)
    assert np.all(b['text'][np.arange(len(n)), n - 1] == tokenizer_lib.eot_id(tok))
    assert np.all(b['text'][:, 0] == tokenizer_lib.bos_id(tok))


def test_batch_spec(tiny_corpus):
  cfg = make_cfg(tiny_corpus, max_entities=3)
  ds = pipeline.make_train_dataset(tiny_corpus, cfg, process_index=0, process_count=1,
                                   per_process_batch=8)
  b = take(ds, 1)[0]
  assert b['image'].shape == (8, 16, 16, 3) and b['image'].dtype == np.uint8   # pixels
  assert b['labels'].shape == (8, 3) and b['labels'].dtype == np.int32
  assert b['label_weights'].shape == (8, 3) and b['label_weights'].dtype == np.float32
  assert b['text'].shape == (8, 12) and b['text'].dtype == np.int32
  np.testing.assert_allclose(b['label_weights'].sum(1), 1.0, rtol=1e-6)
  assert np.all(b['labels'][:, 2] == -1)  # The corpus has at most 2 entities per image.
  assert b['image'].min() < 64 and b['image'].max() > 192   # the full range, not [0, 1]


def test_train_images_are_the_float_crop_rounded_to_uint8(tiny_corpus):
  # The same crop as the float path (decode, random-resized crop, flip), quantised once.
  raw = next(iter(tf.data.TFRecordDataset(schema.list_shards(tiny_corpus)[0])))
  image_bytes = schema.parse_examples(raw)['image/encoded']
  seed = tf.constant([3, 4], tf.int64)
  pixels = preprocess.train_image(image_bytes, 16, seed).numpy()
  seeds = tf.random.experimental.stateless_split(seed, 2)
  image = preprocess.decode(image_bytes)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
      area_range=(0.4, 1.0), aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0,
      use_image_if_no_bounding_boxes=True)
  crop = tf.image.resize(tf.slice(image, begin, size), (16, 16), antialias=True)
  crop = tf.image.stateless_random_flip_left_right(crop, seeds[1]).numpy()
  np.testing.assert_array_equal(pixels, np.round(np.clip(crop, 0, 1) * 255).astype(np.uint8))


def test_same_seed_same_batches_other_seed_differs(tiny_corpus):
  def batches(seed, process_index=0):
    ds = pipeline.make_train_dataset(tiny_corpus, make_cfg(tiny_corpus), seed=seed,
                                     process_index=process_index, process_count=2,
                                     per_process_batch=4)
    return take(ds, 3)
  a, b, c, d = batches(7), batches(7), batches(8), batches(7, process_index=1)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  assert not np.array_equal(a[0]['labels'], c[0]['labels'])
  assert not np.array_equal(a[0]['image'], d[0]['image'])


def test_augmentation_differs_across_epochs(tiny_corpus):
  batch, records = ordered_batches(tiny_corpus, 2, 2 * 9)
  n = len(records)
  assert not np.array_equal(batch['image'][0], batch['image'][n])  # Same record, next epoch.
  np.testing.assert_array_equal(batch['labels'][0], batch['labels'][n])


def test_process_files_disjoint_and_covering(tiny_corpus):
  files = schema.list_shards(tiny_corpus)
  for count in range(1, len(files) + 1):
    parts = [pipeline.process_files(files[::-1], i, count) for i in range(count)]
    assert sorted(f for p in parts for f in p) == sorted(files)
    assert sum(len(p) for p in parts) == len(files)
  with pytest.raises(schema.CorpusError, match='4 shard.* cannot feed 5 processes'):
    pipeline.make_train_dataset(tiny_corpus, make_cfg(tiny_corpus), process_index=0,
                                process_count=5, per_process_batch=2)


def test_iterator_save_restore_equals_uninterrupted(tiny_corpus, tmp_path):
  def iterator(rate=0.001):
    # A run stopped for bad records resumes with a higher max_bad_record_rate: the state
    # fits (checkpoint_checks.INPUT_FREE_KEYS lets that key change).
    ds = pipeline.make_train_dataset(tiny_corpus, make_cfg(tiny_corpus, max_bad_record_rate=rate),
                                     process_index=0, process_count=1, per_process_batch=4)
    return dataset_iterator.TfDatasetIterator(ds, checkpoint=True)
  # ~130 records / 4: the checkpoint sits just before the first epoch boundary.
  before, after = 30, 6
  uninterrupted = [next(it) for it in [iterator()] for _ in range(before + after)]
  first = iterator()
  for _ in range(before):
    next(first)
  first.save(tmp_path / 'ckpt')
  resumed = iterator(rate=0.5)
  resumed.restore(tmp_path / 'ckpt')
  for step in range(after):
    got, want = next(resumed), uninterrupted[before + step]
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'step {step} {k}')


def test_block_shuffle_permutes_within_blocks():
  stream = tf.data.Dataset.range(10 * 16)
  got = np.array(list(pipeline.block_shuffle(stream, 16, seed=3).as_numpy_iterator()))
  blocks = got.reshape(10, 16)
  for b, block in enumerate(blocks):
    np.testing.assert_array_equal(np.sort(block), np.arange(16) + 16 * b)
  assert sum(not np.array_equal(bl, np.sort(bl)) for bl in blocks) >= 9
  again = np.array(list(pipeline.block_shuffle(stream, 16, seed=3).as_numpy_iterator()))
  other = np.array(list(pipeline.block_shuffle(stream, 16, seed=4).as_numpy_iterator()))
  np.testing.assert_array_equal(got, again)
  assert not np.array_equal(got, other)


def test_iterator_checkpoint_holds_cursors_not_records(tiny_corpus, tmp_path):
  """The saved state does not grow with the shuffle block or the batch: the
  records and decoded batches are recomputed on restore, not stored."""
  sizes = {}
  for buffer, batch in ((8, 2), (64, 16)):
    ds = pipeline.make_train_dataset(tiny_corpus, make_cfg(tiny_corpus, shuffle_buffer=buffer),
                                     process_index=0, process_count=1, per_process_batch=batch)
    it = dataset_iterator.TfDatasetIterator(ds, checkpoint=True)
    for _ in range(3):
      next(it)
    it.save(tmp_path / f'ck{buffer}' / 'state')
    sizes[buffer] = sum(f.stat().st_size for f in (tmp_path / f'ck{buffer}').iterdir())
  records = sum(os.path.getsize(f) for f in schema.list_shards(tiny_corpus))
  one_batch = 16 * 16 * 16 * 3 * 4   # decoded float32 images (image_size 16)
  assert sizes[64] < min(one_batch, records / 4) / 4, sizes
  assert abs(sizes[64] - sizes[8]) < 1024, sizes


def rewrite_shard(path, bad_record, position):
  records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
  records.insert(position, bad_record)
  with tf.io.TFRecordWriter(path) as w:
    for r in records:
      w.write(r)


def bad_record(**fields):
  """A record that is valid (real JPEG included) except for `fields` (None: removed)."""
  jpeg = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()
  return raw_example(image=jpeg, **fields)


def animated_webp():
  """Two frames: TF's 3-channel decode (what training uses) fails on it."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  frames = [Image.new('RGB', (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
  out = io.BytesIO()
  frames[0].save(out, 'WEBP', save_all=True, append_images=frames[1:], lossless=True)
  return out.getvalue()


def image_feature(data):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[data]))


def key_feature(key):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()]))


BAD_RECORDS = {  # name -> (fields of an otherwise valid record, words its log line holds)
    'no_key': ({'image/key': None}, "key '?'.*'image/key' is missing"),
    'class_out_of_range': ({'entity/class': tf.train.Feature(
        int64_list=tf.train.Int64List(value=[99]))}, "key 'bad'.*'entity/class' has index 99"),
    'class_as_bytes': ({'entity/class': tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[b'3']))}, "key 'bad'.*'entity/class' has type"),
    'animated_webp': ({'image/encoded': 'webp'}, "key 'bad'.*'image/encoded' does not decode"),
    'truncated_jpeg': ({'image/encoded': 'cut'}, "key 'bad'.*'image/encoded' does not decode"),
    'not_an_image': ({'image/encoded': image_feature(b'<html>')},
                     "key 'bad'.*'image/encoded' does not decode.*Unknown image file format"),
}


def make_bad_record(name, key='bad'):
  fields = dict(BAD_RECORDS[name][0])
  jpeg = tf.io.encode_jpeg(tf.zeros([8, 8, 3], tf.uint8)).numpy()
  if fields.get('image/encoded') == 'webp':
    fields['image/encoded'] = image_feature(animated_webp())
  elif fields.get('image/encoded') == 'cut':
    fields['image/encoded'] = image_feature(jpeg[:len(jpeg) // 2])
  if 'image/key' not in fields:
    fields['image/key'] = key_feature(key)
  return raw_example(image=jpeg, **fields)


def corpus_with_bad_records(tiny_corpus, tmp_path, records):
  """A copy whose first shard has `records` {position: bytes} inserted; its path."""
  corpus = str(tmp_path / 'c')
  shutil.copytree(tiny_corpus, corpus)
  shard = schema.list_shards(corpus)[0]
  for position, record in sorted(records.items()):
    rewrite_shard(shard, record, position)
  return corpus, shard


def first_shard_batches(corpus, n, **overrides):
  ds = pipeline.make_train_dataset(corpus, make_cfg(corpus, shuffle_buffer=1, **overrides),
                                   process_index=0, process_count=4, per_process_batch=2)
  return take(ds, n)


@pytest.mark.parametrize('name', sorted(BAD_RECORDS))
def test_bad_record_is_skipped_counted_and_named(tiny_corpus, tmp_path, caplog, name):
  corpus, shard = corpus_with_bad_records(tiny_corpus, tmp_path,
                                          {3: make_bad_record(name)})  # Past the validated first.
  got = first_shard_batches(corpus, 6)
  # Per-example randomness follows the key, not the position: the batches are exactly those
  # of the corpus without the bad record.
  want = first_shard_batches(tiny_corpus, 6)
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  lines = [r.getMessage() for r in caplog.records if 'bad record' in r.getMessage()]
  assert len(lines) == 1, lines
  assert re.search(rf'skipped bad record 1 \(of 4 read .*\): shard {shard}, '
                   rf'{BAD_RECORDS[name][1]}', lines[0]), lines[0]


def test_bad_records_over_the_rate_stop_with_one_line(tiny_corpus, tmp_path):
  corpus, shard = corpus_with_bad_records(
      tiny_corpus, tmp_path, {1: make_bad_record('animated_webp', 'b1'),
                              2: make_bad_record('not_an_image', 'b2'),
                              4: make_bad_record('animated_webp', 'b3')})
  first_shard_batches(corpus, 6, max_bad_record_rate=0.003)  # 3 in the first 1,000 pass.
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    first_shard_batches(corpus, 6, max_bad_record_rate=0.0025)
  # One line; tf.debugging.Assert escapes its quotes.
  line = next(l for l in e.value.message.splitlines() if 'bad records' in l).replace("\\'", "'")
  assert re.search(rf"Input: 3 bad records in 5 read by this process, over "
                   rf"input.max_bad_record_rate=0.0025 .*the last: shard {shard}, key 'b3': "
                   rf".*'image/encoded' does not decode", line), line
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"1 bad records in 2 read.*key \\'b1"):
    first_shard_batches(corpus, 1, max_bad_record_rate=0)  # 0: the first one stops.


def test_skip_bad_records_keeps_the_good_in_order_whole_bad_blocks_included(caplog):
  pixels = [np.full((4, 4, 3), v, np.uint8) for v in range(6)]
  records = [tf.io.encode_png(p).numpy() for p in pixels]
  bad = {0, 1, 3}  # Block size 2: the first block is all bad.
  records = [b'junk %d' % i if i in bad else r for i, r in enumerate(records)]
  ds = tf.data.Dataset.from_tensor_slices(dict(file=['f%d' % i for i in range(6)],
                                               record=records))
  fn = lambda x: dict(image=tf.ensure_shape(preprocess.decode_pixels(x['record']), [4, 4, 3]))
  out = pipeline.skip_bad_records(ds, fn, lambda r: f'reason {r.decode()}', threads=2,
                                  max_rate=0.01, block=2)
  got = [e['image'] for e in out.as_numpy_iterator()]
  np.testing.assert_array_equal(got, [pixels[i] for i in range(6) if i not in bad])
  lines = [r.getMessage() for r in caplog.records if 'bad record' in r.getMessage()]
  assert lines == [f'Input: skipped bad record {n} (of {i + 1} read by this process): '
                   f'shard f{i}, reason junk {i}' for n, i in enumerate(sorted(bad), 1)]


def test_bad_first_record_fails_at_build_time(tiny_corpus, tmp_path):
  corpus = str(tmp_path / 'c')
  shutil.copytree(tiny_corpus, corpus)
  shard = schema.list_shards(corpus)[1]
  rewrite_shard(shard, bad_record(alt_text=None), position=0)
  with pytest.raises(schema.CorpusError, match=f"{shard}: field 'alt_text' is missing"):
    pipeline.make_train_dataset(corpus, make_cfg(corpus), process_index=0, process_count=1,
                                per_process_batch=2)


@pytest.mark.parametrize('overrides, message', [
    (dict(text_source='caption'), 'text_source must be one of'),
    (dict(entity_template='{title}'), 'entity_template'),
    (dict(batch_size=7), 'batch_size=7'),
])
def test_config_errors(tiny_corpus, overrides, message):
  with pytest.raises(ValueError, match=message):
    pipeline.make_train_dataset(tiny_corpus, make_cfg(tiny_corpus, **overrides),
                                process_index=0, process_count=1, per_process_batch=2)


# ----------------------------------------------------------------------------- eval images


def test_eval_images_order_and_pixels(tiny_corpus):
  folder = os.path.join(tiny_corpus, 'retrieval')
  images, categories, names = pipeline.make_eval_images(folder, 16)
  assert images.shape == (50, 16, 16, 3) and images.dtype == np.float32
  np.testing.assert_array_equal(categories, np.arange(50) // 10)
  on_disk = [n for n in os.listdir(folder) if n.endswith('.jpg')]
  assert names == sorted(on_disk, key=lambda n: (int(n.split('_')[0]), n))
  for i in (0, 37):
    raw = tf.io.read_file(os.path.join(folder, names[i]))
    np.testing.assert_array_equal(images[i], preprocess.eval_image(raw, 16).numpy())


def test_eval_images_errors(tiny_corpus, tmp_path):
  folder = tmp_path / 'r'
  with pytest.raises(schema.CorpusError, match='retrieval folder not found'):
    pipeline.make_eval_images(folder, 16)
  shutil.copytree(os.path.join(tiny_corpus, 'retrieval'), folder)
  victim = sorted(n for n in os.listdir(folder) if n.startswith('2_'))[0]
  os.rename(folder / victim, folder / 'two.jpg')
  with pytest.raises(schema.CorpusError, match='two.jpg: file name must be'):
    pipeline.make_eval_images(folder, 16)
  os.remove(folder / 'two.jpg')
  with pytest.raises(schema.CorpusError, match='category 2 has 9 images, expected exactly 10'):
    pipeline.make_eval_images(folder, 16)


# ----------------------------------------------------------------------------- pairs corpus


@pytest.fixture(scope='module')
def pairs_corpus(tiny_corpus, tmp_path_factory):
  return make_pairs_corpus(tiny_corpus, tmp_path_factory.mktemp('p') / 'pairs')


def test_pairs_corpus_batches(pairs_corpus, tok):
  batch, records = ordered_batches(pairs_corpus, 2, 9, text_source='alt_text', text_len=6)
  eot = tokenizer_lib.eot_id(tok)
  assert len(batch['text']) > len(records)  # Wraps into the second epoch.
  for i, text in enumerate(batch['text']):
    np.testing.assert_array_equal(text, fit(records[i % len(records)]['tokens'], 6, eot))
  np.testing.assert_array_equal(batch['labels'], -1)  # No entities: nothing for a head.
  np.testing.assert_array_equal(batch['label_weights'], 0.0)
  assert np.isfinite(batch['image']).all() and batch['image'].shape == (36, 16, 16, 3)


def test_pairs_corpus_needs_alt_text(pairs_corpus):
  with pytest.raises(schema.CorpusError, match=r"pairs: a 'pairs' corpus .* trains only "
                     r"model.mode='contrastive' with input.text_source='alt_text', .*"
                     r"input.text_source='entity'"):
    pipeline.make_train_dataset(pairs_corpus, make_cfg(pairs_corpus), process_index=0,
                                process_count=1, per_process_batch=2)


def test_entities_in_a_pairs_corpus_fail_when_read(pairs_corpus, tmp_path):
  corpus = str(tmp_path / 'c')
  shutil.copytree(pairs_corpus, corpus)
  shard = schema.list_shards(corpus)[0]
  rewrite_shard(shard, bad_record(), position=2)  # An I2E record past the validated first.
  cfg = make_cfg(corpus, shuffle_buffer=1, text_source='alt_text', max_bad_record_rate=0)
  ds = pipeline.make_train_dataset(corpus, cfg, process_index=0, process_count=4,
                                   per_process_batch=2)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=rf'(?s){shard}.*pairs.* corpus \(corpus.json kind\) holds none'):
    take(ds, 3)


@pytest.mark.parametrize('mode, text_source, error', [
    ('contrastive', 'alt_text', None),
    ('multitask', 'alt_text', "got model.mode='multitask'"),
    ('supervised', 'alt_text', "got model.mode='supervised'"),
    ('contrastive', 'entity', "input.text_source='entity'"),
])
def test_resolve_from_corpus_pairs(pairs_corpus, tok, mode, text_source, error):
  config = common.base_config(mode)
  config.input.text_source = text_source
  if error:
    with pytest.raises(run_setup.ConfigError, match=f"'pairs' corpus .*{error}"):
      run_setup.resolve_from_corpus(config, pairs_corpus)
    return
  resolved = run_setup.resolve_from_corpus(config, pairs_corpus)
  assert resolved.model.head.num_classes == 0  # No entities; a contrastive model has no head.
  assert resolved.model.text.vocab_size == tok.get_vocab_size()


def test_resolve_from_corpus_i2e_unchanged(tiny_corpus):
  resolved = run_setup.resolve_from_corpus(common.base_config('multitask'), tiny_corpus)
  assert resolved.model.head.num_classes == 20
