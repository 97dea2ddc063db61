"""The data of benchmarks/i2e_web_text.py: the dump parses as Wikidata's, every gold mention
slices to its text and names an item of the dump that the KB keeps, and the files are what
make_data.py writes from the hand-written sources."""
import importlib.util
import json
import os

import pytest

from data_prep.i2e import wikidata

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                    'data', 'i2e_web_text')
LANGUAGES = {'en', 'de', 'fr', 'es', 'it', 'ja'}
KINDS = {'stock', 'product', 'sentence', 'filename', 'empty', 'no_entity'}


def _make_data():
  spec = importlib.util.spec_from_file_location('make_data', os.path.join(DATA, 'make_data.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def dump_lines():
  with open(os.path.join(DATA, 'kb_dump.json'), 'rb') as f:
    return f.read().splitlines()


@pytest.fixture(scope='module')
def alt_texts():
  with open(os.path.join(DATA, 'alt_texts.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_dump_has_the_official_layout(dump_lines):
  assert dump_lines[0] == b'[' and dump_lines[-1] == b']'
  body = dump_lines[1:-1]
  assert all(l.endswith(b',') for l in body[:-1]) and not body[-1].endswith(b',')
  for line in body:
    item = json.loads(line.rstrip(b','))
    assert item['type'] == 'item'
    for field in ('labels', 'descriptions', 'aliases'):
      for lang, value in item[field].items():
        for entry in value if isinstance(value, list) else [value]:
          assert entry['language'] == lang and entry['value'].strip()
    for st in item['claims'].get('P31', []):
      assert st['mainsnak']['datavalue']['value']['id'].startswith('Q')


def test_gold_mentions_slice_to_their_text_and_name_kept_items(dump_lines, alt_texts):
  kept, ids = set(), set()
  for line in dump_lines[1:-1]:
    ids.add(json.loads(line.rstrip(b','))['id'])
    try:
      parsed = wikidata.parse_item(line.rstrip(b','), languages=sorted(LANGUAGES),
                                   excluded_types=wikidata.DEFAULT_EXCLUDED_TYPES)
    except Exception as e:  # pylint: disable=broad-except  # skipped kinds (given names, ...)
      assert wikidata.is_skip(getattr(e, 'reason', '')), e
      continue
    kept.add(parsed[0].id)
  assert len(ids) == len(dump_lines) - 2, 'a Q-id appears twice in the dump'
  assert len({r['id'] for r in alt_texts}) == len(alt_texts)
  bad = []
  for r in alt_texts:
    assert r['lang'] in LANGUAGES and r['kind'] in KINDS, r
    last_end = 0
    for g in sorted(r['gold'], key=lambda g: g['start']):
      if (r['text'][g['start']:g['end']] != g['text'] or g['entity_id'] not in kept
          or g['start'] < last_end or g['text'] != g['text'].strip()):
        bad.append((r['id'], g))
      last_end = g['end']
  assert not bad, bad[:5]


def test_files_are_what_make_data_writes(dump_lines, alt_texts):
  make_data = _make_data()
  assert [json.loads(l.rstrip(b','))['id'] for l in dump_lines[1:-1]] == [
      e['id'] for e in make_data.read_entities()]
  assert alt_texts == make_data.read_texts()


def test_no_entity_kinds_have_no_gold_and_every_language_has_both(alt_texts):
  for r in alt_texts:
    if r['kind'] in ('empty', 'no_entity'):
      assert not r['gold'], r['id']
  for lang in LANGUAGES:
    rows = [r for r in alt_texts if r['lang'] == lang]
    assert len(rows) >= 30 and any(r['gold'] for r in rows) and any(not r['gold'] for r in rows)


def test_parse_marked_offsets():
  text, gold = _make_data().parse_marked('The <b>[[Eiffel Tower|Q243]]</b> in [[Paris|Q90]]')
  assert text == 'The <b>Eiffel Tower</b> in Paris'
  assert [(text[g['start']:g['end']], g['entity_id']) for g in gold] == [
      ('Eiffel Tower', 'Q243'), ('Paris', 'Q90')]
