"""Tests for mofi_jax/data/schema.py: records vs the raw protobuf API, and validation."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from records import raw_example
from mofi_jax.data import schema

RECORD = dict(image=b'\xff\xd8jpeg-bytes', key='abc123', classes=[7, 2], entity_ids=['Q7', 'Q2'],
              scores=[0.25, 0.375], alt_text='Zorvath und Freunde ✓', alt_text_tokens=[1, 40, 2])


def test_make_example_matches_raw_proto():
  ex = tf.train.Example.FromString(schema.make_example(**RECORD)).features.feature
  assert set(ex) == set(schema.FEATURES)
  assert ex['image/encoded'].bytes_list.value == [RECORD['image']]
  assert ex['image/key'].bytes_list.value == [b'abc123']
  assert ex['entity/class'].int64_list.value == [7, 2]
  assert ex['entity/id'].bytes_list.value == [b'Q7', b'Q2']
  np.testing.assert_allclose(ex['entity/score'].float_list.value, [0.25, 0.375])
  assert ex['alt_text'].bytes_list.value[0].decode('utf-8') == RECORD['alt_text']
  assert ex['alt_text/tokens'].int64_list.value == [1, 40, 2]


def test_make_example_rejects_unequal_entity_lists():
  with pytest.raises(ValueError, match='equal length'):
    schema.make_example(**{**RECORD, 'scores': [0.3]})
  with pytest.raises(ValueError, match='non-empty'):
    schema.make_example(**{**RECORD, 'classes': [], 'entity_ids': [], 'scores': []})


def test_parse_single_and_batch():
  other = {**RECORD, 'key': 'zz', 'classes': [5], 'entity_ids': ['Q5'], 'scores': [0.2],
           'alt_text_tokens': [1, 2]}
  records = [schema.make_example(**RECORD), schema.make_example(**other)]
  single = schema.parse_examples(records[0])
  assert single['image/key'].numpy() == b'abc123'
  assert isinstance(single['entity/class'], tf.Tensor)  # Dense 1-D, not ragged.
  np.testing.assert_array_equal(single['entity/class'].numpy(), [7, 2])
  batch = schema.parse_examples(tf.constant(records))
  assert batch['entity/class'].to_list() == [[7, 2], [5]]
  assert batch['entity/id'].to_list() == [[b'Q7', b'Q2'], [b'Q5']]
  assert batch['alt_text/tokens'].to_list() == [[1, 40, 2], [1, 2]]
  np.testing.assert_allclose(batch['entity/score'].flat_values.numpy(), [0.25, 0.375, 0.2])


def test_parse_error_names_field_and_example():
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'(?s)shard-7.*image/key'):
    schema.parse_examples(raw_example(**{'image/key': None}), example_names='shard-7')


@pytest.mark.parametrize('overrides, message', [
    ({'image/key': None}, "field 'image/key' is missing"),
    ({'entity/class': tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))},
     "field 'entity/class' has type float_list, expected int64_list"),
    ({'entity/class': tf.train.Feature(int64_list=tf.train.Int64List(value=[3]))},
     "'entity/class' has index 3 out of range"),
    ({'entity/id': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'a', b'b']))},
     'equal lengths'),
    ({'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'a', b'b']))},
     "'image/encoded' must hold exactly 1 value"),
    ({'alt_text/tokens': tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 5]))},
     'must end with <eot>'),
])
def test_check_example_proto(overrides, message):
  schema.check_example_proto(raw_example(), num_entities=3, where='f', eot_id=2)  # Valid.
  with pytest.raises(schema.CorpusError, match=message):
    schema.check_example_proto(raw_example(**overrides), num_entities=3, where='f', eot_id=2)


def test_entities_roundtrip(tmp_path):
  table = schema.EntityTable(ids=['Q1', 'Q9'], names=['Zorvath', 'Ælf'],
                             descriptions=['a red star', 'a blue ring'],
                             counts=np.array([5, 3]))
  schema.write_entities(str(tmp_path), table)
  lines = [json.loads(l) for l in (tmp_path / schema.ENTITIES_FILE).read_text().splitlines()]
  assert lines[1] == dict(index=1, id='Q9', name='Ælf', description='a blue ring', count=3)
  loaded = schema.load_entities(str(tmp_path))
  assert len(loaded) == 2 and loaded.names == table.names and loaded.ids == table.ids
  np.testing.assert_array_equal(loaded.counts, [5, 3])


def test_load_entities_index_gap(tmp_path):
  rows = [dict(index=i, id=f'Q{i}', name='n', description='d', count=1) for i in (0, 2)]
  (tmp_path / schema.ENTITIES_FILE).write_text('\n'.join(json.dumps(r) for r in rows))
  with pytest.raises(schema.CorpusError, match=r"entities.jsonl:2: field 'index' is 2, expected 1"):
    schema.load_entities(str(tmp_path))


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def corpus_copy(tiny_corpus, tmp_path):
  dst = tmp_path / 'corpus'
  shutil.copytree(tiny_corpus, dst)
  return str(dst)


def test_validate_ok(tiny_corpus):
  meta, table = schema.validate_corpus(tiny_corpus)
  assert meta['schema_version'] == schema.SCHEMA_VERSION
  assert len(table) == meta['num_entities']
  assert len(schema.list_shards(tiny_corpus)) == meta['num_shards']


def test_validate_missing_and_empty_dir(tmp_path):
  with pytest.raises(schema.CorpusError, match='nope: corpus directory not found'):
    schema.validate_corpus(str(tmp_path / 'nope'))
  with pytest.raises(schema.CorpusError, match='directory is empty'):
    schema.validate_corpus(str(tmp_path))


def test_validate_no_shards(corpus_copy):
  for path in schema.list_shards(corpus_copy):
    os.remove(path)
  with pytest.raises(schema.CorpusError, match='no shards matching'):
    schema.validate_corpus(corpus_copy)


@pytest.mark.parametrize('name', [schema.ENTITIES_FILE, schema.TOKENIZER_FILE, schema.META_FILE])
def test_validate_missing_file(corpus_copy, name):
  os.remove(os.path.join(corpus_copy, name))
  with pytest.raises(schema.CorpusError, match=f'{name}: .*not found'):
    schema.validate_corpus(corpus_copy)


def test_validate_corrupt_tokenizer(corpus_copy):
  with open(os.path.join(corpus_copy, schema.TOKENIZER_FILE), 'w') as f:
    f.write('{garbage')
  with pytest.raises(schema.CorpusError, match='tokenizer.json: not a valid'):
    schema.validate_corpus(corpus_copy)


def test_validate_meta_field(corpus_copy):
  path = os.path.join(corpus_copy, schema.META_FILE)
  with open(path) as f:
    meta = json.load(f)
  meta['num_entities'] += 1
  with open(path, 'w') as f:
    json.dump(meta, f)
  with pytest.raises(schema.CorpusError, match="corpus.json: field 'num_entities'"):
    schema.validate_corpus(corpus_copy)


def test_validate_entity_gap(corpus_copy):
  path = os.path.join(corpus_copy, schema.ENTITIES_FILE)
  with open(path) as f:
    lines = f.readlines()
  with open(path, 'w') as f:
    f.writelines(lines[:3] + lines[4:])
  with pytest.raises(schema.CorpusError, match="entities.jsonl:4: field 'index' is 4, expected 3"):
    schema.validate_corpus(corpus_copy)


@pytest.mark.parametrize('overrides, message', [
    ({'alt_text': None}, "field 'alt_text' is missing"),
    ({'entity/score': tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))},
     "field 'entity/score' has type int64_list, expected float_list"),
    ({'entity/class': tf.train.Feature(int64_list=tf.train.Int64List(value=[10_000]))},
     "field 'entity/class' has index 10000 out of range"),
    ({}, "field 'entity/id' is \\['Q1'\\] but entities.jsonl gives"),
    ('valid_ids', "field 'image/encoded' does not decode with the training decoder"),
])
def test_validate_bad_first_record(corpus_copy, overrides, message):
  if overrides == 'valid_ids':  # Everything right but the image bytes.
    ids = [schema.load_entities(corpus_copy).ids[0].encode()]
    overrides = {'entity/id': tf.train.Feature(bytes_list=tf.train.BytesList(value=ids))}
  shard = schema.list_shards(corpus_copy)[2]
  records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
  with tf.io.TFRecordWriter(shard) as w:
    for record in [raw_example(**overrides)] + records:
      w.write(record)
  with pytest.raises(schema.CorpusError, match=f'{os.path.basename(shard)}: {message}'):
    schema.validate_corpus(corpus_copy)


def test_validate_every_record_finds_an_animated_webp_deep_in_a_shard(corpus_copy):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  frames = [Image.new('RGB', (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
  webp = io.BytesIO()
  frames[0].save(webp, 'WEBP', save_all=True, append_images=frames[1:], lossless=True)
  ids = [schema.load_entities(corpus_copy).ids[0].encode()]
  shard = schema.list_shards(corpus_copy)[1]
  records = [r.numpy() for r in tf.data.TFRecordDataset(shard)]
  records.insert(5, raw_example(image=webp.getvalue(), **{'entity/id': tf.train.Feature(
      bytes_list=tf.train.BytesList(value=ids))}))
  with tf.io.TFRecordWriter(shard) as w:
    for record in records:
      w.write(record)
  schema.validate_corpus(corpus_copy)  # The default reads each shard's first record only.
  schema.validate_corpus(corpus_copy, records_per_shard=5)
  with pytest.raises(schema.CorpusError, match=f"{shard} record 5: field 'image/encoded' does "
                     'not decode with the training decoder \\(WebP Animation'):
    schema.validate_corpus(corpus_copy, records_per_shard=None)


# ----------------------------------------------------------------------------- pairs corpus


def make_pairs_corpus(i2e_dir, out_dir):
  """A 'pairs' corpus with the images, alt-texts and tokenizer of an I2E corpus."""
  os.makedirs(out_dir)
  shutil.copy(os.path.join(i2e_dir, schema.TOKENIZER_FILE), out_dir)
  open(os.path.join(out_dir, schema.ENTITIES_FILE), 'w').close()
  shards = schema.list_shards(i2e_dir)
  for path in shards:
    with tf.io.TFRecordWriter(os.path.join(out_dir, os.path.basename(path))) as w:
      for record in tf.data.TFRecordDataset(path):
        f = tf.train.Example.FromString(record.numpy()).features.feature
        w.write(schema.make_example(
            image=f['image/encoded'].bytes_list.value[0], key=f['image/key'].bytes_list.value[0],
            classes=[], entity_ids=[], scores=[], alt_text=f['alt_text'].bytes_list.value[0],
            alt_text_tokens=f['alt_text/tokens'].int64_list.value, kind='pairs'))
  meta = schema.load_corpus_meta(i2e_dir)
  schema.write_corpus_meta(out_dir, dict(meta, kind='pairs', num_entities=0))
  return str(out_dir)


def empty(list_kind):
  return tf.train.Feature(**{list_kind: getattr(tf.train, {
      'int64_list': 'Int64List', 'bytes_list': 'BytesList', 'float_list': 'FloatList'}[
          list_kind])()})


NO_ENTITIES = {'entity/class': empty('int64_list'), 'entity/id': empty('bytes_list'),
               'entity/score': empty('float_list')}


def test_make_example_pairs_kind():
  pairs = {**RECORD, 'classes': [], 'entity_ids': [], 'scores': []}
  ex = tf.train.Example.FromString(schema.make_example(**pairs, kind='pairs')).features.feature
  assert set(ex) == set(schema.FEATURES)
  for name in schema.ENTITY_LIST_FIELDS:  # Present, of the right type, and empty.
    kind = schema.FEATURES[name][0]
    assert ex[name].WhichOneof('kind') == kind and not getattr(ex[name], kind).value
  assert ex['alt_text/tokens'].int64_list.value == [1, 40, 2]
  with pytest.raises(ValueError, match="a 'pairs' record holds no entities, got 2 entity/class"):
    schema.make_example(**RECORD, kind='pairs')
  with pytest.raises(ValueError, match="kind='web'"):
    schema.make_example(**RECORD, kind='web')


def test_make_example_bytes_equal_across_processes():
  """The feature map is serialised in sorted order, not a per-process hash order."""
  code = ('import sys; from test_schema import RECORD; from mofi_jax.data import schema; '
          'sys.stdout.buffer.write(schema.make_example(**RECORD))')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]),
             TF_CPP_MIN_LOG_LEVEL='3')
  other = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                         check=True).stdout
  assert other == schema.make_example(**RECORD)


def test_check_example_proto_pairs_kind():
  values = schema.check_example_proto(raw_example(**NO_ENTITIES), num_entities=0, where='f',
                                      eot_id=2, kind='pairs')
  assert values['entity/class'] == [] and values['alt_text'] == [b'hi']
  with pytest.raises(schema.CorpusError, match=r"f: fields .* hold \[1, 1, 1\] values; a "
                     r"'pairs' corpus \(corpus.json kind\) holds none"):
    schema.check_example_proto(raw_example(), num_entities=0, where='f', kind='pairs')
  with pytest.raises(schema.CorpusError, match="'entity/class' is empty"):
    schema.check_example_proto(raw_example(**NO_ENTITIES), num_entities=3, where='f')


def test_validate_pairs_corpus(tiny_corpus, tmp_path):
  corpus = make_pairs_corpus(tiny_corpus, tmp_path / 'pairs')
  meta, table = schema.validate_corpus(corpus)
  assert schema.corpus_kind(meta) == 'pairs' and meta['num_entities'] == 0 and len(table) == 0
  assert len(schema.load_entities(corpus)) == 0  # Allowed because corpus.json says 'pairs'.
  assert schema.corpus_kind({}) == 'i2e'  # Corpora from before "kind" existed.


def rewrite_meta(corpus_dir, **fields):
  path = os.path.join(corpus_dir, schema.META_FILE)
  with open(path) as f:
    meta = json.load(f)
  with open(path, 'w') as f:
    json.dump(dict(meta, **fields), f)


def test_validate_pairs_corpus_errors(tiny_corpus, tmp_path, corpus_copy):
  pairs = make_pairs_corpus(tiny_corpus, tmp_path / 'pairs')
  rewrite_meta(pairs, kind='web')
  with pytest.raises(schema.CorpusError, match="corpus.json: field 'kind' is 'web', expected"):
    schema.validate_corpus(pairs)
  # An I2E corpus whose corpus.json claims 'pairs': its records hold entities.
  shutil.copy(os.path.join(corpus_copy, schema.ENTITIES_FILE), pairs)
  rewrite_meta(corpus_copy, kind='pairs')
  with pytest.raises(schema.CorpusError, match="a 'pairs' corpus .* has no entities, but the "
                     'table has 20 rows'):
    schema.validate_corpus(corpus_copy)
  # A 'pairs' corpus whose corpus.json lost its kind is read as I2E: no entities is an error.
  rewrite_meta(pairs, kind='i2e')
  open(os.path.join(pairs, schema.ENTITIES_FILE), 'w').close()
  with pytest.raises(schema.CorpusError, match='entities.jsonl: entity table is empty'):
    schema.validate_corpus(pairs)
