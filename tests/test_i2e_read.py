"""ReadPairs: WebDataset tars, Parquet and TFRecord files -> an index of Copies, every bad
input dead-lettered with its reason; with dedup.DedupPairs, the Pairs themselves, duplicate
keys resolved to a fixed survivor.

Also the raw-pair writers the other I2E tests share (tar/Parquet/TFRecord shards)."""
import hashlib
import io
import json
import os
import tarfile

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from data_prep.i2e import dedup, read


# ----------------------------------------------------------------------------- shared helpers


def image_bytes(seed, fmt='JPEG', size=24):
  """A noise image (distinct per seed, so content hashes differ)."""
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, fmt)
  return out.getvalue()


def write_tar(path, members, mode='w'):
  """members: [(name, bytes)] in order (WebDataset: a key's files adjacent)."""
  with tarfile.open(path, mode) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def write_tfrecord(path, examples):
  """examples: [dict name -> bytes] as tf.train.Example bytes features, or raw bytes."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  with tf.io.TFRecordWriter(path) as w:
    for ex in examples:
      if isinstance(ex, bytes):
        w.write(ex)
        continue
      feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
                 for k, v in ex.items()}
      w.write(tf.train.Example(features=tf.train.Features(feature=feature))
              .SerializeToString())
  return path


def project(dead):
  """What the tests compare of a dead letter (detail is prose)."""
  return dead.reason, dead.key, os.path.basename(dead.source), dead.count


def digest(data):
  return hashlib.sha256(data).hexdigest()[:12]


def pair_view(pair):
  """(key, image digest, text, file name): short failure messages."""
  return pair.key, digest(pair.image), pair.text, os.path.basename(pair.source)


def check_read(patterns, want_pairs, want_dead, want_filtered=(), **kw):
  """ReadPairs(patterns) then DedupPairs give exactly these pairs (key, image bytes, text,
  file name) and dead letters (project); the index holds one Copy per good record. Keys are
  compared as written (source_id=''; test_keys_are_prefixed_by_their_folder has the default)."""
  kw.setdefault('source_id', '')
  with test_pipeline.TestPipeline() as p:
    reader = read.ReadPairs(patterns, **kw)
    result = p | reader
    deduped = result['main'] | dedup.DedupPairs(reader.read_fn)
    want_pairs = [(k, digest(i), t, f) for k, i, t, f in want_pairs]
    assert_that(deduped['main'] | 'ViewPairs' >> beam.Map(pair_view), equal_to(want_pairs),
                label='pairs')
    dead = (result['dead_letter'], deduped['dead_letter']) | 'Dead' >> beam.Flatten()
    assert_that(dead | 'ViewDead' >> beam.Map(project), equal_to(want_dead), label='dead')
    assert_that(result['filtered'] | 'ViewFiltered' >> beam.Map(lambda f: (f.reason, f.key)),
                equal_to(list(want_filtered)), label='filtered')
    assert_that(deduped['filtered'], equal_to([]), label='dedup_filtered')


# ----------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize('name,expected', [
    ('000012.jpg', ('000012', 'jpg')), ('dir/000012.seg.JPG', ('dir/000012', 'seg.jpg')),
    ('noext', ('noext', ''))])
def test_split_member_name_follows_webdataset(name, expected):
  assert read.split_member_name(name) == expected


@pytest.mark.parametrize('path,fmt', [
    ('a/b.tar', 'tar'), ('b.TAR.GZ', 'tar'), ('x.tgz', 'tar'), ('x.parquet', 'parquet'),
    ('gs://b/train.tfrecord-00001-of-00008', 'tfrecord'), ('x.tfrec', 'tfrecord'),
    ('x.zip', None)])
def test_shard_format_from_name(path, fmt):
  assert read.shard_format(path) == fmt


def test_caption_comes_from_the_first_caption_key_present():
  members = {'jpg': b'I', 'txt': b'from txt', 'json': json.dumps(
      {'caption': 'from json', 'alt': 'alt'}).encode()}
  keys = ('caption', 'txt', 'alt')
  assert read.sample_to_pair('k', members, 's', keys).text == 'from json'
  assert read.sample_to_pair('k', members, 's', ('txt', 'caption')).text == 'from txt'
  del members['txt']
  assert read.sample_to_pair('k', members, 's', ('txt', 'alt')).text == 'alt'
  dead = read.sample_to_pair('k', {'jpg': b'I', 'json': b'{"url": 1}'}, 's', keys)
  assert (dead.reason, dead.key) == ('missing_field', 'k')
  dead = read.sample_to_pair('k', {'jpg': b'I', 'json': b'{oops'}, 's', keys)
  assert dead.reason == 'missing_field' and 'not JSON' in dead.detail


# ----------------------------------------------------------------------------- WebDataset


def test_tar_reads_good_samples_and_dead_letters_bad_ones(tmp_path):
  img = [image_bytes(i) for i in range(6)]
  path = write_tar(tmp_path / 'a.tar', [
      ('k1.jpg', img[1]), ('k1.txt', b'first caption'),
      ('k2.json', json.dumps({'caption': 'caf\u00e9'}).encode()), ('k2.png', img[2]),
      ('k3.jpg', img[3]),                                   # no text
      ('k4.txt', b'no image here'),                         # no image
      ('k5.jpg', img[5]), ('k5.txt', b'bad \xff\xfe bytes'),  # not UTF-8
      ('k6.jpg', b''), ('k6.txt', b'empty download'),       # 0 bytes, twice: no image, not
      ('k7.jpg', b''), ('k7.txt', b'another one'),          # a duplicate of an empty one
  ])
  check_read([str(path)],
             [('k1', img[1], 'first caption', 'a.tar'), ('k2', img[2], 'caf\u00e9', 'a.tar')],
             [('missing_field', 'k3', 'a.tar', 1), ('missing_field', 'k4', 'a.tar', 1),
              ('not_utf8', 'k5', 'a.tar', 1), ('missing_field', 'k6', 'a.tar', 1),
              ('missing_field', 'k7', 'a.tar', 1)])


def test_gzipped_tar_and_oversized_text(tmp_path):
  img = image_bytes(0)
  path = write_tar(tmp_path / 'b.tar.gz', [
      ('x.jpg', img), ('x.txt', b'ok'),
      ('y.jpg', img), ('y.txt', b'a' * (read.MAX_TEXT_BYTES + 1))], mode='w:gz')
  check_read([str(path)], [('x', img, 'ok', 'b.tar.gz')],
             [('text_too_long', 'y', 'b.tar.gz', 1)])


def test_truncated_tar_keeps_the_samples_before_the_break(tmp_path):
  img = [image_bytes(i, size=64) for i in range(3)]
  full = write_tar(tmp_path / 'full.tar', [
      ('a.jpg', img[0]), ('a.txt', b'A'), ('b.jpg', img[1]), ('b.txt', b'B'),
      ('c.jpg', img[2]), ('c.txt', b'C')]).read_bytes()
  cut = full.index(img[2]) + len(img[2]) // 2  # In the middle of c.jpg's data.
  (tmp_path / 'cut.tar').write_bytes(full[:cut])
  (tmp_path / 'junk.tar').write_bytes(b'this is not a tar archive at all' * 40)
  check_read([str(tmp_path / 'cut.tar'), str(tmp_path / 'junk.tar')],
             [('a', img[0], 'A', 'cut.tar'), ('b', img[1], 'B', 'cut.tar')],
             [('unreadable_shard', '', 'cut.tar', 1), ('unreadable_shard', '', 'junk.tar', 1)])


def test_duplicate_keys_keep_the_copy_at_the_smallest_file_and_position(tmp_path):
  img = [image_bytes(i) for i in range(4)]
  write_tar(tmp_path / 'a.tar', [('k.jpg', img[0]), ('k.txt', b'a0'), ('m.jpg', img[1]),
                                 ('m.txt', b'm'), ('k.jpg', img[2]), ('k.txt', b'a2')])
  write_tar(tmp_path / 'b.tar', [('k.jpg', img[3]), ('k.txt', b'b0')])
  # The second pattern matches a.tar again: a file is read once however often matched.
  check_read([str(tmp_path / '*.tar'), str(tmp_path / 'a.tar')],
             [('k', img[0], 'a0', 'a.tar'), ('m', img[1], 'm', 'a.tar')],
             [('duplicate_key', 'k', 'a.tar', 1), ('duplicate_key', 'k', 'b.tar', 1)])


def test_unmatched_pattern_and_unknown_format(tmp_path):
  (tmp_path / 'x.zip').write_bytes(b'zip')
  check_read([str(tmp_path / 'none-*.tar'), str(tmp_path / 'x.zip')], [],
             [('no_match', '', 'none-*.tar', 1), ('unknown_format', '', 'x.zip', 1)])


# ----------------------------------------------------------------------------- Parquet


def test_parquet_rows_struct_images_and_missing_columns(tmp_path):
  img = [image_bytes(i) for i in range(4)]
  pq.write_table(pa.table({
      'jpg': pa.array([img[0], None, img[2], img[3]], pa.binary()),
      'txt': pa.array([b'zero', b'one', None, b'\xff three'], pa.binary()),
      'key': ['r0', 'r1', 'r2', 'r3']}), tmp_path / 'a.parquet')
  pq.write_table(pa.table({  # Hugging Face datasets' Image() struct; no key column.
      'jpg': pa.array([{'bytes': img[1], 'path': 'x.jpg'}],
                        pa.struct([('bytes', pa.binary()), ('path', pa.string())])),
      'txt': pa.array(['struct \u00e9'], pa.string())}), tmp_path / 'b.parquet')
  pq.write_table(pa.table({'jpg': [img[0]] * 3, 'text': ['x'] * 3}), tmp_path / 'c.parquet')
  check_read([str(tmp_path / '*.parquet')],
             [('r0', img[0], 'zero', 'a.parquet'),
              ('b.parquet:0', img[1], 'struct \u00e9', 'b.parquet')],
             [('missing_field', 'r1', 'a.parquet', 1), ('missing_field', 'r2', 'a.parquet', 1),
              ('not_utf8', 'r3', 'a.parquet', 1),
              ('missing_field', '', 'c.parquet', 3)])  # One letter for the file's 3 rows.


def test_parquet_column_names_are_configurable(tmp_path):
  img = image_bytes(0)
  pq.write_table(pa.table({'image': [img], 'caption': ['hello']}), tmp_path / 'a.parquet')
  check_read([str(tmp_path / 'a.parquet')], [('a.parquet:0', img, 'hello', 'a.parquet')], [],
             parquet_image_column='image', parquet_caption_column='caption')


def test_img2dataset_failed_downloads_are_filtered_and_status_tables_counted_once(tmp_path):
  img = [image_bytes(i) for i in range(3)]
  status = ['success', 'failed_to_download', 'success', 'failed_to_resize']
  pq.write_table(pa.table({  # parquet output: one row per URL, failed ones without image
      'key': ['p0', 'p1', 'p2', 'p3'], 'url': [f'http://h/{i}' for i in range(4)],
      'jpg': pa.array([img[0], None, img[1], None], pa.binary()),
      'txt': ['zero', None, 'two', None], 'status': status}), tmp_path / 'p.parquet')
  (tmp_path / 'wds').mkdir()
  write_tar(tmp_path / 'wds' / '00000.tar', [('w0.jpg', img[2]), ('w0.txt', b'web zero')])
  pq.write_table(pa.table({  # webdataset output: its status table, no image column
      'key': ['w0', 'w1', 'w2'], 'status': ['success', 'failed_to_download', 'failed_to_download'],
      'error_message': [None, 'timeout', '404']}), tmp_path / 'wds' / '00000.parquet')
  want_filtered = [('download_failed', k) for k in ('p1', 'p3', 'w1', 'w2')]
  for patterns in ([str(tmp_path / 'p.parquet'), str(tmp_path / 'wds' / '*.tar')],
                   [str(tmp_path / 'p.parquet'), str(tmp_path / 'wds' / '*')]):  # table too
    check_read(patterns, [('p0', img[0], 'zero', 'p.parquet'), ('p2', img[1], 'two', 'p.parquet'),
                          ('w0', img[2], 'web zero', '00000.tar')], [], want_filtered)


def test_keys_are_prefixed_by_their_folder(tmp_path):
  img = [image_bytes(i) for i in range(2)]
  for run, image in zip(('run1', 'run2'), img):  # two img2dataset runs, keys from 000000000
    (tmp_path / run).mkdir()
    write_tar(tmp_path / run / '00000.tar', [('000000000.jpg', image), ('000000000.txt', b'x')])
  pattern = str(tmp_path / 'run*' / '*.tar')
  check_read([pattern], [('run1/000000000', img[0], 'x', '00000.tar'),
                         ('run2/000000000', img[1], 'x', '00000.tar')], [], source_id='folder')
  check_read([pattern], [('000000000', img[0], 'x', '00000.tar')],
             [('duplicate_key', '000000000', '00000.tar', 1)])
  with pytest.raises(ValueError, match="read.source_id must be 'folder' or ''"):
    read.ReadPairs([pattern], source_id='path')


# ----------------------------------------------------------------------------- TFRecord


def test_tfrecord_records_bad_records_and_a_corrupt_file(tmp_path):
  img = [image_bytes(i) for i in range(3)]
  write_tfrecord(str(tmp_path / 'a.tfrecord'), [
      {'jpg': img[0], 'txt': b'zero', 'key': b'z'},
      {'jpg': img[1], 'txt': b'one'},          # key from the position
      {'txt': b'no image'},
      b'\xff\xff\xff not a proto',
  ])
  good = write_tfrecord(str(tmp_path / 'b.tfrecord'), [
      {'jpg': img[2], 'txt': b'two', 'image/key': b'ik'}] * 2)
  data = open(good, 'rb').read()
  (tmp_path / 'b.tfrecord').write_bytes(data[:len(data) - 7])  # 2nd record cut short.
  check_read([str(tmp_path / '*.tfrecord')],
             [('z', img[0], 'zero', 'a.tfrecord'), ('a.tfrecord:1', img[1], 'one', 'a.tfrecord'),
              ('ik', img[2], 'two', 'b.tfrecord')],
             [('missing_field', 'a.tfrecord:2', 'a.tfrecord', 1),
              ('bad_record', 'a.tfrecord:3', 'a.tfrecord', 1),
              ('unreadable_shard', '', 'b.tfrecord', 1)])


def test_read_pairs_needs_a_pattern():
  with pytest.raises(ValueError, match='no file pattern'):
    read.ReadPairs([])


# ----------------------------------------------------------------------------- bounded samples


def read_tar_traced(path):
  """(the items read_tar yields for `path`, the peak bytes Python allocated meanwhile)."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  tracemalloc.start()
  try:
    items = list(read.read_tar(str(path), ('txt',)))
    return items, tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_members_a_pair_does_not_use_are_skipped_unread(tmp_path):
  # One key with 300 junk members of 1 MiB: the reader held 314 MB for it.
  img = image_bytes(0)
  junk = bytes(1 << 20)
  path = write_tar(tmp_path / 'junk.tar', [('k.jpg', img)] + [
      (f'k.junk{i}', junk) for i in range(300)] + [('k.txt', b'the caption')])
  items, peak = read_tar_traced(path)
  assert [(p.key, p.image, p.text) for p in items] == [('k', img, 'the caption')]
  assert peak < 16 << 20, f'peak {peak / 2**20:.0f} MiB while reading'


def test_junk_members_through_the_pipeline(tmp_path):
  img = [image_bytes(i) for i in range(2)]
  path = write_tar(tmp_path / 'j.tar', [
      ('a.jpg', img[0]), ('a.seg.png', img[1]), ('a.cls', b'3'), ('a.txt', b'A'),
      ('b.cls', b'only junk'), ('b.npy', b'\0' * 100),   # no image: still one dead letter
      ('c.jpg', img[1]), ('c.txt', b'C')])
  check_read([str(path)], [('a', img[0], 'A', 'j.tar'), ('c', img[1], 'C', 'j.tar')],
             [('missing_field', 'b', 'j.tar', 1)])
  dead = [x for x in read.read_tar(str(path), ('txt',)) if x.key == 'b']
  assert 'and 2 other member(s)' in dead[0].detail


def test_a_key_over_the_sample_cap_is_dead_lettered_and_the_rest_skipped(tmp_path, monkeypatch):
  # Each member is within its own limit; together they are not.
  monkeypatch.setattr(read, 'MAX_SAMPLE_BYTES', 3000)
  big, small, caption = image_bytes(0, fmt='PNG', size=30), image_bytes(1), b'x' * 1000
  assert 2000 < len(big) <= 3000 and len(small) + len(caption) <= 3000
  path = write_tar(tmp_path / 'cap.tar', [
      ('a.png', big), ('a.txt', caption), ('a.json', b'{}' * 5000),   # over at a.txt
      ('b.jpg', small), ('b.txt', caption),                           # under
      ('c.png', big), ('c.jpg', big)])                                # two images, over
  check_read([str(path)], [('b', small, 'x' * 1000, 'cap.tar')],
             [('sample_too_large', 'a', 'cap.tar', 1), ('sample_too_large', 'c', 'cap.tar', 1)])
  items = list(read.read_tar(str(path), ('txt',)))
  assert [getattr(x, 'reason', 'pair') for x in items] == ['sample_too_large', 'pair',
                                                           'sample_too_large']
  assert '3000 bytes' in items[0].detail


def test_many_headers_and_a_huge_extended_header_stay_bounded(tmp_path):
  """Stream mode kept every member header (tar.members) and read a PAX or long-name header
  whole: a small .tar.gz could declare gigabytes of either."""
  img = image_bytes(1)
  members = [('k.jpg', img)] + [(f'k.x{i}', b'') for i in range(50000)] + [('k.txt', b'cap')]
  many = write_tar(tmp_path / 'many.tar.gz', members, mode='w:gz')
  items, peak = read_tar_traced(many)
  assert [(p.key, p.image, p.text) for p in items] == [('k', img, 'cap')]
  # Every header kept: ~24 MiB here, growing with the member count; now a constant ~3 MiB.
  assert peak < 6 << 20, f'peak {peak / 2**20:.1f} MiB for 50,000 empty members'
  huge = tmp_path / 'pax.tar.gz'
  with tarfile.open(huge, 'w:gz', format=tarfile.PAX_FORMAT) as tar:
    for name, data in [('a.jpg', img), ('a.txt', b'A')]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    info = tarfile.TarInfo('b.txt')
    info.pax_headers = {'comment': 'x' * (3 << 20)}   # 3 MiB, a few KB gzipped
    tar.addfile(info, io.BytesIO(b''))
  assert os.path.getsize(huge) < 64 << 10
  with pytest.raises(tarfile.ReadError, match='extended header, over the limit'):
    list(read.read_tar(str(huge), ('txt',)))
