"""WriteCorpus: the corpus folder, in the format of mofi_jax/data/schema.py.

Input: a dict of PCollections: 'main' (SelectedPair), 'classes' (one element: the kept
(entity_id, count) pairs in class order, from GlobalPasses), 'entity_counts',
'dead_letter' (every earlier stage's, flattened) and 'tallies' (stats.StageTallies of
every earlier stage). A pairs corpus (`kind='pairs'`: no entities) needs no 'classes'
nor 'entity_counts'. Output: one element, the stats.json dict.

Everything goes to a temporary sibling folder, counted (stats.check_reconciled), given its
manifest (corpus.json's `commit`), validated (schema.validate_corpus) and committed into
`out_dir` (commit.py: a rename, or on object stores a copy with the manifest written last;
safe to retry); an existing non-empty `out_dir` is refused unless `overwrite`, and even
then replaced only at that point:
  train-XXXXX-of-YYYYY.tfrecord  schema.make_example records
  entities.jsonl, tokenizer.json, corpus.json   through schema
  dataset_info.json, features.json              TFDS metadata (tfds.builder_from_directory)
  stats.json                                    see stats.py
  metadata/train-XXXXX-of-YYYYY.parquet         per record: key, url, entities, scores and
                                                the per-mention choices (metadata.py)
  dead_letter/dead_letter-SSSSS-of-NNNNN.jsonl  one JSON per dead letter: stage, reason,
                                                key, source, detail, count

Shards, deterministic and size-balanced: a record's bucket is sha256(seed, key) modulo
num_shards * BUCKETS_PER_SHARD; buckets go to shards largest first, each to the shard
with the fewest bytes so far (ties: lower index), so shard sizes differ by about one
bucket (~1/BUCKETS_PER_SHARD of a shard); records are sorted by key within a shard.
Same records + same seed -> byte-identical shards, whatever the runner's parallelism.
`num_shards` is an upper bound: fewer non-empty buckets give fewer (never empty)
shards. One worker holds one shard's records while it sorts and writes them.

Tokenizer: `tokenizer` is a tokenizer.json to reuse, or '' to train a byte-level BPE
on the entity texts ('{name}, {description}', class order) followed by a bounded,
deterministic sample of alt-texts: the TOKENIZER_SAMPLE records with the smallest
sha256(seed, key), in that order.
"""
import dataclasses
import hashlib
import heapq
import json
import os
import tempfile
import typing
import uuid

import apache_beam as beam
import tensorflow as tf

from data_prep.i2e import commit as commit_lib
from data_prep.i2e import metadata
from data_prep.i2e import stats as stats_lib
from data_prep.i2e import types
from mofi_jax.data import pipeline as spine_pipeline
from mofi_jax.data import schema
from mofi_jax.data import tokenizer as tokenizer_lib

STAGE = 'write'
BUCKETS_PER_SHARD = 64
TOKENIZER_SAMPLE = 100_000
STATS_FILE = 'stats.json'
DEAD_LETTER_DIR = 'dead_letter'
TFDS_TEMPLATE = '{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}'  # = schema.shard_name's layout.
_TFRECORD_OVERHEAD = 16  # Length, length CRC and data CRC around each record.


OutputExistsError = commit_lib.OutputExistsError
check_out_dir = commit_lib.check_out_dir


class NoOutputError(RuntimeError):
  """No record survived; the temporary folder with stats.json is kept for inspection."""


# ------------------------------------------------------------------------- shards


def seeded_hash(seed, key):
  return int.from_bytes(hashlib.sha256(f'{seed}\0{key}'.encode('utf-8')).digest()[:8], 'big')


def plan_shards(bucket_bytes, num_shards):
  """[(bucket, bytes)] -> ({bucket: shard}, shards used): largest bucket to lightest shard."""
  buckets = sorted(((b, n) for b, n in bucket_bytes if n > 0), key=lambda bn: (-bn[1], bn[0]))
  used = min(num_shards, len(buckets))
  loads = [(0, shard) for shard in range(used)]
  assignment = {}
  for bucket, size in buckets:
    load, shard = heapq.heappop(loads)
    assignment[bucket] = shard
    heapq.heappush(loads, (load + size, shard))
  return assignment, used


class _WriteShardFn(beam.DoFn):
  def __init__(self, folder):
    self._folder = folder

  def process(self, item, plan):
    shard, records = item
    records = sorted(records)  # Keys are unique (read.py), so bytes are never compared.
    tf.io.gfile.makedirs(self._folder)
    with tf.io.TFRecordWriter(os.path.join(self._folder, schema.shard_name(shard, plan[1]))) as w:
      for _, record, _ in records:
        w.write(record)
    metadata.write_shard(metadata.shard_path(self._folder, shard, plan[1]),
                         [row for _, _, row in records])
    yield shard, len(records), sum(len(r) + _TFRECORD_OVERHEAD for _, r, _ in records)


def _to_shard(bucketed, plan):
  bucket, (key, record, row) = bucketed
  stats_lib.count_shuffled('by_shard', len(key) + len(record) + len(row) + 12)
  return plan[0][bucket], (key, record, row)


class WriteShards(beam.PTransform):
  """(key, serialized record, metadata row) -> (shard, records, bytes) once each shard's
  TFRecord file and metadata table are written."""

  def __init__(self, folder, num_shards, seed):
    super().__init__()
    self._folder, self._num_shards, self._seed = folder, num_shards, seed

  def expand(self, records):
    buckets = self._num_shards * BUCKETS_PER_SHARD
    seed = self._seed
    bucketed = records | 'Bucket' >> beam.Map(
        lambda kr: (seeded_hash(seed, kr[0]) % buckets, kr))
    plan = (bucketed
            | 'BucketBytes' >> beam.Map(lambda b: (b[0], len(b[1][1]) + _TFRECORD_OVERHEAD))
            | 'SumBytes' >> beam.CombinePerKey(sum)
            | 'AllBuckets' >> beam.combiners.ToList()
            | 'Plan' >> beam.Map(plan_shards, self._num_shards))
    return (bucketed
            | 'ToShard' >> beam.Map(_to_shard, beam.pvalue.AsSingleton(plan))
            | 'GroupByShard' >> beam.GroupByKey()
            | 'WriteShard' >> beam.ParDo(_WriteShardFn(self._folder),
                                         beam.pvalue.AsSingleton(plan)))


# ------------------------------------------------------------------------- records


def read_tokenizer_json(path):
  """Contents of a tokenizer.json, checked by tokenizer.load_tokenizer (clear errors)."""
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'{path}: tokenizer file not found.')
  with tf.io.gfile.GFile(path, 'r') as f:
    text = f.read()
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, schema.TOKENIZER_FILE)
    with open(local, 'w') as f:
      f.write(text)
    try:
      tokenizer_lib.load_tokenizer(local)
    except ValueError as e:
      raise ValueError(f'{path}: {str(e).split(": ", 1)[-1]}') from None
  return text


def entity_table(classes, kb_dir):
  """schema.EntityTable of the kept entities; names and descriptions from the KB."""
  if not classes:
    return schema.EntityTable(ids=[], names=[], descriptions=[], counts=[])
  from data_prep.i2e import kb as kb_lib  # pylint: disable=import-outside-toplevel
  kb = kb_lib.load_cached(kb_dir)
  entities = [kb.entity(e) for e, _ in classes]
  return schema.EntityTable(ids=[e.id for e in entities], names=[e.label for e in entities],
                            descriptions=[e.description for e in entities],
                            counts=[int(n) for _, n in classes])


def train_tokenizer_json(table, sample, vocab_size):
  """BPE on the entity texts, then the alt-text sample [(hash, key, text)] in hash order."""
  texts = spine_pipeline.entity_texts(table, spine_pipeline.DEFAULT_ENTITY_TEMPLATE)
  texts += [text for _, _, text in sorted(sample)]
  return tokenizer_lib.train_bpe(texts or [''], vocab_size).to_str()


@beam.typehints.with_output_types(typing.Tuple[str, bytes, bytes])  # Tagged outputs aside.
class _EncodeFn(beam.DoFn):
  """SelectedPair -> (key, serialized record, metadata row); a failure is a dead letter."""

  def __init__(self, text_len, kind):
    self._text_len, self._kind = text_len, kind
    self._tok_json = self._tok = None

  def _tokenizer(self, tok_json):
    if tok_json is not self._tok_json:  # One side-input object per worker: parse once.
      import tokenizers  # pylint: disable=import-outside-toplevel
      self._tok = tokenizers.Tokenizer.from_str(tok_json)
      self._tok.no_padding()
      self._tok.no_truncation()
      self._tok_json = tok_json
    return self._tok

  def process(self, selected, class_index, tok_json):
    pair = selected.pair
    try:
      tok = self._tokenizer(tok_json)
      tokens = tokenizer_lib.fit_ids(tok.encode(pair.text).ids, self._text_len,
                                     tokenizer_lib.eot_id(tok))
      record = schema.make_example(
          image=pair.image, key=pair.key, classes=[class_index[e] for e in selected.entity_ids],
          entity_ids=selected.entity_ids, scores=selected.scores, alt_text=pair.text,
          alt_text_tokens=tokens, kind=self._kind)
      row = metadata.row_json(selected)
    except Exception as e:  # pylint: disable=broad-except
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
          STAGE, 'encode_failed', pair.key, pair.source, f'{type(e).__name__}: {e}'[:500]))
      return
    yield pair.key, record, row


# ------------------------------------------------------------------------- finalize


@dataclasses.dataclass(frozen=True)
class Settings:
  run_id: str
  tmp_dir: str
  out_dir: str
  overwrite: bool
  kind: str
  text_len: int
  stage_names: tuple
  meta: dict


def tfds_features():
  """The schema's features as TFDS connectors ('image/encoded' decodes to uint8 pixels)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  f = tfds.features
  return f.FeaturesDict({
      'image': f.FeaturesDict({'encoded': f.Image(), 'key': f.Text()}),
      'entity': f.FeaturesDict({'class': f.Sequence(np.int64), 'id': f.Sequence(f.Text()),
                                'score': f.Sequence(np.float32)}),
      'alt_text': f.Text(),
      'alt_text/tokens': f.Sequence(np.int64),
  })


def write_tfds_metadata(corpus_dir, shard_lengths, num_bytes):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  split = tfds.core.SplitInfo(
      name='train', shard_lengths=list(shard_lengths), num_bytes=num_bytes,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=corpus_dir, template=TFDS_TEMPLATE, split='train', filetype_suffix='tfrecord'))
  tfds.folder_dataset.write_metadata(
      data_dir=corpus_dir, features=tfds_features(), split_infos=[split],
      filename_template=TFDS_TEMPLATE, check_data=False,
      description='I2E corpus written by data_prep.build_i2e (see docs/corpus_schema.md).')


def _write_text(path, text):
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(text)


def finalize(_, settings, shard_rows, table, tok_json, tallies, classes, entity_counts,
             dead_files):
  """Writes the metadata files and stats.json, checks counts and schema, moves into place."""
  del dead_files  # A side input only so that the dead letters are written before this.
  s = settings
  if commit_lib.committed_run(s.out_dir) == s.run_id:   # The runner retried a done commit.
    with tf.io.gfile.GFile(os.path.join(s.out_dir, STATS_FILE)) as f:
      yield json.loads(f.read())
    return
  entities = stats_lib.entity_stats(classes, entity_counts) if s.kind == 'i2e' else None
  stats = stats_lib.build_stats(tallies, s.stage_names, entities)
  tf.io.gfile.makedirs(s.tmp_dir)
  _write_text(os.path.join(s.tmp_dir, STATS_FILE), json.dumps(stats, indent=2) + '\n')
  stats_lib.check_reconciled(stats)
  shard_rows = sorted(shard_rows)
  if sum(n for _, n, _ in shard_rows) != stats['written']:
    raise stats_lib.ReconcileError(f'shards hold {sum(n for _, n, _ in shard_rows)} records, '
                                   f"stats say {stats['written']} were written.")
  if not shard_rows:
    raise NoOutputError(f'no record survived the pipeline; see {s.tmp_dir}/{STATS_FILE} and '
                        f'{s.tmp_dir}/{DEAD_LETTER_DIR}/.')
  schema.write_entities(s.tmp_dir, table)
  if not len(table):  # GFile creates no file when nothing is written.
    _write_text(os.path.join(s.tmp_dir, schema.ENTITIES_FILE), '')
  _write_text(os.path.join(s.tmp_dir, schema.TOKENIZER_FILE), tok_json)
  import tokenizers  # pylint: disable=import-outside-toplevel
  vocab_size = tokenizers.Tokenizer.from_str(tok_json).get_vocab_size()
  write_tfds_metadata(s.tmp_dir, [n for _, n, _ in shard_rows], sum(b for _, _, b in shard_rows))
  schema.write_corpus_meta(s.tmp_dir, dict(  # Last: the manifest of everything above.
      s.meta, schema_version=schema.SCHEMA_VERSION, kind=s.kind, num_entities=len(table),
      num_train_examples=stats['written'], num_shards=len(shard_rows), text_len=s.text_len,
      vocab_size=vocab_size, source='data_prep.build_i2e',
      commit=commit_lib.manifest(s.tmp_dir, s.run_id)))
  schema.validate_corpus(s.tmp_dir)
  commit_lib.commit(s.tmp_dir, s.out_dir, s.overwrite, s.run_id)
  yield stats


def _dead_letter_json(dead):
  return json.dumps(dataclasses.asdict(dead), ensure_ascii=False, sort_keys=True)


class WriteCorpus(beam.PTransform):
  """Dict of PCollections (see the module doc) -> one element: the stats.json dict."""

  def __init__(self, out_dir, kb_dir='', tokenizer='', vocab_size=8192, text_len=77,
               num_shards=8, seed=0, *, stage_names, kind='i2e', overwrite=False, meta=None):
    super().__init__()
    if kind not in schema.CORPUS_KINDS:
      raise ValueError(f'WriteCorpus: kind must be one of {schema.CORPUS_KINDS}, got {kind!r}.')
    if num_shards < 1 or text_len < 2:
      raise ValueError(f'WriteCorpus: need num_shards >= 1 and text_len >= 2, got '
                       f'{num_shards}, {text_len}.')
    out_dir = out_dir.rstrip('/')
    check_out_dir(out_dir, overwrite)
    commit_lib.remove_stale_temporaries(out_dir)
    run_id = uuid.uuid4().hex[:12]
    tmp_dir = commit_lib.make_temporary_dir(commit_lib.temporary_dir(out_dir, run_id))
    self.settings = Settings(
        run_id=run_id, tmp_dir=tmp_dir, out_dir=out_dir,
        overwrite=overwrite, kind=kind, text_len=text_len,
        stage_names=tuple(stage_names) + (STAGE,), meta=dict(meta or {}))
    self._kb_dir, self._vocab_size = kb_dir, vocab_size
    self._tok_json = read_tokenizer_json(tokenizer) if tokenizer else None
    self._num_shards, self._seed = num_shards, seed

  def expand(self, inputs):
    p = inputs['main'].pipeline
    s, side = self.settings, beam.pvalue
    const = lambda label, value: p | label >> beam.Create([value])
    classes = inputs['classes'] if s.kind == 'i2e' else const('NoClasses', ())
    counts = inputs['entity_counts'] if s.kind == 'i2e' else p | 'NoCounts' >> beam.Create([])
    table = classes | 'EntityTable' >> beam.Map(entity_table, self._kb_dir)
    class_index = classes | 'ClassIndex' >> beam.Map(
        lambda c: {e: i for i, (e, _) in enumerate(c)})
    tok_json = (const('GivenTokenizer', self._tok_json) if self._tok_json is not None
                else self._train_tokenizer(inputs['main'], table))
    encoded = inputs['main'] | 'Encode' >> beam.ParDo(
        _EncodeFn(s.text_len, s.kind), side.AsSingleton(class_index),
        side.AsSingleton(tok_json)).with_outputs(types.DEAD_LETTER, main='main')
    shard_rows = encoded.main | 'WriteShards' >> WriteShards(s.tmp_dir, self._num_shards,
                                                             self._seed)
    own = {'main': encoded.main, 'dead_letter': encoded[types.DEAD_LETTER],
           'filtered': p | 'NoFiltered' >> beam.Create([])}
    tallies = ((inputs['tallies'], own | 'WriteTallies' >> stats_lib.StageTallies(STAGE))
               | 'AllTallies' >> beam.Flatten())
    dead_files = ((inputs['dead_letter'], encoded[types.DEAD_LETTER])
                  | 'AllDead' >> beam.Flatten()
                  | 'DeadJson' >> beam.Map(_dead_letter_json)
                  | 'WriteDead' >> beam.io.WriteToText(
                      os.path.join(s.tmp_dir, DEAD_LETTER_DIR, 'dead_letter'),
                      file_name_suffix='.jsonl'))
    return const('Once', None) | 'Finalize' >> beam.FlatMap(
        finalize, settings=s, shard_rows=side.AsList(shard_rows),
        table=side.AsSingleton(table), tok_json=side.AsSingleton(tok_json),
        tallies=side.AsList(tallies), classes=side.AsSingleton(classes),
        entity_counts=side.AsList(counts), dead_files=side.AsList(dead_files))

  def _train_tokenizer(self, selected, table):
    seed = self._seed
    sample = (selected
              | 'SampleKeys' >> beam.Map(
                  lambda x: (seeded_hash(seed, x.pair.key), x.pair.key, x.pair.text))
              | 'TokenizerSample' >> beam.combiners.Top.Smallest(TOKENIZER_SAMPLE))
    return table | 'TrainTokenizer' >> beam.Map(
        train_tokenizer_json, beam.pvalue.AsSingleton(sample), self._vocab_size)
