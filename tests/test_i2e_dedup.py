"""DedupPairs (data_prep/i2e/dedup.py): key, image and near-duplicate deduplication on small
records, checked against a plain-Python reference of the rule (best copy: longest caption,
then smallest key), with hot images, re-encoded copies, text-failing copies, files that
change between the two reads, and the shuffled-bytes counters."""
import hashlib
import io
import json
import os
import pickle
import tempfile

import apache_beam as beam
import imagehash
import numpy as np
from PIL import Image
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from test_i2e_near_dup import jpeg, photo
from test_i2e_read import image_bytes, write_tar
from data_prep.i2e import clean, dedup, read, stats

IN_MEMORY = ['--runner=DirectRunner', '--direct_running_mode=in_memory', '--direct_num_workers=1']


def random_corpus(tmp_path, seed=0, files=3, per_file=40):
  """Tars whose keys and images repeat (one image 30 times: a placeholder; one photo in four
  re-encodings: near-duplicates) and whose texts are sometimes empty or too short, and of
  several lengths; returns [(path, position, key, image, text)]."""
  rng = np.random.default_rng(seed)
  original = photo(seed, size=96)
  images = [image_bytes(i) for i in range(12)] + [
      jpeg(original, 95), jpeg(original, 50), jpeg(original, 80, size=64),
      jpeg(original, 70, size=128)]
  texts = ['a caption', 'another caption', '', '  ', 'ab', 'the same words', 'image',
           'The Eiffel Tower at sunset, Paris']
  records = []
  for f in range(files):
    path = str(tmp_path / f'{f:05d}.tar')
    members, seen = [], set()
    for position in range(per_file):
      key = f'k{rng.integers(60):03d}'
      while key in seen:   # keys of one tar must not repeat adjacently as one sample
        key = f'k{rng.integers(60):03d}'
      seen.add(key)
      image = images[0] if rng.random() < 0.25 else images[int(rng.integers(len(images)))]
      text = texts[int(rng.integers(len(texts)))]
      members += [(f'{key}.jpg', image), (f'{key}.txt', text.encode())]
      records.append((path, position, key, image, text))
    write_tar(path, members)
  return records


def imagehash_int(image):
  return int(str(imagehash.phash(Image.open(io.BytesIO(image)).convert('RGB'))), 16)


def reference(records, min_chars=3, max_chars=1000, max_distance=3):
  """The rule in plain Python: per key the copy at the smallest (file, position); among those
  whose text passes, per image the one with the longest normalised caption, then the
  smallest key; of those, each one with a better one within max_distance pHash bits
  (imagehash, all pairs) leaves. -> (kept keys, #dup keys, #dup images, #near duplicates)."""
  first = {}
  for path, position, key, image, text in records:
    if key not in first or (path, position) < first[key][:2]:
      first[key] = (path, position, image, text)
  kept, by_image = set(), {}
  for key, (_, _, image, text) in first.items():
    if not clean.text_passes(text, min_chars, max_chars):
      kept.add(key)
      continue
    rank = (-len(clean.normalize_text(text)), key)
    by_image.setdefault(hashlib.sha256(image).digest(), []).append((rank, image))
  best = [min(copies) for copies in by_image.values()]
  dup_images = sum(len(copies) - 1 for copies in by_image.values())
  hashes = {rank: imagehash_int(image) for rank, image in best}
  near = {r for r in hashes if any(s < r and bin(hashes[r] ^ hashes[s]).count('1') <= max_distance
                                   for s in hashes)}
  kept |= {rank[1] for rank in hashes if rank not in near}
  return kept, len(records) - len(first), dup_images, len(near)


def run(patterns, read_fn_cls=None, min_chars=3, near_duplicate_distance=3):
  text_check = lambda t: clean.text_passes(t, min_chars, 1000)
  reader = read.ReadPairs(patterns, text_check=text_check, source_id='')
  if read_fn_cls is not None:
    reader.read_fn.__class__ = read_fn_cls
  folder = tempfile.mkdtemp(prefix='dedup_out_')
  p = beam.Pipeline(options=PipelineOptions(IN_MEMORY))
  index = p | reader
  result = index['main'] | dedup.DedupPairs(reader.read_fn, near_duplicate_distance)
  for name in ('main', 'dead_letter', 'filtered'):
    _ = (result[name] | f'Collect{name}' >> beam.combiners.ToList()
         | f'Keep{name}' >> beam.Map(_save, os.path.join(folder, name)))
  metrics = p.run()
  metrics.wait_until_finish()
  out = {}
  for name in ('main', 'dead_letter', 'filtered'):
    with open(os.path.join(folder, name), 'rb') as f:
      out[name] = pickle.load(f)
  return out, metrics


def _save(items, path):
  with open(path, 'wb') as f:
    pickle.dump(list(items), f)


def test_pipeline_equals_the_reference_rule(tmp_path):
  records = random_corpus(tmp_path)
  kept, dup_keys, dup_images, near = reference(records)
  out, _ = run([str(tmp_path / '*.tar')])
  assert sorted(p.key for p in out['main']) == sorted(kept)
  by_key = {r[2]: r for r in sorted(records, key=lambda r: (r[0], r[1]), reverse=True)}
  for pair in out['main']:   # the bytes and text of the surviving copy, read again
    _, _, _, image, text = by_key[pair.key]
    assert (pair.image, pair.text) == (image, text)
  assert sorted(d.reason for d in out['dead_letter']) == ['duplicate_key'] * dup_keys
  assert sum(f.count for f in out['filtered'] if f.reason == 'duplicate_image') == dup_images
  assert sum(f.count for f in out['filtered'] if f.reason == 'near_duplicate') == near
  # The placeholder image is one Filtered record that counts all its copies.
  assert max(f.count for f in out['filtered']) >= 10
  assert dup_keys > 10 and dup_images > 10 and near >= 2


def write_eiffel_tar(path):
  """'image' (smaller key) and a real caption on the same bytes; two captions equal once
  normalised on other bytes; a re-encoding of the first image with a longer caption."""
  eiffel, other = jpeg(photo(5, size=96), 90), image_bytes(7)
  return write_tar(str(path), [
      ('a.jpg', eiffel), ('a.txt', b'image'),
      ('b.jpg', eiffel), ('b.txt', b'The Eiffel Tower at sunset, Paris'),
      ('c.jpg', other), ('c.txt', b'twin caption'),
      ('d.jpg', other), ('d.txt', b'twin  caption'),
      ('e.jpg', jpeg(photo(5, size=96), 40, size=80)),
      ('e.txt', b'The Eiffel Tower at sunset, Paris, France')])


def test_the_best_copy_survives_whatever_its_key(tmp_path):
  """The issue's case: the real caption beats 'image' whatever the keys; a tie in length
  goes to the smaller key; the near-duplicate re-encoding with a longer caption wins over
  both; with near-duplicates off, it is kept beside them."""
  tar = write_eiffel_tar(tmp_path / '0.tar')
  out, _ = run([tar])
  assert sorted(p.key for p in out['main']) == ['c', 'e']
  assert sorted((f.reason, f.key, f.count) for f in out['filtered']) == [
      ('duplicate_image', 'b', 1), ('duplicate_image', 'c', 1), ('near_duplicate', 'b', 1)]
  out, _ = run([tar], near_duplicate_distance=-1)
  assert sorted(p.key for p in out['main']) == ['b', 'c', 'e']


def test_stats_json_counts_near_duplicates(tmp_path):
  """The same tar built as a pairs corpus: stats.json's dedup stage counts both reasons."""
  from apache_beam.testing import test_pipeline  # pylint: disable=import-outside-toplevel
  from configs import i2e as i2e_config  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import pipeline  # pylint: disable=import-outside-toplevel
  tar = write_eiffel_tar(tmp_path / '0.tar')
  config = i2e_config.get_config()
  config.clean.min_image_size = 16
  config.write.update(num_shards=1, vocab_size=300, text_len=16)
  out = str(tmp_path / 'corpus')
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    pipeline.build_i2e(p, pairs=[tar], out_dir=out, config=config, pairs_only=True)
  with open(os.path.join(out, 'stats.json')) as f:
    got = json.load(f)
  row = {r['name']: r for r in got['stages']}['dedup']
  assert (row['in'], row['out']) == (5, 2) and got['reconciled']
  assert row['filtered'] == {'duplicate_image': 2, 'near_duplicate': 1}


def test_result_does_not_depend_on_file_order_or_bundling(tmp_path):
  random_corpus(tmp_path, seed=3)
  files = sorted(os.listdir(tmp_path))
  a, _ = run([str(tmp_path / '*.tar')])
  b, _ = run([str(tmp_path / f) for f in reversed(files)])
  view = lambda o: (sorted((p.key, p.image, p.text) for p in o['main']),
                    sorted((d.reason, d.key, d.source) for d in o['dead_letter']),
                    sorted((f.reason, f.key, f.count) for f in o['filtered']))
  assert view(a) == view(b)


class _ForgetfulReadFn(read._ReadShardFn):  # pylint: disable=protected-access
  """A file that lost its records between the index pass and the second read."""

  def pairs_at(self, path, positions):
    if path.endswith('00001.tar'):
      return iter(())
    return super().pairs_at(path, positions)


def test_a_record_missing_on_the_second_read_is_a_dead_letter(tmp_path):
  records = random_corpus(tmp_path, seed=1)
  kept, dup_keys, _, _ = reference(records)
  out, _ = run([str(tmp_path / '*.tar')], read_fn_cls=_ForgetfulReadFn)
  lost = [d for d in out['dead_letter'] if d.reason == 'reread_failed']
  assert lost and all(d.source.endswith('00001.tar') for d in lost)
  assert len(out['main']) + len(lost) == len(kept)   # every survivor accounted for
  assert len(out['dead_letter']) - len(lost) == dup_keys


def test_shuffle_counters_count_small_records_not_images(tmp_path):
  records = random_corpus(tmp_path, seed=2)
  _, result = run([str(tmp_path / '*.tar')])
  got = {m.key.metric.name: m.committed for m in result.metrics().query(
      MetricsFilter().with_namespace(stats.SHUFFLE_COUNTER))['counters']}
  per_copy = {r[:2]: len(r[2]) + len(r[0]) + 64 + 9 + 4 + 8 for r in records}
  assert got['by_key'] == sum(per_copy.values())
  image_bytes_total = sum(len(r[3]) for r in records)
  assert sum(got.values()) < image_bytes_total / 2


def test_keep_first_copy_and_the_combiner_are_order_free():
  copies = [dedup.Copy('k', p, i, 's', True) for p, i in (('b', 0), ('a', 5), ('a', 2))]
  assert dedup.Copy('z', 'p', 0, 's', True, 9).rank < dedup.Copy('a', 'p', 0, 's', True, 5).rank
  out = list(dedup.keep_first_copy(('k', copies)))
  assert out[-1] == copies[2] and len(out) == 3
  fn = dedup._FirstAndCount()  # pylint: disable=protected-access
  values = [('m', 'x', 1), ('c', 'y', 0), ('z', 'a', 3)]
  accs = [fn.add_input(fn.create_accumulator(), v) for v in values]
  assert fn.extract_output(fn.merge_accumulators(accs)) == (('c', 'y', 0), 3)
  assert fn.extract_output(fn.merge_accumulators(accs[::-1] + [fn.create_accumulator()])) == (
      ('c', 'y', 0), 3)
