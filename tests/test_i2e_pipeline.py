"""End to end: raw web pairs seeded with every kind of bad input -> build_i2e -> a
corpus the spine trains on. No crash, every good pair kept, every bad one dead-lettered
with its reason, counts that reconcile, byte-identical shards across runs and processes,
and the command line's one-line errors."""
import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline

from configs import i2e as i2e_config
from data_prep.i2e import kb as kb_lib
from data_prep.i2e import pipeline, types
from mofi_jax.data import schema
from test_i2e_read import image_bytes, write_tar
from test_trainer import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTITIES = [types.Entity('Q101', 'Lequyl', 'a cyan star', (), 50),
            types.Entity('Q202', 'Brouth', 'a red circle', ('the brouth',), 40),
            types.Entity('Q303', 'Kraeth', 'a green square', (), 30),
            types.Entity('Q404', 'Zorbin', 'a blue ring', (), 20)]
# Good pairs: key -> (alt-text, entities it names). Zorbin is named once: below min_images.
GOOD = {
    'g00': ('photo of Lequyl at the fair', {'Q101'}),
    'g01': ('my lovely Lequyl', {'Q101'}),      # (one lower-case word needs an NER: mentions.py)
    'g02': ('Lequyl and Brouth at the beach', {'Q101', 'Q202'}),
    'g03': ('Brouth, stock photo', {'Q202'}),
    'g04': ('the Brouth spotted near the zoo', {'Q202'}),
    'g05': ('Kraeth &amp; friends', {'Q303'}),
    'g06': ('KRAETH wallpaper', {'Q303'}),
    'g07': ('vintage Kraeth next to Lequyl', {'Q101', 'Q303'}),
    'huge': ('Brouth ' + 'word ' * 1500, {'Q202'}),           # Cut to max_chars, kept.
}
NO_ENTITY = {'n00': 'sunset over the sea', 'z00': 'a Zorbin in the park'}
BAD = {  # key -> (stage, reason)
    'b_corrupt': ('clean', 'corrupt_image'), 'b_truncated': ('clean', 'corrupt_image'),
    'b_html': ('clean', 'corrupt_image'),
    'b_notutf8': ('read', 'not_utf8'), 'b_noimage': ('read', 'missing_field'),
    'b_notext': ('read', 'missing_field'), 'b_toolong': ('read', 'text_too_long'),
    'p_null': ('read', 'missing_field'),
}


RAW = 'raw'  # The pairs' folder: ReadPairs prefixes every key with 'raw/'.


def unprefixed(key):
  """A corpus key without its source id, which must be the folder's name."""
  assert key == '' or key.startswith(f'{RAW}/'), key
  return key[len(RAW) + 1:] if key else key


@pytest.fixture(scope='module')
def raw_pairs(tmp_path_factory):
  """Folder of tars + a Parquet file holding the good pairs and every kind of bad input."""
  folder = tmp_path_factory.mktemp(RAW, numbered=False)
  img = {k: image_bytes(200 + i, size=20 + i % 7) for i, k in enumerate(list(GOOD) + list(
      NO_ENTITY) + ['b_empty', 'b_notutf8', 'b_notext', 'b_toolong', 'dup', 'g09'])}
  members = lambda keys: [m for k in keys for m in (
      (f'{k}.jpg', img[k]), (f'{k}.txt', (GOOD.get(k) or (NO_ENTITY[k],))[0].encode()))]
  write_tar(folder / 'a.tar', members(['g00', 'g01', 'g02', 'g03', 'n00']) + [
      ('b_corrupt.jpg', bytes(range(256)) * 4), ('b_corrupt.txt', b'Lequyl'),
      ('b_truncated.jpg', img['g00'][:len(img['g00']) // 2]), ('b_truncated.txt', b'Lequyl'),
      ('b_html.jpg', b'<html><body>404 Lequyl not found</body></html>'),
      ('b_html.txt', b'Lequyl'),
      ('b_empty.jpg', img['b_empty']), ('b_empty.txt', b' \t\n '),
      ('b_notutf8.jpg', img['b_notutf8']), ('b_notutf8.txt', b'Lequyl \xff\xfe\xfd'),
      ('b_noimage.txt', b'Lequyl without image'), ('b_notext.jpg', img['b_notext']),
      ('b_toolong.jpg', img['b_toolong']), ('b_toolong.txt', b'x' * (1 << 20) + b'y'),
      ('b_tiny.jpg', image_bytes(7, size=1)), ('b_tiny.txt', b'Lequyl, a tracking pixel')])
  # b.tar repeats key g00 (a duplicate key: a.tar's copy wins) and g00's image under
  # another key (an exact duplicate image: the smaller key wins).
  write_tar(folder / 'b.tar', members(['g04', 'g05', 'g06', 'huge', 'z00']) + [
      ('g00.jpg', img['g01']), ('g00.txt', b'Lequyl impostor'),
      ('zz_dup.jpg', img['g00']), ('zz_dup.txt', b'Lequyl again')])
  cut_image = image_bytes(999, size=64)
  full = write_tar(folder / 'c.tar', members(['g07']) + [
      ('g09.jpg', cut_image), ('g09.txt', b'Kraeth')]).read_bytes()
  cut = full.index(cut_image) + len(cut_image) // 2  # The file ends inside g09.jpg.
  (folder / 'c.tar').write_bytes(full[:cut])
  (folder / 'd.tar').write_bytes(b'\x00garbage, not a tar\x00' * 64)
  pq.write_table(pa.table({'key': ['p_null'], 'jpg': pa.array([None], pa.binary()),
                           'txt': ['Lequyl']}), folder / 'e.parquet')
  return str(folder)


EXPECTED_DEAD = sorted([(s, r, k) for k, (s, r) in BAD.items()] + [
    ('dedup', 'duplicate_key', 'g00'), ('read', 'unreadable_shard', ''),
    ('read', 'unreadable_shard', '')])


def pipeline_config():
  c = i2e_config.get_config()
  c.global_passes.min_images = 2
  c.clean.min_image_size = 16   # the test images are 20-26 px; b_tiny is 1x1
  c.select.threshold = -1.0  # A random-init CLIP: keep every linked entity.
  c.write.update(num_shards=2, vocab_size=300, text_len=16)
  return c


def char_tokenize(texts, length=16):
  """A tokenizer for the tiny CLIP: <bos>=1, chars -> 2..62, <eot>=63, 0-padded."""
  out = np.zeros((len(texts), length), np.int32)
  for row, text in zip(out, texts):
    ids = [1] + [2 + ord(c) % 61 for c in text[:length - 2]] + [63]
    row[:len(ids)] = ids
  return out


class TinyClipLoader:
  """A random-init contrastive mofi_jax Encoder (picklable for RunInference)."""

  def __call__(self):
    from mofi_jax import inference  # pylint: disable=import-outside-toplevel
    from mofi_jax.models import mofi  # pylint: disable=import-outside-toplevel
    c = small_config('contrastive')
    c.model.text.vocab_size = 64
    model = mofi.build(c.model)
    s, n = c.input.image_size, c.input.text_len
    params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, s, s, 3), np.float32),
                                 np.ones((1, n), np.int32))['params'])
    from mofi_jax import sharding  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])  # One device: the cheapest compile.
    return inference.Encoder(config=c, params=params, tokenize=char_tokenize, source='tiny',
                             mesh=mesh)


def dead_letters(out_dir):
  rows = [json.loads(line) for path in glob.glob(os.path.join(out_dir, 'dead_letter', '*'))
          for line in open(path)]
  return sorted((d['stage'], d['reason'], unprefixed(d['key'])) for d in rows), rows


def written_records(out_dir, key=unprefixed):
  out = {}
  for path in schema.list_shards(out_dir):
    for r in tf.data.TFRecordDataset(path):
      values = schema.check_example_proto(r.numpy(), 10**6, path, kind=schema.corpus_kind(
          schema.load_corpus_meta(out_dir)))
      out[key(values['image/key'][0].decode())] = values
  return out


@pytest.fixture(scope='module')
def i2e_corpus(raw_pairs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('i2e') / 'corpus')
  kb_dir = str(tmp_path_factory.mktemp('kb'))
  kb_lib.write_small_kb(kb_dir, ENTITIES)
  with test_pipeline.TestPipeline() as p:
    pipeline.build_i2e(p, pairs=[os.path.join(raw_pairs, '*')], out_dir=out,
                       config=pipeline_config(), kb_dir=kb_dir, clip_loader=TinyClipLoader())
  return out


def test_i2e_corpus_keeps_good_pairs_with_their_entities(i2e_corpus):
  meta, table = schema.validate_corpus(i2e_corpus)
  # Counts: Q101 in g00 g01 g02 g07 (4), Q202 in g02 g03 g04 huge (4), Q303 in g05 g06 g07.
  assert table.ids == ['Q101', 'Q202', 'Q303'] and list(table.counts) == [4, 4, 3]
  assert table.names == ['Lequyl', 'Brouth', 'Kraeth'] and meta['kind'] == 'i2e'
  records = written_records(i2e_corpus)
  assert sorted(records) == sorted(GOOD)
  for key, values in records.items():
    ids = [i.decode() for i in values['entity/id']]
    assert set(ids) == GOOD[key][1], key
    assert values['entity/class'] == [table.ids.index(i) for i in ids]
    assert all(-1 <= s <= 1 for s in values['entity/score'])
  assert records['g00']['alt_text'] == [b'photo of Lequyl at the fair']  # a.tar's copy
  assert records['g05']['alt_text'] == [b'Kraeth & friends']
  huge, raw = records['huge']['alt_text'][0].decode(), GOOD['huge'][0]
  assert 900 < len(huge) <= 1000 and huge == raw[:len(huge)] and raw[len(huge)] == ' '


def test_every_bad_input_is_dead_lettered_and_counts_reconcile(i2e_corpus):
  got, rows = dead_letters(i2e_corpus)
  assert got == EXPECTED_DEAD
  assert sorted(os.path.basename(d['source']) for d in rows
                if d['reason'] == 'unreadable_shard') == ['c.tar', 'd.tar']
  with open(os.path.join(i2e_corpus, 'stats.json')) as f:
    st = json.load(f)
  assert st['reconciled']
  filtered = st['filtered']
  assert filtered == {'duplicate_image': 1, 'image_too_small': 1, 'no_mention': 1,
                      'empty_text': 1,                 # b_empty: counted, not a dead letter
                      'rare_entity_only': 1}
  assert st['inputs'] == st['written'] + sum(filtered.values()) + sum(
      st['dead_letter'].values()) == len(GOOD) + len(NO_ENTITY) + 3 + len(EXPECTED_DEAD)
  assert [s['name'] for s in st['stages']] == ['read', 'dedup', 'clean', 'mentions', 'link',
                                               'select', 'global', 'write']
  assert st['entities']['below_min_images'] == 1  # Zorbin


STEPS_TO_FALL = 12


def test_the_spine_trains_on_the_corpus(i2e_corpus):
  from mofi_jax import run_setup, sharding, trainer  # pylint: disable=import-outside-toplevel
  from mofi_jax.data import pipeline as spine  # pylint: disable=import-outside-toplevel
  c = small_config('multitask')
  c.model.head.num_classes = c.model.text.vocab_size = -1
  c.input.update(batch_size=8, data_dir=i2e_corpus)
  c = run_setup.resolve_from_corpus(c, i2e_corpus)
  assert (c.model.head.num_classes, c.model.text.vocab_size) == (3, schema.load_corpus_meta(
      i2e_corpus)['vocab_size'])
  batch = next(iter(spine.make_train_dataset(i2e_corpus, c.input, process_index=0,
                                             process_count=1, per_process_batch=8)))
  labels = batch['labels'].numpy()
  assert labels.shape == (8, c.input.max_entities) and labels.max() < 3 and (labels[:, 0] >= 0).all()
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])  # One device: the cheapest compile.
  sharding.activate(mesh)
  setup = trainer.build(c, mesh)
  # "Trains": the loss on this batch falls over a few steps, not merely one finite value.
  state, batch = setup.init(mesh, 0), sharding.global_batch(mesh, {
      k: v.numpy() for k, v in batch.items()})
  loss = []
  for _ in range(STEPS_TO_FALL):
    state, metrics = setup.train_step(state, batch)
    loss.append(float(metrics.compute()['loss']))
  assert np.all(np.isfinite(loss)) and loss[-1] < 0.8 * loss[0], loss


# ----------------------------------------------------------------------------- pairs corpus, CLI


def run_cli(*args, cwd=ROOT, **env):
  """The command line in its own process; `env`: more environment variables."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', **env)
  return subprocess.run([sys.executable, '-m', 'data_prep.build_i2e', *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=600)


def test_cli_pairs_only_default_runner_and_byte_identical_rerun(raw_pairs, tmp_path):
  out = str(tmp_path / 'pairs')
  # The default local runner: 2 worker processes.
  result = run_cli('--pairs', os.path.join(raw_pairs, '*.tar') + ',' +
                   os.path.join(raw_pairs, '*.parquet'), '--out', out, '--pairs_only',
                   '--config.write.num_shards=2', '--config.write.vocab_size=300',
                   '--config.write.text_len=16', '--config.clean.min_image_size=16')
  assert result.returncode == 0, result.stderr[-3000:]
  kept = len(GOOD) + len(NO_ENTITY)
  # Inputs: the kept pairs, zz_dup (a duplicate image), b_tiny (1x1), b_empty (no alt-text)
  # and the dead letters.
  assert f'{kept} of {kept + 3 + len(EXPECTED_DEAD)} inputs written' in result.stdout
  # The per-stage counters: the first stage sees every input, the last one writes `kept`.
  rows = [l.split() for l in result.stdout.splitlines()[1:] if l.split()[1:3] and
          all(t.isdigit() for t in l.split()[1:3])]
  assert int(rows[0][1]) == kept + 3 + len(EXPECTED_DEAD) and int(rows[-1][2]) == kept, rows
  assert all(int(a[2]) == int(b[1]) for a, b in zip(rows, rows[1:])), rows
  meta, table = schema.validate_corpus(out)
  assert (meta['kind'], len(table)) == ('pairs', 0)
  assert sorted(written_records(out)) == sorted(list(GOOD) + list(NO_ENTITY))
  got, _ = dead_letters(out)
  assert got == EXPECTED_DEAD
  # Same input, same seed, another process and runner mode: identical shards.
  again = str(tmp_path / 'again')
  with test_pipeline.TestPipeline() as p:
    pipeline.build_i2e(p, pairs=[os.path.join(raw_pairs, '*')], out_dir=again,
                       config=pipeline_config(), pairs_only=True)
  names = [os.path.basename(x) for x in schema.list_shards(out)]
  assert names == [os.path.basename(x) for x in schema.list_shards(again)]
  for name in names + [schema.TOKENIZER_FILE]:
    with open(os.path.join(out, name), 'rb') as a, open(os.path.join(again, name), 'rb') as b:
      assert a.read() == b.read(), name


def test_cli_errors_are_one_line(raw_pairs, tmp_path):
  from data_prep import build_i2e  # pylint: disable=import-outside-toplevel
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'x').write_text('x')
  tars, out = os.path.join(raw_pairs, '*.tar'), str(tmp_path / 'o')
  for args, message in [
      (['--pairs', str(tmp_path / 'nothing-*.tar'), '--out', out, '--pairs_only'],
       'matches no file'),
      (['--pairs', tars, '--out', str(taken), '--pairs_only'], 'output folder is not empty'),
      (['--pairs', tars, '--out', out], '--kb and --clip are required'),
      (['--pairs', tars, '--out', out, '--kb', str(taken), '--clip', str(taken)],
       'kb.json not found'),
      (['--pairs', tars, '--out', str(tmp_path), '--pairs_only', '--overwrite'],
       'replaces only an earlier output of data_prep.build_i2e'),
      (['--pairs', tars, '--out', os.path.dirname(raw_pairs), '--pairs_only', '--overwrite'],
       'contains --pairs'),
      (['--pairs', tars, '--out', out, '--pairs_only', '--config.write.nope=1'],
       "--config.write.nope: config has no entry 'write.nope'"),
      (['--pairs', tars, '--out', out, '--pairs_only', '--config.write.num_shards=two'],
       "--config.write.num_shards='two': expected an int"),
      (['--pairs', tars, '--out', out, '--pairs_only', '--config.clean.max_chars=2.5'],
       "--config.clean.max_chars='2.5': expected an int"),
      (['--pairs', tars, '--out', out, '--config', str(tmp_path / 'none.py')],
       'none.py\': no such file'),
  ]:
    with pytest.raises(SystemExit) as exit_info:
      build_i2e.main(args)
    text = str(exit_info.value.code)  # sys.exit(str): printed to stderr, exit status 1.
    assert text.startswith('data_prep.build_i2e: error:') and '\n' not in text, text
    assert message in text, text
  assert (taken / 'x').read_text() == 'x' and not os.path.exists(out)


def test_local_runner_defaults_to_both_cores_unless_told_otherwise():
  from apache_beam.options import pipeline_options as po  # pylint: disable=import-outside-toplevel
  direct = lambda args: pipeline.pipeline_options(args).view_as(po.DirectOptions)
  assert (direct([]).direct_num_workers, direct([]).direct_running_mode) == (
      2, 'multi_processing')
  mine = direct(['--direct_running_mode=in_memory'])
  assert (mine.direct_num_workers, mine.direct_running_mode) == (2, 'in_memory')
  other = direct(['--runner=FlinkRunner'])
  assert (other.direct_num_workers, other.direct_running_mode) == (1, 'in_memory')


def test_config_overrides_parse_to_the_field_types():
  from data_prep import build_i2e  # pylint: disable=import-outside-toplevel
  c = build_i2e.load_config(build_i2e.DEFAULT_CONFIG, [
      '--config.global_passes.eval_dedup_dirs=/a,/b', '--config.select.threshold=0',
      '--config.mentions.ner_model=en_core_web_sm', "--config.read.caption_keys=('txt',)",
      '--config.mentions.use_alias_matcher=False'])
  assert c.global_passes.eval_dedup_dirs == ('/a', '/b') and c.select.threshold == 0.0
  assert isinstance(c.select.threshold, float) and c.read.caption_keys == ('txt',)
  assert c.mentions.ner_model == 'en_core_web_sm' and c.mentions.use_alias_matcher is False
