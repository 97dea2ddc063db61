"""The I2E corpus: TFRecord schema, folder layout, entity table and validation.

This module is the single source of truth for the corpus format; docs/corpus_schema.md
explains it in prose. A corpus folder holds:

  train-XXXXX-of-YYYYY.tfrecord  tf.train.Example records (FEATURES below)
  entities.jsonl                 one entity per line, in class-index order
  tokenizer.json                 HF tokenizers byte-level BPE (see tokenizer.py)
  corpus.json                    metadata (REQUIRED_META_KEYS and more)

Two kinds of corpus (corpus.json "kind", default 'i2e'):
  i2e    images labelled with 1+ entities each: what MOFI trains on;
  pairs  raw image/alt-text pairs: no entities (num_entities 0, an empty entities.jsonl,
         empty entity lists). It trains only a contrastive model on its alt-texts: the
         bootstrap CLIP that selects the I2E entities, or the image-text baseline.

File access goes through tf.io.gfile so that a corpus can live on GCS.
"""
import dataclasses
import json
import os
import re

import numpy as np
import tensorflow as tf

from mofi_jax.data import corpus_meta
from mofi_jax.data import preprocess
from mofi_jax.data import tokenizer as tokenizer_lib

SCHEMA_VERSION = 1
ENTITIES_FILE = 'entities.jsonl'
TOKENIZER_FILE = 'tokenizer.json'
META_FILE = 'corpus.json'
SHARD_GLOB = 'train-*-of-*.tfrecord'
SHARD_RE = re.compile(r'^train-(\d{5})-of-(\d{5})\.tfrecord$')
REQUIRED_META_KEYS = ('schema_version', 'num_entities', 'num_train_examples', 'num_shards',
                      'text_len')
ENTITY_KEYS = tuple(corpus_meta.ENTITY_TYPES)   # ('index', 'id', 'name', 'description', 'count')
CORPUS_KINDS = ('i2e', 'pairs')
DEFAULT_KIND = 'i2e'  # Corpora written before "kind" existed are I2E corpora.

# name -> (tf.train.Feature kind, dtype, is a list). Scalars hold exactly one value;
# lists hold one or more (alt_text/tokens: zero or more is tolerated by the parser).
FEATURES = {
    'image/encoded': ('bytes_list', tf.string, False),
    'image/key': ('bytes_list', tf.string, False),
    'entity/class': ('int64_list', tf.int64, True),
    'entity/id': ('bytes_list', tf.string, True),
    'entity/score': ('float_list', tf.float32, True),
    'alt_text': ('bytes_list', tf.string, False),
    'alt_text/tokens': ('int64_list', tf.int64, True),
}
ENTITY_LIST_FIELDS = ('entity/class', 'entity/id', 'entity/score')
_OP_NOISE = re.compile(r'\{\{[^}]*\}\}|\[Op:\w+\]( name: )?')


class CorpusError(ValueError):
  """A corpus folder or record does not match the schema."""


def shard_name(index, num_shards):
  return f'train-{index:05d}-of-{num_shards:05d}.tfrecord'


# ----------------------------------------------------------------------------------------
# Records.


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def make_example(*, image, key, classes, entity_ids, scores, alt_text, alt_text_tokens,
                 kind=DEFAULT_KIND):
  """Serialises one corpus record. `image` is JPEG bytes; str arguments are UTF-8 encoded.

  Entity lists are non-empty in an 'i2e' corpus and empty in a 'pairs' corpus. The bytes
  are deterministic (sorted feature map), so equal records give equal shards.
  """
  enc = lambda s: s.encode('utf-8') if isinstance(s, str) else bytes(s)
  classes, entity_ids, scores = list(classes), list(entity_ids), list(scores)
  lens = (len(classes), len(entity_ids), len(scores))
  if kind not in CORPUS_KINDS:
    raise ValueError(f'make_example(key={key!r}): kind={kind!r}; expected one of '
                     f'{CORPUS_KINDS}.')
  if kind == 'pairs' and any(lens):
    raise ValueError(f"make_example(key={key!r}): a 'pairs' record holds no entities, got "
                     f'{lens[0]} entity/class, {lens[1]} entity/id, {lens[2]} entity/score.')
  if kind == 'i2e' and (not classes or len(set(lens)) != 1):
    raise ValueError(f'make_example(key={key!r}): entity/class, entity/id and entity/score '
                     f'must be non-empty and of equal length, got {lens[0]}, {lens[1]}, '
                     f'{lens[2]}.')
  feature = {
      'image/encoded': _bytes([enc(image)]),
      'image/key': _bytes([enc(key)]),
      'entity/class': tf.train.Feature(int64_list=tf.train.Int64List(value=classes)),
      'entity/id': _bytes([enc(i) for i in entity_ids]),
      'entity/score': tf.train.Feature(float_list=tf.train.FloatList(value=scores)),
      'alt_text': _bytes([enc(alt_text)]),
      'alt_text/tokens': tf.train.Feature(
          int64_list=tf.train.Int64List(value=list(alt_text_tokens))),
  }
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  # Without `deterministic` the feature map is written in a per-process hash order.
  return example.SerializeToString(deterministic=True)


def feature_spec():
  """tf.io parsing spec: scalars are required; lists parse as ragged (dense when single)."""
  spec = {}
  for name, (_, dtype, is_list) in FEATURES.items():
    spec[name] = (tf.io.RaggedFeature(dtype, row_splits_dtype=tf.int64) if is_list
                  else tf.io.FixedLenFeature([], dtype))
  return spec


def parse_examples(serialized, example_names=None):
  """Parses a scalar or a [B] batch of serialized records (usable inside tf.data).

  A scalar gives 1-D tensors for list fields; a batch gives tf.RaggedTensors.
  TF's own error names the offending field when one is missing or has the wrong type;
  `example_names` (same shape as `serialized`, e.g. the shard path) is quoted in it.
  """
  serialized = tf.convert_to_tensor(serialized, tf.string)
  if serialized.shape.rank != 0:
    return tf.io.parse_example(serialized, feature_spec(), example_names=example_names)
  # parse_single_example drops `example_names` from its errors; a batch of 1 keeps them.
  names = None if example_names is None else tf.reshape(example_names, [1])
  batch = tf.io.parse_example(serialized[None], feature_spec(), example_names=names)
  return {k: v[0] for k, v in batch.items()}


def check_example_proto(serialized, num_entities, where, eot_id=None, entity_ids=None,
                        kind=DEFAULT_KIND):
  """Checks one serialized record of a `kind` corpus against the schema in pure Python.

  Optional checks: `alt_text/tokens` ends with `eot_id`; `entity/id` agrees with the
  entity table's `entity_ids` (catches shards and table from different builds).
  Raises CorpusError naming `where` (e.g. the shard file) and the offending field.
  """
  try:
    example = tf.train.Example.FromString(serialized)
  except Exception as e:  # protobuf's DecodeError; its module path varies by version.
    raise CorpusError(f'{where}: record is not a tf.train.Example ({e}).') from e
  feats = example.features.feature
  values = {}
  for name, (list_kind, _, is_list) in FEATURES.items():
    if name not in feats:
      raise CorpusError(f'{where}: field {name!r} is missing (expected {list_kind}).')
    got = feats[name].WhichOneof('kind')
    if got != list_kind:
      raise CorpusError(f'{where}: field {name!r} has type {got}, expected {list_kind}.')
    values[name] = list(getattr(feats[name], list_kind).value)
    if not is_list and len(values[name]) != 1:
      raise CorpusError(f'{where}: field {name!r} must hold exactly 1 value, '
                        f'got {len(values[name])}.')
  _check_entity_lists(values, num_entities, where, kind)
  if entity_ids is not None:
    got = [i.decode('utf-8', 'replace') for i in values['entity/id']]
    want = [entity_ids[c] for c in values['entity/class']]
    if got != want:
      raise CorpusError(f"{where}: field 'entity/id' is {got} but {ENTITIES_FILE} gives "
                        f'{want} for entity/class {values["entity/class"]}.')
  tokens = values['alt_text/tokens']
  if eot_id is not None and (not tokens or tokens[-1] != eot_id):
    raise CorpusError(f'{where}: field \'alt_text/tokens\' must end with <eot> (id {eot_id}), '
                      f'got {tokens[-3:]}.')
  return values


def _check_entity_lists(values, num_entities, where, kind):
  lens = [len(values[n]) for n in ENTITY_LIST_FIELDS]
  if kind == 'pairs':
    if any(lens):
      raise CorpusError(f'{where}: fields {ENTITY_LIST_FIELDS} hold {lens} values; a '
                        f"'pairs' corpus (corpus.json kind) holds none.")
    return
  if lens[0] == 0:
    raise CorpusError(f'{where}: field \'entity/class\' is empty (expected 1+ entities).')
  if len(set(lens)) != 1:
    raise CorpusError(f'{where}: fields {ENTITY_LIST_FIELDS} must have equal lengths, '
                      f'got {lens}.')
  classes = values['entity/class']
  bad = [c for c in classes if not 0 <= c < num_entities]
  if bad:
    raise CorpusError(f'{where}: field \'entity/class\' has index {bad[0]} out of range '
                      f'[0, {num_entities}) of {ENTITIES_FILE}.')
  if len(set(classes)) != len(classes):
    raise CorpusError(f'{where}: field \'entity/class\' repeats an entity: {classes}.')


# ----------------------------------------------------------------------------------------
# Entity table and metadata.


@dataclasses.dataclass
class EntityTable:
  """Entities in class-index order (class i is row i)."""
  ids: list
  names: list
  descriptions: list
  counts: np.ndarray  # int64 [C]: train images carrying the entity.

  def __len__(self):
    return len(self.ids)


def write_entities(corpus_dir, table):
  path = os.path.join(corpus_dir, ENTITIES_FILE)
  with tf.io.gfile.GFile(path, 'w') as f:
    for i in range(len(table)):
      row = dict(index=i, id=table.ids[i], name=table.names[i],
                 description=table.descriptions[i], count=int(table.counts[i]))
      f.write(json.dumps(row, ensure_ascii=False) + '\n')


def load_entities(corpus_dir, allow_empty=None):
  """The entity table. An empty one is valid only in a 'pairs' corpus: `allow_empty`
  None decides from corpus.json's kind."""
  path = os.path.join(corpus_dir, ENTITIES_FILE)
  if not tf.io.gfile.exists(path):
    raise CorpusError(f'{path}: entity table not found.')
  rows = []
  with tf.io.gfile.GFile(path, 'r') as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        rows.append(_parse_entity_line(line, path, line_no, expected_index=len(rows)))
  if allow_empty is None:
    allow_empty = _kind_on_disk(corpus_dir) == 'pairs'
  if not rows and not allow_empty:
    raise CorpusError(f'{path}: entity table is empty (only a corpus.json "kind": "pairs" '
                      'corpus has no entities).')
  return EntityTable(ids=[r['id'] for r in rows], names=[r['name'] for r in rows],
                     descriptions=[r['description'] for r in rows],
                     counts=np.array([r['count'] for r in rows], np.int64))


def _parse_entity_line(line, path, line_no, expected_index):
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise CorpusError(f'{path}:{line_no}: not valid JSON ({e}).') from e
  corpus_meta.check_entity_row(row, f'{path}:{line_no}', CorpusError)
  if row['index'] != expected_index:
    raise CorpusError(f'{path}:{line_no}: field \'index\' is {row["index"]}, expected '
                      f'{expected_index} (indices must be 0..C-1 in order, no gaps).')
  return row


def _kind_on_disk(corpus_dir):
  try:
    return corpus_kind(load_corpus_meta(corpus_dir))
  except CorpusError:
    return DEFAULT_KIND


def corpus_kind(meta, where=META_FILE):
  """'i2e' or 'pairs' from a corpus.json dict (absent: 'i2e')."""
  kind = meta.get('kind', DEFAULT_KIND)
  if kind not in CORPUS_KINDS:
    raise CorpusError(f"{where}: field 'kind' is {kind!r}, expected one of {CORPUS_KINDS}.")
  return kind


def write_corpus_meta(corpus_dir, meta):
  with tf.io.gfile.GFile(os.path.join(corpus_dir, META_FILE), 'w') as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True) + '\n')


def load_corpus_meta(corpus_dir):
  path = os.path.join(corpus_dir, META_FILE)
  if not tf.io.gfile.exists(path):
    raise CorpusError(f'{path}: corpus metadata not found.')
  with tf.io.gfile.GFile(path, 'r') as f:
    try:
      meta = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CorpusError(f'{path}: not valid JSON ({e}).') from e
  corpus_meta.check_meta(meta, path, REQUIRED_META_KEYS, CorpusError)
  if meta['schema_version'] != SCHEMA_VERSION:
    raise CorpusError(f'{path}: field \'schema_version\' is {meta["schema_version"]}, '
                      f'this code reads version {SCHEMA_VERSION}.')
  corpus_kind(meta, path)
  return meta


def list_shards(corpus_dir):
  """Sorted full paths of the train shards."""
  return sorted(tf.io.gfile.glob(os.path.join(corpus_dir, SHARD_GLOB)))


# ----------------------------------------------------------------------------------------
# Validation.


def validate_corpus(corpus_dir, max_shards=None, records_per_shard=1):
  """Checks the layout, metadata and entity table, then records: their fields against the
  schema and their image with the training decoder (preprocess.decode_pixels).

  Which records: the first `records_per_shard` of each shard (None: every record) of the
  first `max_shards` shards (None: all). The default, the first record of every shard,
  catches a wrong or mixed-up corpus cheaply; a bad record deeper in a shard is for the
  builder's clean stage to prevent (it decodes every image with the same decoder) and for
  the training input to skip (pipeline.skip_bad_records). records_per_shard=None reads the
  whole corpus.
  Returns (meta, entity_table); `corpus_kind(meta)` tells an 'i2e' from a 'pairs' corpus.
  Raises CorpusError naming the file, record and field.
  """
  corpus_dir = os.fspath(corpus_dir)
  if not tf.io.gfile.isdir(corpus_dir):
    raise CorpusError(f'{corpus_dir}: corpus directory not found.')
  if not tf.io.gfile.listdir(corpus_dir):
    raise CorpusError(f'{corpus_dir}: corpus directory is empty (expected {SHARD_GLOB} '
                      f'shards, {ENTITIES_FILE}, {TOKENIZER_FILE}, {META_FILE}).')
  shards = list_shards(corpus_dir)
  if not shards:
    raise CorpusError(f'{corpus_dir}: no shards matching {SHARD_GLOB}.')
  meta = load_corpus_meta(corpus_dir)
  kind = corpus_kind(meta)
  table = load_entities(corpus_dir, allow_empty=kind == 'pairs')
  tok_path = os.path.join(corpus_dir, TOKENIZER_FILE)
  if not tf.io.gfile.exists(tok_path):
    raise CorpusError(f'{tok_path}: tokenizer not found.')
  try:
    eot = tokenizer_lib.eot_id(tokenizer_lib.load_tokenizer(tok_path))
  except (OSError, ValueError) as e:
    raise CorpusError(str(e)) from e
  _check_meta_consistency(corpus_dir, meta, table, shards)
  if kind == 'pairs' and len(table):
    raise CorpusError(f"{os.path.join(corpus_dir, ENTITIES_FILE)}: a 'pairs' corpus "
                      f'(corpus.json kind) has no entities, but the table has {len(table)} rows.')
  for path in shards[:max_shards]:
    for index, record in enumerate(_records(path, records_per_shard)):
      where = path if index == 0 else f'{path} record {index}'
      values = check_example_proto(record, len(table), where=where, eot_id=eot,
                                   entity_ids=table.ids, kind=kind)
      _check_image(values['image/encoded'][0], where)
  return meta, table


def record_error(record, num_entities, kind=DEFAULT_KIND):
  """Why one serialized record cannot train, in words (its key first), or None: the
  schema checks and the training decoder, run in Python. pipeline.skip_bad_records calls
  it for a record that failed, to name it and the reason in the log."""
  try:
    values = check_example_proto(record, num_entities, where='record', kind=kind)
    key = values['image/key'][0].decode('utf-8', 'replace')
  except CorpusError as e:
    return f'key {_key_of(record)!r}: {e}'
  try:
    _check_image(values['image/encoded'][0], 'record')
  except CorpusError as e:
    return f'key {key!r}: {e}'
  return None


def _key_of(record):
  """image/key of a record that may not parse; '?' when there is none."""
  try:
    keys = tf.train.Example.FromString(record).features.feature['image/key'].bytes_list.value
    return keys[0].decode('utf-8', 'replace') if keys else '?'
  except Exception:  # pylint: disable=broad-except  # protobuf's DecodeError varies.
    return '?'


def _check_image(image_bytes, where):
  try:
    preprocess.decode_pixels(image_bytes)
  except tf.errors.OpError as e:
    message = _OP_NOISE.sub('', e.message).strip()  # TF's node names: no help here.
    raise CorpusError(f"{where}: field 'image/encoded' does not decode with the training "
                      f'decoder ({message}).') from e


def _check_meta_consistency(corpus_dir, meta, table, shards):
  meta_path = os.path.join(corpus_dir, META_FILE)
  if meta['num_entities'] != len(table):
    raise CorpusError(f'{meta_path}: field \'num_entities\' is {meta["num_entities"]} but '
                      f'{ENTITIES_FILE} has {len(table)} rows.')
  if meta['num_shards'] != len(shards):
    raise CorpusError(f'{meta_path}: field \'num_shards\' is {meta["num_shards"]} but '
                      f'{len(shards)} shard files exist.')
  for path in shards:
    match = SHARD_RE.match(os.path.basename(path))
    if not match or int(match.group(2)) != len(shards):
      raise CorpusError(f'{path}: shard name must be {shard_name(0, len(shards))} style '
                        f'with YYYYY = {len(shards)} shards.')
  if 'commit' in meta:
    _check_manifest(corpus_dir, meta['commit'].get('files', {}), shards)


def _check_manifest(corpus_dir, files, shards):
  """corpus.json's `commit.files` (written by data_prep.build_i2e) against the folder."""
  meta_path = os.path.join(corpus_dir, META_FILE)
  for path in shards:
    if os.path.basename(path) not in files:
      raise CorpusError(f'{path}: not in {meta_path} commit.files: a stale shard of another '
                        'run; rebuild with --overwrite.')
  for rel, size in files.items():
    path = os.path.join(corpus_dir, rel)
    if not tf.io.gfile.exists(path):
      raise CorpusError(f'{path}: listed in {meta_path} commit.files but missing: the folder '
                        'does not hold the corpus that manifest describes.')
    got = tf.io.gfile.stat(path).length
    if got != size:
      raise CorpusError(f'{path}: {got} bytes, but {meta_path} commit.files says {size}.')


def _records(path, limit):
  """The first `limit` (None: all) serialized records of one shard; at least one."""
  try:
    ds = tf.data.TFRecordDataset(path)
    count = 0
    for record in ds if limit is None else ds.take(limit):
      count += 1
      yield record.numpy()
  except tf.errors.OpError as e:
    raise CorpusError(f'{path}: cannot read a TFRecord ({e.message}).') from e
  if not count:
    raise CorpusError(f'{path}: shard holds no records.')
