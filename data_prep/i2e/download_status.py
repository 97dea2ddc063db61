"""img2dataset's download status: a URL that failed is filtered 'download_failed', not a dead
letter, since img2dataset wrote down why (`error_message`) and the input is not malformed.

img2dataset records every URL it tried, with `status` ('success', 'failed_to_download',
'failed_to_resize') beside `key`, `url` and `error_message`:
  * parquet output: one row per URL; a failed one has no image bytes: read_parquet filters it;
  * webdataset and tfrecord output: the shard holds the successes only, and a status table
    `{shard}.parquet` (no image column) beside it holds every URL. Reading `{shard}.tar`
    reads the table's failed rows after the shard (`sidecar_failures`); a status table that
    the --pairs pattern matches itself is skipped (`is_status_table`), so no URL counts twice.
A sample whose own `status` (json field, TFRecord feature) is not 'success' is filtered too.
"""
import posixpath

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import types

STATUS = 'status'
SUCCESS = 'success'
REASON = 'download_failed'
_SHARD_SUFFIXES = ('.tar.gz', '.tgz', '.tar', '.tfrecord', '.tfrec')


def failed(status):
  """True for a status img2dataset gives a URL it could not use; None (no status) is fine."""
  if isinstance(status, bytes):
    status = status.decode('utf-8', 'replace')
  return status is not None and status != SUCCESS


def filtered(key, stage='read'):
  return types.Filtered(stage, REASON, key)


def _stem(path):
  for suffix in _SHARD_SUFFIXES:
    if path.lower().endswith(suffix):
      return path[:-len(suffix)]
  return None


def status_table_of(shard_path):
  """'x/00001.tar' -> 'x/00001.parquet' (None for a path that is not a tar/TFRecord shard)."""
  stem = _stem(shard_path)
  return None if stem is None else stem + '.parquet'


def is_status_table(parquet_path, columns, image_column):
  """A Parquet file with a status but no image column, beside a tar or TFRecord shard."""
  if STATUS not in columns or image_column in columns:
    return False
  stem = parquet_path[:-len('.parquet')]
  return any(FileSystems.exists(stem + s) for s in ('.tar', '.tar.gz', '.tgz', '.tfrecord'))


def sidecar_failures(shard_path):
  """Filtered 'download_failed' for each failed row of the shard's status table, if any."""
  table = status_table_of(shard_path)
  if table is None or not FileSystems.exists(table):
    return
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  with FileSystems.open(table, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    parquet = pq.ParquetFile(f)
    if STATUS not in parquet.schema_arrow.names:
      return
    columns = [STATUS] + (['key'] if 'key' in parquet.schema_arrow.names else [])
    position = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
      keys = (batch.column('key').to_pylist() if 'key' in columns
              else [None] * batch.num_rows)
      for status, key in zip(batch.column(STATUS).to_pylist(), keys):
        if failed(status):
          yield filtered(str(key) if key is not None
                         else f'{posixpath.basename(table)}:{position}')
        position += 1
