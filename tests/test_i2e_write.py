"""WriteCorpus and stats.json: shard plan, records, entity table, tokenizer, TFDS
metadata, counts that reconcile, determinism, and the never-overwrite rule."""
import glob
import hashlib
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import stats, types, write
from mofi_jax.data import schema
from mofi_jax.data import tokenizer as tokenizer_lib
from test_i2e_read import image_bytes

ENTITIES = [types.Entity('Q1', 'Alpha', 'the first letter', ('A',), 10),
            types.Entity('Q2', 'Beta', 'the second letter', (), 5),
            types.Entity('Q30', 'Gamma', 'the third letter', (), 1)]


# ----------------------------------------------------------------------------- pure parts


def test_plan_shards_largest_bucket_to_lightest_shard():
  # 10 -> s0; 7 -> s1; 5 -> s1 (7 < 10); 3 -> s0 (10 < 12); 3 (bucket 9) -> s0 (13 > 12? no:
  # s1 has 12 < 13) -> s1. Empty buckets are ignored.
  plan, used = write.plan_shards([(3, 3), (0, 10), (2, 5), (1, 7), (9, 3), (5, 0)], 2)
  assert (plan, used) == ({0: 0, 1: 1, 2: 1, 3: 0, 9: 1}, 2)
  assert write.plan_shards([(4, 1), (2, 1)], 8) == ({2: 0, 4: 1}, 2)  # Never an empty shard.


def test_stage_tallies_feed_live_counters_equal_to_the_exact_tallies(tmp_path):
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  p = beam.Pipeline(options=PipelineOptions(['--direct_running_mode=in_memory']))
  result = {'main': p | 'Main' >> beam.Create(['a', 'b', 'c']),
            'filtered': p | 'F' >> beam.Create([types.Filtered('s', 'dup', 'k', count=4),
                                                types.Filtered('s', 'short', 'j')]),
            'dead_letter': p | 'D' >> beam.Create([types.DeadLetter('s', 'bad', 'x', 'f')])}
  tallies = result | stats.StageTallies('s')
  _ = (tallies | beam.combiners.ToList()
       | beam.Map(lambda t: (tmp_path / 't.json').write_text(json.dumps(sorted(t)))))
  run = p.run()
  run.wait_until_finish()
  live = {m.key.metric.name: m.committed for m in run.metrics().query(
      MetricsFilter().with_namespace('i2e'))['counters']}
  exact = {'.'.join(filter(None, k)): n for k, n in json.loads((tmp_path / 't.json').read_text())}
  assert live == exact == {'s.out': 3, 's.filtered.dup': 4, 's.filtered.short': 1,
                           's.dead_letter.bad': 1}


def test_seeded_hash_is_sha256_of_seed_and_key():
  want = int(hashlib.sha256(b'7\x00abc').hexdigest()[:16], 16)
  assert write.seeded_hash(7, 'abc') == want


def test_histogram_bins_are_powers_of_two():
  assert stats.histogram_bins([5, 7, 8, 1, 15, 16, 100]) == {
      '1-1': 1, '4-7': 2, '8-15': 2, '16-31': 1, '64-127': 1}


def test_build_stats_chains_stages_and_reconciles():
  tallies = [(('read', 'out', ''), 10), (('read', 'dead_letter', 'unreadable_shard'), 2),
             (('clean', 'out', ''), 7), (('clean', 'filtered', 'duplicate_image'), 2),
             (('clean', 'dead_letter', 'corrupt_image'), 1), (('write', 'out', ''), 7)]
  got = stats.build_stats(tallies, ['read', 'clean', 'write'])
  assert (got['inputs'], got['written'], got['reconciled']) == (12, 7, True)
  assert got['stages'][1] == dict(name='clean', **{'in': 10}, out=7,
                                  filtered={'duplicate_image': 2},
                                  dead_letter={'corrupt_image': 1})
  assert got['dead_letter'] == {'unreadable_shard': 2, 'corrupt_image': 1}
  broken = stats.build_stats(tallies[:-1] + [(('write', 'out', ''), 6)], ['read', 'clean', 'write'])
  assert not broken['reconciled']
  with pytest.raises(stats.ReconcileError, match='stage write: in 7 != out 6'):
    stats.check_reconciled(broken)


# ----------------------------------------------------------------------------- the transform


def make_pairs(n=12):
  """SelectedPairs with 1-2 entities of Q1/Q2 in varied orders."""
  ids = [('Q1',), ('Q2',), ('Q2', 'Q1'), ('Q1', 'Q2')]
  return [types.SelectedPair(
      types.Pair(f'k{i:02d}', image_bytes(100 + i, size=16 + i), f'photo {i} of alpha', 's'),
      ids[i % 4], tuple(round(0.3 + 0.01 * i + 0.1 * j, 4) for j in range(len(ids[i % 4]))))
          for i in range(n)]


def classes_of(pairs):
  counts = {}
  for s in pairs:
    for e in s.entity_ids:
      counts[e] = counts.get(e, 0) + 1
  return tuple(sorted(counts.items(), key=lambda en: (-en[1], int(en[0][1:]))))


def run_write(out_dir, pairs, kb_dir, extra_dead=(), kind='i2e', **kw):
  """Runs WriteCorpus as the stage after a 'select' that output `pairs` and dropped 1."""
  dead = [types.DeadLetter('select', 'undecodable_image', 'bad', 'src')] + list(extra_dead)
  tallies = [(('select', 'out', ''), len(pairs)), (('select', 'dead_letter', 'undecodable_image'),
                                                   1)]
  with test_pipeline.TestPipeline() as p:
    inputs = dict(main=p | 'Pairs' >> beam.Create(pairs),
                  tallies=p | 'Tallies' >> beam.Create(tallies),
                  dead_letter=p | 'Dead' >> beam.Create(dead))
    if kind == 'i2e':
      good = [s for s in pairs if set(s.entity_ids) <= {'Q1', 'Q2'}]
      inputs['classes'] = p | 'Classes' >> beam.Create([classes_of(good)])
      inputs['entity_counts'] = p | 'Counts' >> beam.Create(list(classes_of(pairs)))
    _ = inputs | write.WriteCorpus(out_dir, kb_dir, stage_names=['select'], kind=kind,
                                   **{**dict(vocab_size=300, text_len=12, num_shards=3), **kw})
  with open(os.path.join(out_dir, write.STATS_FILE)) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def kb_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kb'))
  kb_lib.write_small_kb(path, ENTITIES)
  return path


@pytest.fixture(scope='module')
def written(tmp_path_factory, kb_dir):
  """(out_dir, pairs, stats) of one run; the 13th pair names an entity with no class."""
  out = str(tmp_path_factory.mktemp('w') / 'corpus')
  pairs = make_pairs()
  odd = types.SelectedPair(types.Pair('zz', image_bytes(1), 'gamma', 's'), ('Q30',), (0.5,))
  return out, pairs, run_write(out, pairs + [odd], kb_dir)


def shard_records(out_dir):
  return {os.path.basename(path): [tf.train.Example.FromString(r.numpy())
                                   for r in tf.data.TFRecordDataset(path)]
          for path in schema.list_shards(out_dir)}


def feature(ex, name):
  f = ex.features.feature[name]
  return list(getattr(f, f.WhichOneof('kind')).value)


def test_records_entity_table_and_tokenizer(written):
  out, pairs, _ = written
  meta, table = schema.validate_corpus(out)
  assert (meta['kind'], meta['num_entities'], meta['num_train_examples'], meta['num_shards'],
          meta['text_len']) == ('i2e', 2, 12, 3, 12)
  # Q1 is in 9 of the 12 pairs, Q2 in 9 too: tie -> Q-number order.
  assert (table.ids, table.names, list(table.counts)) == (['Q1', 'Q2'], ['Alpha', 'Beta'], [9, 9])
  assert table.descriptions == ['the first letter', 'the second letter']
  tok = tokenizer_lib.load_tokenizer(os.path.join(out, schema.TOKENIZER_FILE))
  by_key = {s.pair.key: s for s in pairs}
  seen = []
  for records in shard_records(out).values():
    keys = [feature(ex, 'image/key')[0].decode() for ex in records]
    assert keys == sorted(keys)  # Sorted by key within a shard.
    for key, ex in zip(keys, records):
      s = by_key[key]
      assert feature(ex, 'image/encoded') == [s.pair.image]
      assert feature(ex, 'entity/id') == [e.encode() for e in s.entity_ids]
      assert feature(ex, 'entity/class') == [int(e[1:]) - 1 for e in s.entity_ids]
      np.testing.assert_allclose(feature(ex, 'entity/score'), s.scores, rtol=1e-6)
      assert feature(ex, 'alt_text') == [s.pair.text.encode()]
      assert feature(ex, 'alt_text/tokens') == tokenizer_lib.fit_ids(
          tok.encode(s.pair.text).ids, 12, tokenizer_lib.eot_id(tok))
    seen += keys
  assert sorted(seen) == sorted(by_key)


def test_shards_follow_the_bucket_plan(written):
  out, _, _ = written
  records = shard_records(out)
  buckets = {}
  for ex in (ex for rs in records.values() for ex in rs):
    key = feature(ex, 'image/key')[0].decode()
    size = len(ex.SerializeToString(deterministic=True)) + 16
    b = write.seeded_hash(0, key) % (3 * write.BUCKETS_PER_SHARD)
    buckets[b] = buckets.get(b, 0) + size
  plan, used = write.plan_shards(buckets.items(), 3)
  for name, rs in records.items():
    index = int(name.split('-')[1])
    assert {plan[write.seeded_hash(0, feature(ex, 'image/key')[0].decode()) %
                 (3 * write.BUCKETS_PER_SHARD)] for ex in rs} == {index}
  sizes = [os.path.getsize(p) for p in schema.list_shards(out)]
  assert used == 3 and max(sizes) - min(sizes) <= max(buckets.values())


def test_stats_dead_letters_and_tfds(written):
  out, pairs, st = written
  assert (st['inputs'], st['written'], st['reconciled']) == (14, 12, True)
  assert st['dead_letter'] == {'undecodable_image': 1, 'encode_failed': 1}
  assert [s['name'] for s in st['stages']] == ['select', 'write']
  assert st['entities']['kept'] == 2 and st['entities']['histogram'] == {'8-15': 2}
  lines = [json.loads(l) for path in glob.glob(os.path.join(out, 'dead_letter', '*.jsonl'))
           for l in open(path)]
  assert sorted((d['stage'], d['reason'], d['key']) for d in lines) == [
      ('select', 'undecodable_image', 'bad'), ('write', 'encode_failed', 'zz')]
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  builder = tfds.builder_from_directory(out)
  got = {ex['image']['key'].numpy().decode(): ex
         for ex in builder.as_dataset(split='train', shuffle_files=False)}
  assert sorted(got) == sorted(s.pair.key for s in pairs)
  first = pairs[2]  # ('Q2', 'Q1')
  assert list(got[first.pair.key]['entity']['class'].numpy()) == [1, 0]
  assert got[first.pair.key]['image']['encoded'].shape == (18, 18, 3)
  assert not [n for n in os.listdir(os.path.dirname(out)) if '.tmp-' in n]


def test_same_input_same_seed_gives_identical_shards(written, kb_dir, tmp_path):
  out, pairs, _ = written
  odd = types.SelectedPair(types.Pair('zz', image_bytes(1), 'gamma', 's'), ('Q30',), (0.5,))
  run_write(str(tmp_path / 'again'), list(reversed(pairs)) + [odd], kb_dir)
  for name in [os.path.basename(p) for p in schema.list_shards(out)] + ['tokenizer.json']:
    with open(os.path.join(out, name), 'rb') as a, open(tmp_path / 'again' / name, 'rb') as b:
      assert a.read() == b.read(), name
  run_write(str(tmp_path / 'seed1'), pairs, kb_dir, seed=1)
  assert [open(p, 'rb').read() for p in schema.list_shards(out)] != [
      open(p, 'rb').read() for p in schema.list_shards(str(tmp_path / 'seed1'))]


def test_non_empty_out_dir_is_refused_and_only_a_corpus_is_replaced(written, kb_dir, tmp_path):
  out = tmp_path / 'taken'
  out.mkdir()
  (out / 'precious.txt').write_text('keep me')
  with pytest.raises(write.OutputExistsError, match='not empty'):
    write.WriteCorpus(str(out), kb_dir, stage_names=['select'])
  with pytest.raises(write.OutputExistsError, match='replaces only an earlier output'):
    write.WriteCorpus(str(out), kb_dir, stage_names=['select'], overwrite=True)
  assert os.listdir(out) == ['precious.txt']
  given = os.path.join(written[0], schema.TOKENIZER_FILE)
  run_write(str(out / 'corpus'), make_pairs(2), kb_dir)
  run_write(str(out / 'corpus'), make_pairs(4), kb_dir, overwrite=True, tokenizer=given)
  assert (out / 'precious.txt').read_text() == 'keep me'
  assert (out / 'corpus' / schema.TOKENIZER_FILE).read_bytes() == open(given, 'rb').read()
  assert schema.validate_corpus(str(out / 'corpus'))[0]['num_train_examples'] == 4


def test_pairs_corpus_has_no_entities(kb_dir, tmp_path):
  pairs = [types.SelectedPair(s.pair, (), ()) for s in make_pairs(5)]
  st = run_write(str(tmp_path / 'pairs'), pairs, '', kind='pairs', num_shards=2)
  meta, table = schema.validate_corpus(str(tmp_path / 'pairs'))
  assert (meta['kind'], meta['num_entities'], len(table), st['written']) == ('pairs', 0, 0, 5)
  assert 'entities' not in st
  records = [ex for rs in shard_records(str(tmp_path / 'pairs')).values() for ex in rs]
  assert len(records) == 5 and all(feature(ex, 'entity/id') == [] for ex in records)


def test_no_surviving_record_is_an_error_and_writes_nothing(kb_dir, tmp_path):
  with pytest.raises(Exception, match='no record survived'):
    run_write(str(tmp_path / 'none'), [], kb_dir)
  assert not (tmp_path / 'none').exists()
