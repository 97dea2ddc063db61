"""Tests for data_prep/demo_world/web.py and web_kb.py: raw web pairs, the Wikidata dump and
the ground truth, read back with raw APIs (tarfile, gzip, json, PIL) and checked against each other."""
import collections
import gzip
import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image
import pytest

from test_demo_world import DESCRIPTION_RE, dominant_colour
from data_prep import demo_world
from data_prep.demo_world import web as web_lib
from data_prep.demo_world import web_kb, world
from data_prep.i2e import wikidata
from mofi_jax.data import schema

SMALL = dict(seed=5, num_entities=40, images_per_entity=8, num_shards=3, image_size=24,
             multi_entity_frac=0.3, label_noise=0.15, retrieval_categories=3, vocab_size=300,
             distractor_frac=0.4)


@pytest.fixture(scope='module')
def web(tmp_path_factory):
  out = web_lib.write_web_pairs(tmp_path_factory.mktemp('web') / 'w', SMALL)
  with open(os.path.join(out, web_lib.META_FILE)) as f:
    meta = json.load(f)
  with open(os.path.join(out, web_lib.GROUND_TRUTH_FILE)) as f:
    truth = [json.loads(line) for line in f]
  return dict(dir=out, meta=meta, truth=truth, pairs=read_tars(out), dump=read_dump(out))


def read_tars(out):
  """{corpus key: {ext: bytes}} from the tar shards, with each key's shard index; the corpus
  key is the sample key prefixed by its folder, as ReadPairs names it."""
  pairs = {}
  folder = os.path.join(out, web_lib.PAIRS_DIR)
  for shard, name in enumerate(sorted(os.listdir(folder))):
    assert name == f'{shard:05d}.tar'
    with tarfile.open(os.path.join(folder, name)) as tar:
      for member in tar.getmembers():
        key, ext = member.name.rsplit('.', 1)
        pairs.setdefault(f'{web_lib.PAIRS_DIR}/{key}', dict(shard=shard))[ext] = (
            tar.extractfile(member).read())
  return pairs


def read_dump(out):
  with gzip.open(os.path.join(out, web_lib.DUMP_PATH), 'rt', encoding='utf-8') as f:
    return f.read()


def dump_entities(text):
  """The official layout, parsed line by line as a streaming reader does."""
  lines = text.split('\n')
  assert lines[0] == '[' and lines[-2:] == [']', '']
  body = lines[1:-2]
  assert all(line.endswith(',') for line in body[:-1]) and not body[-1].endswith(',')
  return [json.loads(line.rstrip(',')) for line in body]


NON_VISUAL_CLASSES = {klass for klass, *_ in web_kb.NON_VISUAL}


def _class(e):
  return e['claims']['P31'][0]['mainsnak']['datavalue']['value']['id']


@pytest.fixture(scope='module')
def kb(web):
  """{qid: (label, description, aliases, sitelinks, P31 class)} of the English items that are
  not of a non-visual class."""
  out = {}
  for e in dump_entities(web['dump']):
    if e['type'] == 'item' and 'en' in e['labels'] and _class(e) not in NON_VISUAL_CLASSES:
      out[e['id']] = (e['labels']['en']['value'], e['descriptions']['en']['value'],
                      [a['value'] for a in e['aliases'].get('en', [])], len(e['sitelinks']),
                      e['claims']['P31'][0]['mainsnak']['datavalue']['value']['id'])
  return out


def test_tar_shards_are_img2dataset_layout(web):
  pairs = web['pairs']
  assert sorted(pairs) == sorted(t['key'] for t in web['truth'])
  assert len(pairs) == web['meta']['num_pairs'] == len(web['truth'])
  for key, files in pairs.items():
    assert set(files) == {'shard', 'jpg', 'json', 'txt'}
    folder, sample_key = key.split('/')
    assert folder == 'pairs' and re.fullmatch(r'\d{9}', sample_key)
    assert int(sample_key[:5]) == files['shard']
    side = json.loads(files['json'])
    assert side['key'] == sample_key and side['status'] == 'success'
    assert side['caption'] == files['txt'].decode('utf-8')
    assert side['sha256'] == hashlib.sha256(files['jpg']).hexdigest()
    image = Image.open(io.BytesIO(files['jpg']))
    assert image.format == 'JPEG' and image.size == (24, 24) == (side['width'], side['height'])
  assert {f['shard'] for f in pairs.values()} == {0, 1, 2}


def test_dump_is_official_layout(web, kb):
  entities = dump_entities(web['dump'])
  types = collections.Counter(e['type'] for e in entities)
  non_visual = [e for e in entities if e['type'] == 'item' and e['claims'] and
                _class(e) in NON_VISUAL_CLASSES]
  assert types == {'item': len(kb) + 1 + len(non_visual), 'property': 1, 'lexeme': 1}
  # The non-visual items: one of each kind per 10th drawable entity, named after it, of
  # classes that build_kb's default type filter drops.
  assert len(non_visual) == web['meta']['num_non_visual'] == 4 * len(web_kb.NON_VISUAL)
  assert NON_VISUAL_CLASSES <= set(wikidata.DEFAULT_EXCLUDED_TYPES)
  drawable_names = {v[0] for v in kb.values() if v[4] == 'Q100'}
  assert {e['labels']['en']['value'] for e in non_visual
          if _class(e) == 'Q4167410'} <= drawable_names
  assert len({e['id'] for e in entities}) == len(entities)
  assert all(re.fullmatch(r'Q[1-9]\d*', q) for q in kb)
  meta = web['meta']
  assert len(kb) == meta['num_kb_entities'] == meta['num_drawable'] + meta['num_place'] + \
      meta['num_person'] and meta['num_drawable'] == 40
  classes = collections.Counter(v[4] for v in kb.values())
  assert classes == {'Q100': 40, 'Q200': meta['num_place'], 'Q5': meta['num_person']}
  for label, description, _, sitelinks, klass in kb.values():
    assert 1 <= sitelinks <= len(web_kb.SITES)
    if klass == 'Q100':
      assert DESCRIPTION_RE.match(description), description
  # No two entities share a label; the only shared names are the ambiguous aliases.
  names = collections.Counter(n.casefold() for v in kb.values() for n in [v[0]] + v[2])
  shared = {n for n, count in names.items() if count > 1}
  assert shared == {a.casefold() for a in meta['ambiguous_aliases']} and shared


def test_ambiguous_aliases_resolvable_by_prior_coherence_or_image(web, kb):
  by_alias = collections.defaultdict(list)
  for qid, (_, _, aliases, sitelinks, klass) in kb.items():
    for a in aliases:
      by_alias[a].append((klass == 'Q100', sitelinks, qid))
  drawn = {q for t in web['truth'] for q in t['true']}
  intended = {}
  for alias, regime in web['meta']['ambiguous_aliases'].items():
    if regime == 'senses':   # 2 or 3 drawable entities, every one drawn somewhere
      assert 2 <= len(by_alias[alias]) <= 3 and all(d for d, _, _ in by_alias[alias])
      assert {q for _, _, q in by_alias[alias]} <= drawn
      intended[alias] = {q for _, _, q in by_alias[alias]}
      continue
    (_, kb_only, _), (_, drawable, qid) = sorted(by_alias[alias])  # False (KB-only) first.
    intended[alias] = {qid}
    assert drawable >= 4 * kb_only if regime == 'prior' else kb_only > drawable
  used, pairs = collections.Counter(), 0
  for t in web['truth']:
    pairs += any(m['ambiguous'] for m in t['mentions'])
    for m in t['mentions']:
      assert m['ambiguous'] == (m['text'] in intended), m
      if not m['ambiguous']:
        assert m['senses'] == [m['entity']]
        continue
      assert m['role'] == 'true' and m['entity'] in intended[m['text']], m
      assert m['entity'] in t['true'] and set(m['senses']) == {
          q for q, v in kb.items() if m['text'] in v[2]}
      regime = web['meta']['ambiguous_aliases'][m['text']]
      used[regime] += 1
      if regime == 'coherence':  # Another drawable entity is named next to it.
        others = [o for o in t['mentions'] if o is not m and kb[o['entity']][4] == 'Q100']
        assert others, t
  assert used['prior'] > 0 and used['senses'] > 0
  assert pairs >= 0.1 * len(web['truth']), (pairs, len(web['truth']))


def whole_word(name, text):
  return re.search(rf'(?<!\w){re.escape(name)}(?!\w)', text, re.IGNORECASE)


def test_ground_truth_matches_texts(web, kb):
  names = [(n, q) for q, v in kb.items() for n in [v[0]] + v[2]]
  kinds = collections.Counter()
  for t in web['truth']:
    text = web['pairs'][t['key']]['txt'].decode('utf-8')
    found = {(n.casefold(), q) for n, q in names if whole_word(n, text)}
    recorded = {(m['text'].casefold(), m['entity']) for m in t['mentions']}
    # Every KB name in the text is a recorded mention, and only those: noise names nothing.
    assert {n for n, _ in found} == {n for n, _ in recorded}, (text, t['mentions'])
    assert recorded <= found
    assert (t['kind'] == 'noise') == (not t['mentions'])
    for m in t['mentions']:
      assert text[m['start']:m['end']] == m['text']
      label, _, aliases, _, _ = kb[m['entity']]
      assert m['text'] in [label] + aliases and m['alias'] == (m['text'] != label)
      assert (m['entity'] in t['true']) == (m['role'] == 'true')  # Distractors are not drawn.
      after, description = text[m['end']:], kb[m['entity']][1]
      if m['role'] == 'true' and after.startswith(' the '):  # 'Lequyl the cyan star'
        kinds['short'] += after.startswith(' the ' + ' '.join(description.split()[1:3]))
      elif m['role'] == 'true' and after.startswith(' ('):  # 'Lequyl (a cyan star on ...)'
        kinds['full'] += after[2:].startswith(description + ')')
      kinds[m['role'], kb[m['entity']][4]] += 1
    assert t['mentioned_true'] == [m['entity'] for m in t['mentions'] if m['role'] == 'true']
    assert t['distractors'] == [m['entity'] for m in t['mentions'] if m['role'] == 'distractor']
  # Attributes written after a name are that (true) entity's.
  follows = [web['pairs'][t['key']]['txt'].decode()[m['end']:] for t in web['truth']
             for m in t['mentions'] if m['role'] == 'true']
  described = sum(f.startswith((' the ', ' (')) and not f.startswith(' (see also')
                  for f in follows)
  assert kinds['short'] + kinds['full'] == described > 20
  # Every kind of distractor occurs: other drawable entities, places, photographers.
  assert {k for k in kinds if isinstance(k, tuple) and k[0] == 'distractor'} == {
      ('distractor', 'Q100'), ('distractor', 'Q200'), ('distractor', 'Q5')}
  n = len(web['truth'])
  noise = sum(t['kind'] == 'noise' for t in web['truth'])
  with_distractor = sum(bool(t['distractors']) for t in web['truth'])
  assert 0.03 * n < noise < 0.2 * n and 0.3 * n < with_distractor < 0.7 * n


def test_true_entities_are_drawn(web, kb):
  palette = np.array(list(world.COLORS.values()), np.float32)
  hits = []
  for t in web['truth']:
    assert t['true'] == [o['entity'] for o in t['objects']] and 1 <= len(t['true']) <= 2
    for i, o in enumerate(t['objects']):
      color, shape, background = DESCRIPTION_RE.match(kb[o['entity']][1]).groups()
      assert (o['color'], o['shape']) == (color, shape)
      if i == 0:  # The image has the first entity's background.
        assert t['background'] == background
    if len(t['objects']) == 1:
      pixels = dominant_colour(web['pairs'][t['key']]['jpg'])
      nearest = list(world.COLORS)[np.argmin(np.linalg.norm(palette - pixels, axis=1))]
      hits.append(nearest == t['objects'][0]['color'])
  assert len(hits) > 100 and np.mean(hits) >= 0.95, np.mean(hits)


def test_world_is_the_demo_world(web, kb, tmp_path):
  direct = demo_world.ensure_corpus(tmp_path / 'direct', SMALL)
  table = schema.load_entities(direct)
  assert {(q, n, d) for q, n, d in zip(table.ids, table.names, table.descriptions)} == {
      (q, v[0], v[1]) for q, v in kb.items() if v[4] == 'Q100'}
  with open(os.path.join(direct, demo_world.RETRIEVAL_DIR, 'categories.json'), 'rb') as f:
    direct_categories = f.read()
  with open(os.path.join(web['dir'], demo_world.RETRIEVAL_DIR, 'categories.json'), 'rb') as f:
    assert f.read() == direct_categories
  names = os.listdir(os.path.join(web['dir'], demo_world.RETRIEVAL_DIR))
  per_category = collections.Counter(n.split('_')[0] for n in names if n.endswith('.jpg'))
  assert per_category == {'0': 10, '1': 10, '2': 10}


def tree_bytes(folder):
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def test_deterministic_in_seed(web, tmp_path):
  again = tree_bytes(web_lib.write_web_pairs(tmp_path / 'again', SMALL))
  assert again == tree_bytes(web['dir'])
  other = tree_bytes(web_lib.write_web_pairs(tmp_path / 'other', {**SMALL, 'seed': 6}))
  plain = lambda files: {f for f in files if not f.startswith('retrieval/')}
  assert plain(other) == plain(again)  # Retrieval images are named by content hash.
  assert other['pairs/00000.tar'] != again['pairs/00000.tar']
  assert other[web_lib.DUMP_PATH] != again[web_lib.DUMP_PATH]


def test_cli_errors_leave_folder_alone(tmp_path, capsys):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(SystemExit, match=r'^demo_world.web: error: .*folder is not empty'):
    web_lib.main(['--out', str(tmp_path), '--num_entities', '6'])
  with pytest.raises(SystemExit, match=r'^demo_world.web: error: .*holds no web.json, so it '
                     'is not an output of demo_world.web; refusing to replace it'):
    web_lib.main(['--out', str(tmp_path), '--overwrite'])
  with pytest.raises(SystemExit, match=r'^demo_world.web: error: .*noise_frac=2.0; expected a '
                     r'fraction'):
    web_lib.main(['--out', str(tmp_path / 'x'), '--noise_frac', '2'])
  assert sorted(os.listdir(tmp_path)) == ['notes.txt']
  web_lib.main(['--out', str(tmp_path / 'ok'), '--num_entities', '6',
                      '--images_per_entity', '2', '--image_size', '16',
                      '--retrieval_categories', '1'])
  assert re.search(r'ok: \d+ pairs in 8 shards, 10 KB entities \(6 drawable, 2 places, '
                   r'2 photographers\), 2 ambiguous aliases', capsys.readouterr().out)
  web_lib.main(['--out', str(tmp_path / 'ok'), '--num_entities', '7', '--overwrite',
                      '--images_per_entity', '2', '--image_size', '16',
                      '--retrieval_categories', '1'])
  assert '(7 drawable' in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ['notes.txt', 'ok']  # No temporary folder left.
