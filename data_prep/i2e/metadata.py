"""The corpus's metadata table: one Parquet row per written record, shard by shard.

  metadata/train-XXXXX-of-YYYYY.parquet   beside train-XXXXX-of-YYYYY.tfrecord: the same
                                          records in the same order (sorted by key)

Columns, as a user of LAION-style parquet metadata expects them:
  key          the record's key (image/key in the TFRecord)
  url          where the image came from ('' when the input did not say)
  alt_text     the cleaned alt-text
  entity_ids   the kept entities, best CLIP score first (entity/id in the TFRecord)
  scores       their CLIP scores (entity/score)
  mentions     how selection decided, per mention (select.py): list of struct
                 mention      the mention's text
                 entity_ids   its top-k candidates, best link score first
                 link_scores  the linker's score of each
                 clip_scores  the CLIP score of each: cosine - text_bias
                 chosen       index of the kept candidate, -1 if below the threshold
                 text_bias    each text's mean cosine with the reference images

It lets a user audit the CLIP decisions, join images back to their URLs (to re-download,
or to honour a takedown request), and re-decide without re-running CLIP: with the linker's
top-1 (index 0) instead of CLIP's choice, the text-only baseline (demo_world/selection.py).
"""
import io
import json
import os

import tensorflow as tf

from mofi_jax.data import schema

FOLDER = 'metadata'


def arrow_schema():
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  floats, strings = pa.list_(pa.float32()), pa.list_(pa.string())
  mention = pa.struct([('mention', pa.string()), ('entity_ids', strings),
                       ('link_scores', floats), ('clip_scores', floats),
                       ('chosen', pa.int32()), ('text_bias', floats)])
  return pa.schema([('key', pa.string()), ('url', pa.string()), ('alt_text', pa.string()),
                    ('entity_ids', strings), ('scores', floats),
                    ('mentions', pa.list_(mention))])


def row_json(selected):
  """SelectedPair -> its row, as compact JSON bytes (what crosses the shard shuffle)."""
  pair = selected.pair
  mentions = [dict(mention=c.mention, entity_ids=list(c.entity_ids),
                   link_scores=list(c.link_scores), clip_scores=list(c.clip_scores),
                   chosen=c.chosen, text_bias=list(c.text_bias)) for c in selected.choices]
  return json.dumps(dict(key=pair.key, url=pair.url, alt_text=pair.text,
                         entity_ids=list(selected.entity_ids), scores=list(selected.scores),
                         mentions=mentions), ensure_ascii=False,
                    separators=(',', ':')).encode('utf-8')


def shard_path(folder, shard, num_shards):
  return os.path.join(folder, FOLDER, schema.shard_name(shard, num_shards).replace(
      '.tfrecord', '.parquet'))


def write_shard(path, rows):
  """Writes rows (JSON bytes, in record order) as one Parquet file, any tf.io.gfile path."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  table = pa.Table.from_pylist([json.loads(r) for r in rows], schema=arrow_schema())
  buf = io.BytesIO()  # GFile is not a file object pyarrow accepts; a shard's table is small.
  pq.write_table(table, buf)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buf.getvalue())


def read_table(corpus_dir):
  """The whole metadata table of a corpus, as a pyarrow.Table (shard order)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  paths = sorted(tf.io.gfile.glob(os.path.join(corpus_dir, FOLDER, 'train-*.parquet')))
  if not paths:
    raise FileNotFoundError(f'{corpus_dir}: no {FOLDER}/train-*.parquet; the corpus was '
                            'written before the metadata table existed, or not by build_i2e.')
  tables = []
  for path in paths:
    with tf.io.gfile.GFile(path, 'rb') as f:
      tables.append(pq.read_table(pa.BufferReader(f.read())))
  return pa.concat_tables(tables)
