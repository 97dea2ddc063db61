"""Tests for data_prep/demo_world/ (world, render, direct, corpus): the demo corpus, read back
with raw APIs."""
import collections
import io
import json
import os
import re

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mofi_jax.data import schema
from data_prep import demo_world
from data_prep.demo_world import render, world
from mofi_jax.data import tokenizer as tokenizer_lib

SMALL = dict(seed=3, num_entities=6, images_per_entity=3, num_shards=2, image_size=16,
             retrieval_categories=2, vocab_size=300)
DESCRIPTION_RE = re.compile(r'^an? (\w+) (\w+) on a ([\w ]+) background$')


def read_records(corpus_dir):
  """All records, parsed with the raw protobuf API (independent of schema.parse_examples)."""
  out = []
  for path in schema.list_shards(corpus_dir):
    for record in tf.data.TFRecordDataset(path):
      f = tf.train.Example.FromString(record.numpy()).features.feature
      out.append(dict(
          image=f['image/encoded'].bytes_list.value[0], key=f['image/key'].bytes_list.value[0],
          classes=list(f['entity/class'].int64_list.value),
          ids=[i.decode() for i in f['entity/id'].bytes_list.value],
          scores=list(f['entity/score'].float_list.value),
          alt_text=f['alt_text'].bytes_list.value[0].decode(),
          tokens=list(f['alt_text/tokens'].int64_list.value)))
  return out


@pytest.fixture(scope='module')
def corpus(tiny_corpus):
  return dict(dir=tiny_corpus, meta=schema.load_corpus_meta(tiny_corpus),
              table=schema.load_entities(tiny_corpus), records=read_records(tiny_corpus))


def test_counts_and_frequency_order(corpus):
  table, records = corpus['table'], corpus['records']
  assert len(records) == corpus['meta']['num_train_examples']
  counts = np.bincount([c for r in records for c in r['classes']], minlength=len(table))
  np.testing.assert_array_equal(table.counts, counts)
  assert np.all(np.diff(table.counts) <= 0)  # Most frequent first.


def test_records_are_consistent(corpus):
  table, records, meta = corpus['table'], corpus['records'], corpus['meta']
  tok = tokenizer_lib.load_tokenizer(os.path.join(corpus['dir'], schema.TOKENIZER_FILE))
  eot = tokenizer_lib.eot_id(tok)
  sizes = collections.Counter(len(r['classes']) for r in records)
  assert set(sizes) == {1, 2} and sizes[2] > 0.1 * len(records)  # multi_entity_frac=0.3.
  assert len({r['key'] for r in records}) == len(records)
  for r in records:
    assert len(set(r['classes'])) == len(r['classes'])
    assert r['ids'] == [table.ids[c] for c in r['classes']]
    assert all(0.2 - 1e-6 <= s <= 0.4 + 1e-6 for s in r['scores'])  # float32 storage.
    ids = tok.encode(r['alt_text']).ids
    expected = ids if len(ids) <= meta['text_len'] else ids[:meta['text_len'] - 1] + [eot]
    assert r['tokens'] == expected
    image = Image.open(io.BytesIO(r['image']))
    assert image.format == 'JPEG' and image.size == (24, 24) and image.mode == 'RGB'


def test_entity_table(corpus):
  table = corpus['table']
  assert len(set(table.names)) == len(table) and all(n.isalpha() for n in table.names)
  assert len(set(table.ids)) == len(table) and all(re.fullmatch(r'Q\d+', i) for i in table.ids)
  assert len(set(table.descriptions)) == len(table)
  for d in table.descriptions:
    color, shape, background = DESCRIPTION_RE.match(d).groups()
    assert color in world.COLORS and shape in world.SHAPES
    assert background in world.BACKGROUNDS


def dominant_colour(jpeg):
  """Mean RGB of the saturated (non-grey) pixels: the drawn shapes."""
  pixels = np.asarray(Image.open(io.BytesIO(jpeg)), np.float32).reshape(-1, 3)
  saturated = pixels.max(1) - pixels.min(1) > 80
  return pixels[saturated].mean(0)


def test_drawn_colour_matches_description(corpus):
  table = corpus['table']
  palette = np.array(list(world.COLORS.values()), np.float32)
  hits = []
  for r in corpus['records']:
    if len(r['classes']) == 1:
      nearest = list(world.COLORS)[np.argmin(
          np.linalg.norm(palette - dominant_colour(r['image']), axis=1))]
      hits.append(nearest == DESCRIPTION_RE.match(table.descriptions[r['classes'][0]]).group(1))
  assert np.mean(hits) >= 0.95, np.mean(hits)


def test_alt_texts_are_noisy_but_labels_are_not(corpus):
  names = corpus['table'].names
  right = wrong = nameless = 0
  for r in corpus['records']:
    mentioned = {i for i, n in enumerate(names) if re.search(rf'\b{n}\b', r['alt_text'])}
    right += bool(mentioned & set(r['classes']))
    wrong += bool(mentioned - set(r['classes'])) and not mentioned & set(r['classes'])
    nameless += not mentioned
  n = len(corpus['records'])
  assert right > 0.6 * n and 0 < wrong < 0.3 * n and 0 < nameless < 0.3 * n


def test_retrieval_folder_holds_unseen_categories(corpus):
  folder = os.path.join(corpus['dir'], demo_world.RETRIEVAL_DIR)
  with open(os.path.join(folder, 'categories.json')) as f:
    categories = json.load(f)
  assert [c['category'] for c in categories] == list(range(5))
  assert not {c['description'] for c in categories} & set(corpus['table'].descriptions)
  names = sorted(n for n in os.listdir(folder) if n.endswith('.jpg'))
  per_category = collections.Counter(int(re.fullmatch(r'(\d+)_\w+\.jpg', n).group(1))
                                     for n in names)
  assert per_category == {c: 10 for c in range(5)}


def test_idempotent_and_config_mismatch(corpus):
  meta_path = os.path.join(corpus['dir'], schema.META_FILE)
  before = os.stat(meta_path).st_mtime_ns
  cfg = corpus['meta']['synthetic_config']
  assert demo_world.ensure_corpus(corpus['dir'], cfg) == corpus['dir']
  assert os.stat(meta_path).st_mtime_ns == before
  with pytest.raises(schema.CorpusError, match='corpus.json: a corpus with a different config'):
    demo_world.ensure_corpus(corpus['dir'], {**cfg, 'seed': 99})


def corpus_bytes(corpus_dir):
  files = [schema.ENTITIES_FILE, schema.TOKENIZER_FILE] + [
      os.path.basename(p) for p in schema.list_shards(corpus_dir)]
  return {f: open(os.path.join(corpus_dir, f), 'rb').read() for f in files}


def test_deterministic_in_seed(tmp_path):
  a = corpus_bytes(demo_world.ensure_corpus(tmp_path / 'a', SMALL))
  b = corpus_bytes(demo_world.ensure_corpus(tmp_path / 'b', SMALL))
  c = corpus_bytes(demo_world.ensure_corpus(tmp_path / 'c', {**SMALL, 'seed': 4}))
  assert a == b
  assert a.keys() == c.keys() and a['train-00000-of-00002.tfrecord'] != c[
      'train-00000-of-00002.tfrecord']
  schema.validate_corpus(str(tmp_path / 'c'))


def test_overwrite_replaces_demo_corpus(tmp_path):
  out = demo_world.ensure_corpus(tmp_path / 'x', SMALL)
  demo_world.ensure_corpus(out, {**SMALL, 'num_entities': 7}, overwrite=True)
  assert schema.load_corpus_meta(out)['num_entities'] == 7
  assert sorted(os.listdir(tmp_path)) == ['x']  # No temporary folders left behind.


def test_killed_run_leaves_no_half_corpus(tmp_path, monkeypatch):
  def crash(*args):
    raise KeyboardInterrupt('killed')
  monkeypatch.setattr(render, 'write_retrieval', crash)
  with pytest.raises(KeyboardInterrupt):
    demo_world.ensure_corpus(tmp_path / 'half', SMALL)
  assert os.listdir(tmp_path) == []


def test_refuses_foreign_folder(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(schema.CorpusError, match='not empty'):
    demo_world.ensure_corpus(tmp_path, SMALL)
  assert os.listdir(tmp_path) == ['notes.txt']


@pytest.mark.parametrize('cfg, message', [
    ({'num_entitys': 3}, r"unknown field\(s\) \['num_entitys'\]"),
    ({'num_entities': 500, 'retrieval_categories': 40}, '512 attribute combinations'),
    ({'num_shards': 0}, 'num_shards >= 1'),
    ({'builder': 'web'}, r"builder='web'; expected one of \('direct', 'i2e'\)"),
    ({'distractor_frac': 1.5}, r'distractor_frac=1.5; expected a fraction in \[0, 1\]'),
    ({'bootstrap_steps': 0}, 'bootstrap_steps >= 1'),
    ({'num_colors': 17}, r'8 <= num_colors <= 16 and 1 <= num_sizes <= 3; got 17, 1'),
    ({'num_colors': 16, 'num_sizes': 3, 'num_entities': 3100}, '3072 attribute combinations'),
])
def test_config_errors(cfg, message):
  with pytest.raises(ValueError, match=message):
    demo_world.resolve_config(cfg)


def _sweep_world(n):
  cfg = demo_world.resolve_config(dict(num_entities=n, num_colors=16, num_sizes=3,
                                       heldout_first=True, retrieval_categories=40))
  return world.make_world(np.random.default_rng(cfg.seed), cfg)


def test_larger_grid_keeps_held_out_categories_at_every_size():
  """The entity sweep's worlds: one held-out set at every size, never a train entity; each
  smaller world's entities are the first ones of the larger (a denser sample of one grid)."""
  worlds = {n: _sweep_world(n) for n in (24, 150, 3000)}
  heldout = {tuple(c) for c in worlds[24].heldout}
  assert len(heldout) == 40
  for n, w in worlds.items():
    assert {tuple(c) for c in w.heldout} == heldout and len(w.combos) == n
    train = {tuple(c) for c in w.combos}
    assert len(train) == n and not train & heldout
    assert len(set(w.descriptions)) == n            # every entity is told apart by its text
    assert not set(w.descriptions) & {world.describe(c) for c in w.heldout}
    np.testing.assert_array_equal(w.combos[:24], worlds[24].combos)
  big = worlds[3000].combos   # all 16 colours and 3 sizes are drawn
  assert set(big[:, 1]) == set(range(16)) and set(big[:, 3]) == {0, 1, 2}
  assert 'a small violet ' in ' '.join(worlds[3000].descriptions)


def test_default_world_is_generator_4s():
  """The grid's new fields at their defaults draw the world every earlier corpus was made
  from: the 512 (shape, colour, background) combinations in the seed's permutation."""
  cfg = demo_world.resolve_config({})
  w = world.make_world(np.random.default_rng(cfg.seed), cfg)
  order = np.random.default_rng(cfg.seed).permutation(512)
  expected = np.stack(np.unravel_index(order, (8, 8, 8)), 1)
  np.testing.assert_array_equal(w.combos[:, :3], expected[:cfg.num_entities])
  np.testing.assert_array_equal(w.heldout[:, :3],
                                expected[cfg.num_entities:][:cfg.retrieval_categories])
  assert not w.combos[:, 3].any() and all(DESCRIPTION_RE.match(d) for d in w.descriptions)


def test_sizes_render_at_their_scale():
  """A small object covers less of the image than a default one, a large one more."""
  rng = np.random.default_rng(0)
  covered = []
  for size in range(3):
    combo = np.array([0, 5, 0, size])  # a blue circle on a dark background
    images = render.render_jpegs(rng, [[combo]] * 40, 48)
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert('RGB'), np.float64)
                       for j in images])
    covered.append(float(((pixels[..., 2] - pixels[..., 0]) > 80).mean()))
  default, small, large = covered
  scale = world.SIZE_SCALE
  assert small == pytest.approx(default * scale[1] ** 2, rel=0.2)
  assert large == pytest.approx(default * scale[2] ** 2, rel=0.2)


def test_held_out_images_are_the_same_at_every_size(tmp_path):
  """heldout_first: the retrieval folder's bytes do not depend on num_entities."""
  folders = []
  for n in (5, 9):
    out = tmp_path / str(n)
    out.mkdir()
    demo_world.direct.generate(str(out), demo_world.resolve_config(dict(
        SMALL, num_entities=n, num_colors=16, num_sizes=3, heldout_first=True)))
    folder = out / demo_world.RETRIEVAL_DIR
    folders.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
  assert folders[0] == folders[1] and len(folders[0]) == 2 * 10 + 1


@pytest.mark.parametrize('text, expected', [('false', False), ('True', True), ('0', False),
                                            ('yes', True)])
def test_true_false_flags_read_their_text(text, expected):
  """--heldout_first False must not read as bool('False'), which is True."""
  import argparse  # pylint: disable=import-outside-toplevel
  from data_prep.demo_world import web  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  web.add_config_flags(parser)
  assert parser.parse_args(['--heldout_first', text]).heldout_first is expected
  assert parser.parse_args([]).heldout_first is False
  with pytest.raises(SystemExit):
    parser.parse_args(['--heldout_first', 'maybe'])
