"""ReadPairs: raw image/alt-text pairs from WebDataset tars, Parquet or TFRecord files.

  pairs = p | ReadPairs(['gs://bucket/laion/{00000..00099}.tar'])   # any Beam filesystem
  pairs['main']          # types.Pair
  pairs['dead_letter']   # types.DeadLetter (stage 'read')

Formats, told apart by file name:
  *.tar, *.tar.gz, *.tgz   WebDataset as img2dataset writes it: `{key}.jpg` (or another
                           image extension) + `{key}.txt` and/or `{key}.json`; members of a
                           key are adjacent. Read as a stream (tarfile 'r|*') from
                           FileSystems.open, never extracted to disk.
  *.parquet                one row per pair: an image column (binary, or a struct with a
                           `bytes` field as Hugging Face datasets write it), a caption
                           column and, if present, a `key` column.
  *.tfrecord*, *.tfrec     tf.train.Example records with an image and a caption feature
                           (and a `key` or `image/key` feature if present). Read with
                           TensorFlow's CRC-checked reader: paths must be ones tf.io.gfile
                           reads (local, gs://; s3:// with tensorflow-io).
The defaults are img2dataset's names: image `jpg`, caption `txt`, and `key`, `url`, `status`
(configs/i2e.py `read`). Rows without a key column/feature get `{file name}:{position}`. With
`source_id='folder'` (the default) every key is prefixed by the name of the folder holding its
file, `{folder}/{key}`: two img2dataset runs, each in its own output folder, both number their
keys from 000000000, and they must not collide in dedup. The image's `url` (a field of
`{key}.json`, a Parquet column or a TFRecord feature) travels with the pair into the corpus's
metadata table (metadata.py). A URL img2dataset failed to download is filtered
'download_failed' (download_status.py), with the status tables beside its shards counted.

Dead-letter reasons: 'unreadable_shard' (the file cannot be opened or breaks off: the pairs
read before the break are kept, the rest is one dead letter with count=1, since how many
records it held is unknown), 'no_match' (a pattern matched no file), 'unknown_format',
'missing_field' (no image, a 0-byte one, or no text; for a Parquet file without the column:
one dead letter whose count is the file's row count), 'not_utf8', 'bad_record' (a TFRecord
record that is not a tf.train.Example), 'text_too_long' / 'image_too_large' (payload over
MAX_TEXT_BYTES / MAX_IMAGE_BYTES, skipped without reading it), 'sample_too_large' (a
WebDataset key whose members add up to over MAX_SAMPLE_BYTES: its remaining members are
skipped unread). A tar member that is neither an image, a caption key nor `json` is
skipped unread: a sample never holds more than MAX_SAMPLE_BYTES, whatever else it carries.

The output is an index: one dedup.Copy per good record (key, file, position, SHA-256 of the
image, whether the text passes `text_check`, and for those that pass the caption's length and
the image's pHash: dedup.copy_of), no image bytes. dedup.DedupPairs decides on
the Copies and reads the surviving records again through `ReadPairs.read_fn.pairs_at`.
"""
import dataclasses
import itertools
import json
import posixpath

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import dedup, download_status, types

STAGE = 'read'
MAX_TEXT_BYTES = 1 << 20
MAX_IMAGE_BYTES = 64 << 20
MAX_SAMPLE_BYTES = 64 << 20  # All the members of one WebDataset key that are read.
MAX_HEADER_BYTES = 1 << 20  # A long-name or PAX header: names and a few fields, never MBs.
IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'gif', 'bmp', 'tif', 'tiff')
_TOO_BIG = object()  # Stands for a member skipped for its size.
_PARQUET_BATCH = 256


def shard_format(path):
  """'tar' | 'parquet' | 'tfrecord' | None, from the file name."""
  name = posixpath.basename(path).lower()
  if name.endswith(('.tar', '.tar.gz', '.tgz')):
    return 'tar'
  if name.endswith('.parquet'):
    return 'parquet'
  if '.tfrecord' in name or name.endswith('.tfrec'):
    return 'tfrecord'
  return None


def _dead(reason, key, source, detail='', count=1):
  return types.DeadLetter(STAGE, reason, key, source, str(detail)[:500], count)


def _decode_text(data, key, source, what):
  """UTF-8 bytes -> (str, None) or (None, DeadLetter)."""
  if data is _TOO_BIG:
    return None, _dead('text_too_long', key, source, f'{what} is over {MAX_TEXT_BYTES} bytes')
  try:
    return data.decode('utf-8'), None
  except UnicodeDecodeError as e:
    return None, _dead('not_utf8', key, source, f'{what}: {e}')


# ------------------------------------------------------------------------- WebDataset


def split_member_name(name):
  """WebDataset naming: 'dir/000012.seg.jpg' -> ('dir/000012', 'seg.jpg')."""
  folder, base = posixpath.split(name)
  stem, dot, ext = base.partition('.')
  return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ''


def _caption(key, members, source, caption_keys):
  """(text, dead letter, parsed {key}.json or None) of one sample: its text is the first of
  `caption_keys` that is a member or a JSON field."""
  meta, meta_error = None, None
  if 'json' in members:
    text, meta_error = _decode_text(members['json'], key, source, f'{key}.json')
    if text is not None:
      try:
        meta = json.loads(text)
      except json.JSONDecodeError as e:
        meta_error = _dead('missing_field', key, source, f'{key}.json is not JSON ({e})')
  meta = meta if isinstance(meta, dict) else None
  for name in caption_keys:
    if name in members and name != 'json':
      return _decode_text(members[name], key, source, f'{key}.{name}') + (meta,)
    if meta and isinstance(meta.get(name), str):
      return meta[name], None, meta
  if meta_error is not None:
    return None, meta_error, None
  return None, _dead('missing_field', key, source, f'no text: none of {list(caption_keys)} '
                     f'among members {sorted(members)}'), meta


def sample_to_pair(key, members, source, caption_keys, skipped=0):
  """{extension: bytes} of one WebDataset sample -> Pair or DeadLetter; `skipped` members
  were left unread (of no use to a pair)."""
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
  if image_ext is None:
    others = f' and {skipped} other member(s)' if skipped else ''
    return _dead('missing_field', key, source,
                 f'no image member ({"/".join(IMAGE_EXTENSIONS)}); got {sorted(members)}'
                 f'{others}')
  if members[image_ext] is _TOO_BIG:
    return _dead('image_too_large', key, source, f'{key}.{image_ext} is over '
                 f'{MAX_IMAGE_BYTES} bytes')
  if not members[image_ext]:  # (else every empty download is a 'duplicate_image' of one)
    return _dead('missing_field', key, source, f'no image bytes: {key}.{image_ext} is empty')
  text, dead, meta = _caption(key, members, source, caption_keys)
  if meta and download_status.failed(meta.get(download_status.STATUS)):
    return download_status.filtered(key)
  url = meta.get('url') if meta else None
  return dead or types.Pair(key=key, image=members[image_ext], text=text, source=source,
                            url=url if isinstance(url, str) else '')


def _used(ext, caption_keys):
  """Whether a member with this extension is read: images, caption keys and json."""
  return ext in IMAGE_EXTENSIONS or ext in caption_keys or ext == 'json'


class _Sample:
  """The members of one WebDataset key read so far, and their bytes."""

  def __init__(self, key):
    self.key, self.members, self.skipped, self.held, self.over = key, {}, 0, 0, False

  def add(self, tar, member, ext, caption_keys):
    """Reads `member` if the sample uses it and it fits; an unread member is skipped by
    tarfile's stream mode when the next one is requested."""
    if self.over or not _used(ext, caption_keys):
      self.skipped += 1
      return
    limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTENSIONS else MAX_TEXT_BYTES
    if member.size > limit:
      self.members[ext] = _TOO_BIG
    elif self.held + member.size > MAX_SAMPLE_BYTES:
      self.over, self.members = True, {}
    else:
      self.members[ext] = tar.extractfile(member).read()
      self.held += member.size

  def result(self, source, caption_keys):
    if self.over:
      return _dead('sample_too_large', self.key, source, f'members of {self.key} add up to '
                   f'over {MAX_SAMPLE_BYTES} bytes; the rest were skipped unread')
    return sample_to_pair(self.key, self.members, source, caption_keys, self.skipped)


def _bounded_tarinfo():
  import tarfile  # pylint: disable=import-outside-toplevel

  class BoundedTarInfo(tarfile.TarInfo):
    """Refuses a long-name or PAX header over MAX_HEADER_BYTES: tarfile reads such a
    header whole into memory, and a small .tar.gz can declare gigabytes of it."""
    _LONG = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
             tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)

    def _proc_member(self, tar):
      if self.type in self._LONG and self.size > MAX_HEADER_BYTES:
        raise tarfile.SubsequentHeaderError(
            f'{self.name}: a {self.size:,}-byte extended header, over the limit of '
            f'{MAX_HEADER_BYTES:,}')
      return super()._proc_member(tar)
  return BoundedTarInfo


def read_tar(path, caption_keys):
  """Yields Pair or DeadLetter per sample; raises if the tar is corrupt or cut short."""
  import tarfile  # pylint: disable=import-outside-toplevel
  caption_keys = tuple(caption_keys)
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    with tarfile.open(fileobj=f, mode='r|*', tarinfo=_bounded_tarinfo()) as tar:
      sample = None
      while (member := tar.next()) is not None:
        tar.members.clear()   # stream mode keeps every header it read; we need none
        if not member.isfile():
          continue
        member_key, ext = split_member_name(member.name)
        if sample is None or member_key != sample.key:
          if sample is not None:
            yield sample.result(path, caption_keys)
          sample = _Sample(member_key)
        sample.add(tar, member, ext, caption_keys)
      if sample is not None:
        yield sample.result(path, caption_keys)


# ------------------------------------------------------------------------- Parquet


def _row_key(path, position):
  return f'{posixpath.basename(path)}:{position}'


def _parquet_image(value):
  if isinstance(value, dict):  # Hugging Face datasets' Image(): {'bytes', 'path'}.
    value = value.get('bytes')
  return value


def read_parquet(path, image_column, caption_columns):
  """Yields Pair or DeadLetter per row; raises if the file is not readable Parquet."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    parquet = pq.ParquetFile(f)
    names = parquet.schema_arrow.names
    if download_status.is_status_table(path, names, image_column):
      return  # Its failed rows are read with its shard.
    caption_columns = (caption_columns,) if isinstance(caption_columns, str) else caption_columns
    caption_column = next((c for c in caption_columns if c in names), None)
    missing = ([] if image_column in names else [image_column]) + (
        [] if caption_column else [' or '.join(caption_columns)])
    if missing:
      yield _dead('missing_field', '', path, f'no column(s) {missing}; columns: {names}',
                  count=parquet.metadata.num_rows)
      return
    optional = [c for c in ('key', 'url', download_status.STATUS) if c in names]
    columns = [image_column, caption_column] + optional
    position = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
      captions = batch.column(caption_column)
      if pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type):
        captions = captions.cast(pa.large_binary())  # Decode (and check) in Python.
      extra = {c: batch.column(c).to_pylist() if c in optional else [None] * len(batch)
               for c in ('key', 'url', download_status.STATUS)}
      rows = zip(batch.column(image_column).to_pylist(), captions.to_pylist(), extra['key'],
                 extra['url'], extra[download_status.STATUS])
      for image, caption, key, url, status in rows:
        key = _row_key(path, position) if key is None else str(key)
        position += 1
        yield (download_status.filtered(key) if download_status.failed(status) else
               _row_to_pair(key, _parquet_image(image), caption, path, caption_column, url))


def _row_to_pair(key, image, caption, path, caption_field, url=None):
  if not image:
    return _dead('missing_field', key, path, 'no image bytes')
  if caption is None:
    return _dead('missing_field', key, path, f'no {caption_field!r}')
  if len(image) > MAX_IMAGE_BYTES:
    return _dead('image_too_large', key, path, f'image is over {MAX_IMAGE_BYTES} bytes')
  if isinstance(caption, bytes):
    caption, dead = _decode_text(caption if len(caption) <= MAX_TEXT_BYTES else _TOO_BIG,
                                 key, path, caption_field)
    if dead:
      return dead
  return types.Pair(key=key, image=bytes(image), text=caption, source=path,
                    url=url if isinstance(url, str) else '')


# ------------------------------------------------------------------------- TFRecord


def _feature_bytes(feature_map, name):
  if name not in feature_map:
    return None
  values = feature_map[name].bytes_list.value
  return values[0] if values else None


def read_tfrecord(path, image_feature, caption_feature):
  """Yields Pair or DeadLetter per record; raises if the file is corrupt (CRC, truncation)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from google.protobuf import message  # pylint: disable=import-outside-toplevel
  for position, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
    try:
      feats = tf.train.Example.FromString(record).features.feature
    except message.DecodeError as e:
      yield _dead('bad_record', _row_key(path, position), path, f'not a tf.train.Example: {e}')
      continue
    key = _feature_bytes(feats, 'key') or _feature_bytes(feats, 'image/key')
    key = key.decode('utf-8', 'replace') if key else _row_key(path, position)
    url = _feature_bytes(feats, 'url')
    if download_status.failed(_feature_bytes(feats, download_status.STATUS)):
      yield download_status.filtered(key)
      continue
    yield _row_to_pair(key, _feature_bytes(feats, image_feature),
                       _feature_bytes(feats, caption_feature), path, caption_feature,
                       url.decode('utf-8', 'replace') if url else None)


# ------------------------------------------------------------------------- Beam stages


class _MatchFn(beam.DoFn):
  """Pattern -> matching paths; a failed or empty match is a dead letter."""

  def process(self, pattern):
    try:
      metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # pylint: disable=broad-except  # BeamIOError wraps anything.
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, _dead(
          'unreadable_shard', '', pattern, f'cannot list: {type(e).__name__}: {e}'))
      return
    if not metadata:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, _dead(
          'no_match', '', pattern, 'pattern matched no file'))
    for m in metadata:
      yield m.path


def _always(_):
  return True


def key_prefix(path, mode):
  """The prefix of the keys read from `path`: its folder's name for mode 'folder', else ''."""
  if mode == 'folder':
    return posixpath.basename(posixpath.dirname(path.rstrip('/')))
  if mode:
    raise ValueError(f"read.source_id must be 'folder' or '' (keys as written), got {mode!r}")
  return ''


def _with_source(item, source):
  if source and item.key:
    return dataclasses.replace(item, key=f'{source}/{item.key}')
  return item


@beam.typehints.with_output_types(dedup.Copy)  # Tagged outputs aside.
class _ReadShardFn(beam.DoFn):
  """Path -> dedup.Copy per good record, and dead letters; never raises on bad input.

  `records(path)` reads one file; `pairs_at(path, positions)` reads it again for the
  records at those positions.
  """

  def __init__(self, caption_keys, parquet_image_column, parquet_caption_column,
               tfrecord_image_feature, tfrecord_caption_feature, text_check=None,
               source_id='folder'):
    self._args = dict(tar=(tuple(caption_keys),),
                      parquet=(parquet_image_column, parquet_caption_column),
                      tfrecord=(tfrecord_image_feature, tfrecord_caption_feature))
    self._text_check = text_check or _always
    self._source_mode = source_id
    key_prefix('', source_id)  # Checks the mode at construction.

  def records(self, path):
    """(position, Pair | DeadLetter | Filtered) of a file, in order, keys prefixed by the
    source id, then the failures of its status table; raises if the file breaks."""
    fmt = shard_format(path)
    reader = dict(tar=read_tar, parquet=read_parquet, tfrecord=read_tfrecord)[fmt]
    items = itertools.chain(reader(path, *self._args[fmt]),
                            download_status.sidecar_failures(path) if fmt != 'parquet' else ())
    source = key_prefix(path, self._source_mode)
    return enumerate(_with_source(item, source) for item in items)

  def pairs_at(self, path, positions):
    """(position, Pair) of the records at `positions` (a set), stopping after the last."""
    last = max(positions, default=-1)
    for position, item in self.records(path):
      if position > last:
        return
      if position in positions and isinstance(item, types.Pair):
        yield position, item

  def process(self, path):
    fmt = shard_format(path)
    if fmt is None:
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, _dead(
          'unknown_format', '', path, 'expected *.tar[.gz], *.parquet or *.tfrecord*'))
      return
    count = 0
    try:
      for position, item in self.records(path):
        if isinstance(item, types.DeadLetter):
          yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, item)
        elif isinstance(item, types.Filtered):
          yield beam.pvalue.TaggedOutput(types.FILTERED, item)
        else:
          yield dedup.copy_of(item, path, position, self._text_check)
        count = position + 1
    except Exception as e:  # pylint: disable=broad-except  # Any failure of a file is data.
      yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, _dead(
          'unreadable_shard', '', path,
          f'{fmt} file broke off after {count} records: {type(e).__name__}: {e}'))


class ReadPairs(beam.PTransform):
  """File patterns -> {'main': dedup.Copy, 'dead_letter': DeadLetter, 'filtered': Filtered
  'download_failed'};
  `read_fn` re-reads records for dedup.DedupPairs."""

  def __init__(self, patterns, caption_keys=('txt', 'caption', 'alt', 'text'),
               parquet_image_column='jpg', parquet_caption_column=('txt', 'caption'),
               tfrecord_image_feature='jpg', tfrecord_caption_feature='txt',
               text_check=None, source_id='folder'):
    super().__init__()
    self._patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not self._patterns:
      raise ValueError('ReadPairs: no file pattern given.')
    self.read_fn = _ReadShardFn(caption_keys, parquet_image_column, parquet_caption_column,
                                tfrecord_image_feature, tfrecord_caption_feature, text_check,
                                source_id)

  def expand(self, pbegin):
    matched = (pbegin | 'Patterns' >> beam.Create(sorted(set(self._patterns)))
               | 'Match' >> beam.ParDo(_MatchFn()).with_outputs(types.DEAD_LETTER,
                                                                main='main'))
    read = (matched.main
            | 'UniqueFiles' >> beam.Distinct()
            | 'SpreadFiles' >> beam.Reshuffle()
            | 'IndexFiles' >> beam.ParDo(self.read_fn).with_outputs(
                types.DEAD_LETTER, types.FILTERED, main='main'))
    dead = ((matched[types.DEAD_LETTER], read[types.DEAD_LETTER])
            | 'AllDead' >> beam.Flatten())
    return {'main': read.main, 'dead_letter': dead, 'filtered': read[types.FILTERED]}
