"""The Wikidata KB builder (data_prep/i2e/wikidata.py, data_prep/build_kb.py) and its loader
(data_prep/i2e/kb.py)."""
import bz2
import glob
import gzip
import json
import os
import subprocess
import sys

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from data_prep import build_kb, split_dump
from data_prep.i2e import kb, kb_build
from data_prep.i2e import types, wikidata
from portable_runner import portable_services

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_MEMORY = ['--runner=DirectRunner', '--direct_running_mode=in_memory', '--direct_num_workers=1']


def _item(qid, labels=None, descriptions=None, aliases=None, sitelinks=0, kind='item'):
  obj = {'type': kind, 'id': qid,
         'labels': {l: {'language': l, 'value': v} for l, v in (labels or {}).items()},
         'descriptions': {l: {'language': l, 'value': v} for l, v in (descriptions or {}).items()},
         'aliases': {l: [{'language': l, 'value': v} for v in vs]
                     for l, vs in (aliases or {}).items()},
         'sitelinks': {f'wiki{i}': {'site': f'wiki{i}', 'title': 't'} for i in range(sitelinks)},
         'claims': {'P31': [{'mainsnak': {'property': 'P31'}}]}}
  return json.dumps(obj).encode('utf-8')


# 11 entity lines: 3 entities, 3 skipped, 5 dead letters.
ENTITY_LINES = [
    _item('Q1', {'en': 'Paris', 'fr': 'Paris'}, {'en': 'capital of France'},
          {'en': ['City of Light', 'paris']}, sitelinks=3),
    _item('P31', {'en': 'instance of'}, kind='property'),             # skipped: not_item
    _item('Q2', {'de': 'Berlin'}, {'de': 'Hauptstadt'}),                # skipped: no_label
    b'{"type": "item", "id": "Q9", "labels": {',                        # dead: malformed_json
    _item('Q3', {'mul': 'Ada Lovelace'}, {'en': 'English mathematician'},
          {'en': ['Countess of Lovelace']}, sitelinks=1),               # label from 'mul'
    b'{"type": "item", "id": "Q8", "labels": "\xff\xfe"}',              # dead: not_utf8
    _item('Q1', {'en': 'Paris'}, {'en': 'a stale copy'}, sitelinks=1),  # dead: duplicate_id
    _item('L7', {'en': 'run'}, kind='lexeme'),                          # skipped: not_item
    b'[1, 2]',                                                          # dead: not_an_object
    _item('Qx', {'en': 'nothing'}),                                     # dead: bad_id
    _item('Q4', {'en': '  New   York '}),                               # whitespace collapsed
]

EXPECTED_ENTITIES = [
    types.Entity('Q1', 'Paris', 'capital of France', ('City of Light', 'paris'), 3),
    types.Entity('Q3', 'Ada Lovelace', 'English mathematician', ('Countess of Lovelace',), 1),
    types.Entity('Q4', 'New York', '', (), 0),
]
# 'paris' (alias) normalises like the label: one row, with the label's quality.
EXPECTED_ALIASES = sorted([('city of light', 'Q1', 0.8), ('paris', 'Q1', 1.0),
                           ('ada lovelace', 'Q3', 1.0), ('countess of lovelace', 'Q3', 0.8),
                           ('new york', 'Q4', 1.0)])
EXPECTED_DEAD = sorted([('bad_id', 'Qx'), ('duplicate_id', 'Q1'), ('malformed_json', ''),
                        ('not_an_object', ''), ('not_utf8', '')])


def write_dump(path, lines=ENTITY_LINES):
  """The official layout: '[', one entity per line with a trailing comma but the last, ']'."""
  body = b'[\n' + b',\n'.join(lines) + b'\n]\n'
  opener = {'.bz2': bz2.open, '.gz': gzip.open}.get(os.path.splitext(path)[1], open)
  with opener(path, 'wb') as f:
    f.write(body)
  return str(path)


def _alias_table(kb_dir, loaded):
  """The rows of the Parquet alias table, each of them found by the mapped index's lookup."""
  rows = [r for f in sorted(glob.glob(os.path.join(kb_dir, 'aliases-*.parquet')))
          for r in pq.read_table(f).to_pylist()]
  for r in rows:   # (id, quality, alias) only: the hit's other fields are the index's business
    assert (r['entity_id'], r['quality'], r['alias']) in [
        (h.entity_id, h.quality, h.alias) for h in loaded.lookup(r['alias'])]
  return sorted((r['alias'], r['entity_id'], r['quality']) for r in rows)


@pytest.mark.parametrize('suffix', ['.json', '.json.bz2', '.json.gz'])
def test_build_kb_from_each_dump_compression(tmp_path, suffix):
  dump = write_dump(tmp_path / f'latest-all{suffix}')
  out = str(tmp_path / 'kb')
  with beam.Pipeline(options=PipelineOptions(IN_MEMORY)) as p:
    kb_build.build_pipeline(p, dump, out, languages=['en'], num_shards=2)
  meta = json.loads((tmp_path / 'kb' / 'kb.json').read_text())
  assert meta['num_entities'] == 3 and meta['num_aliases'] == 5
  assert meta['skipped'] == {'not_item': 2, 'no_label': 1}
  assert meta['dead_letter'] == {'bad_id': 1, 'duplicate_id': 1, 'malformed_json': 1,
                                 'not_an_object': 1, 'not_utf8': 1}
  # Every entity line of the dump is accounted for exactly once.
  assert (meta['num_entities'] + sum(meta['skipped'].values()) +
          sum(meta['dead_letter'].values())) == len(ENTITY_LINES)
  assert meta['entity_files'] == ['entities-00000-of-00002.parquet',
                                  'entities-00001-of-00002.parquet']
  dead = [json.loads(l) for l in (tmp_path / 'kb' / 'dead_letter.jsonl').read_text().splitlines()]
  assert sorted((d['reason'], d['key']) for d in dead) == EXPECTED_DEAD
  assert {d['source'] for d in dead if d['reason'] != 'duplicate_id'} == {dump}

  assert meta['num_untyped'] == 3   # the test items carry P31 snaks without a value
  assert meta['index_files']['surface'] == [f'surface-0000{i}-of-00008.marisa' for i in range(8)]
  loaded = kb.KnowledgeBase.load(out)
  assert [loaded.entity(q) for q in loaded.ids()] == EXPECTED_ENTITIES
  assert _alias_table(out, loaded) == EXPECTED_ALIASES


def test_parse_stage_alone_routes_every_line():
  lines = [('dump', l) for l in [b'['] + [l + b',' for l in ENTITY_LINES] + [b']']]
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(lines) | wikidata.ParseWikidata('en')
    assert_that(out['main'] | 'Ids' >> beam.Map(lambda e: e.id), equal_to(['Q1', 'Q3', 'Q4']),
                label='main')
    assert_that(out['filtered'] | 'F' >> beam.Map(lambda f: (f.reason, f.key)),
                equal_to([('not_item', 'P31'), ('no_label', 'Q2'), ('not_item', 'L7')]),
                label='filtered')
    assert_that(out['dead_letter'] | 'D' >> beam.Map(lambda d: (d.reason, d.key)),
                equal_to(EXPECTED_DEAD), label='dead')


def test_language_option_picks_labels_descriptions_and_aliases():
  line = _item('Q5', {'en': 'Germany', 'de': 'Deutschland'}, {'en': 'country', 'de': 'Staat'},
               {'de': ['BRD']}, sitelinks=2)
  assert wikidata.parse_line(line, 'de') == types.Entity('Q5', 'Deutschland', 'Staat', ('BRD',), 2)
  assert wikidata.parse_line(line, 'en') == types.Entity('Q5', 'Germany', 'country', (), 2)
  assert wikidata.parse_line(b'[') is None and wikidata.parse_line(b' ]\n') is None
  with pytest.raises(Exception, match='2 sitelinks < 3') as info:
    wikidata.parse_line(line, 'en', min_sitelinks=3)
  assert info.value.reason == 'few_sitelinks' and 'few_sitelinks' in wikidata.SKIP_REASONS


def test_normalize_alias_nfkc_casefold_whitespace():
  assert kb.normalize_alias('\uff30\uff41\uff52\uff49\uff53\u00a0 Stra\u00dfe\t') == 'paris strasse'


def test_loader_lookup_and_clear_errors(tmp_path):
  entities = [types.Entity('Q1', 'Paris', 'capital', ('City of Light',), 5),
              types.Entity('Q2', 'Paris Hilton', 'socialite', ('Paris',), 2)]
  kb.write_small_kb(str(tmp_path / 'kb'), entities)
  loaded = kb.KnowledgeBase.load(str(tmp_path / 'kb'))
  assert len(loaded) == 2 and loaded.ids() == ['Q1', 'Q2']
  # Most sitelinks first, read from the alias index; the query is normalised like the index.
  assert loaded.lookup('  PARIS ') == [types.AliasHit('Q1', 1.0, 'paris', 5),
                                       types.AliasHit('Q2', 0.8, 'paris', 2)]
  assert loaded.lookup('Lyon') == []
  with pytest.raises(KeyError, match="'Q3'"):
    loaded.entity('Q3')
  os.remove(tmp_path / 'kb' / 'kb.json')
  with pytest.raises(kb.KBError, match='kb.json not found'):
    kb.KnowledgeBase.load(str(tmp_path / 'kb'))


def test_cli_builds_and_never_overwrites(tmp_path, capsys):
  dump = write_dump(tmp_path / 'latest-all.json.gz')
  out = tmp_path / 'kb'
  args = ['--wikidata', dump, '--out', str(out), '--num_shards', '1'] + IN_MEMORY
  assert build_kb.main(args) == 0
  assert 'build_kb: 3 entities, 5 aliases' in capsys.readouterr().out
  assert sorted(os.listdir(tmp_path)) == ['kb', 'latest-all.json.gz']   # no staging left
  before = {n: (out / n).read_bytes() for n in os.listdir(out)}

  assert build_kb.main(args) == 1                     # exists: refused, untouched
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and '--overwrite' in err
  assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before

  assert build_kb.main(['--wikidata', str(tmp_path / 'none.json'), '--out',
                        str(tmp_path / 'kb2')] + IN_MEMORY) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'none.json: no such file' in err
  assert build_kb.main(['--out', str(tmp_path / 'kb3')]) == 1
  assert '--wikidata' in capsys.readouterr().err


def _typed(qid, label, *classes, sitelinks=1, claims=None):
  obj = json.loads(_item(qid, {'en': label}, sitelinks=sitelinks))
  obj['claims'] = claims if claims is not None else {'P31': [
      {'mainsnak': {'snaktype': 'value', 'property': 'P31', 'datavalue': {
          'type': 'wikibase-entityid', 'value': {'entity-type': 'item', 'id': c}}},
       'rank': 'normal'} for c in classes]}
  return json.dumps(obj).encode('utf-8')


TYPED_LINES = [
    _typed('Q10', 'Lequyl', 'Q5'),                                     # kept: a human
    _typed('Q11', 'Lequyl', 'Q4167410', sitelinks=40),                 # disambiguation page
    _typed('Q12', 'Category:Lequyl', 'Q4167836'),                      # category
    _typed('Q13', 'Lequyl and kin', 'Q13442814', 'Q5'),                # scholarly article
    _typed('Q14', 'Template:Lequyl', 'Q11266439'),                     # template
    _typed('Q15', 'Tobrun', claims={}),                                # no P31: kept, untyped
    _typed('Q16', 'Old Tobrun', claims={'P31': [                       # deprecated: ignored
        {'mainsnak': {'snaktype': 'value', 'datavalue': {'value': {'id': 'Q4167410'}}},
         'rank': 'deprecated'}]}),
    _typed('Q17', 'Broken', claims={'P31': 'Q5'}),                     # dead: bad_claim
    _typed('Q18', 'Broken too', claims={'P31': [{'mainsnak': {'snaktype': 'value'}}]}),
]


def _build(tmp_path, name, dumps, **kwargs):
  out = str(tmp_path / name)
  with beam.Pipeline(options=PipelineOptions(IN_MEMORY)) as p:
    kb_build.build_pipeline(p, dumps, out, num_shards=1, **kwargs)
  return out, json.loads((tmp_path / name / 'kb.json').read_text())


def test_p31_types_are_filtered_and_counted_per_kind(tmp_path):
  dump = write_dump(tmp_path / 'typed.json', TYPED_LINES)
  out, meta = _build(tmp_path, 'kb', dump)
  assert meta['skipped'] == {'type:category': 1, 'type:disambiguation_page': 1,
                             'type:scholarly_article': 1, 'type:template': 1}
  assert meta['dead_letter'] == {'bad_claim': 2} and meta['num_untyped'] == 2
  assert meta['num_entities'] + sum(meta['skipped'].values()) + 2 == len(TYPED_LINES)
  loaded = kb.KnowledgeBase.load(out)
  assert loaded.ids() == ['Q10', 'Q15', 'Q16']
  assert [h.entity_id for h in loaded.lookup('lequyl')] == ['Q10']
  # With no excluded types the non-visual items are entities too (so the filter is real).
  _, keep_all = _build(tmp_path, 'kb_all', dump, excluded_types={})
  assert keep_all['skipped'] == {} and keep_all['num_entities'] == 7


def test_dump_chunks_build_the_same_kb_as_the_whole_dump(tmp_path):
  lines = ENTITY_LINES + TYPED_LINES
  whole = write_dump(tmp_path / 'whole.json.gz', lines)
  chunks = tmp_path / 'chunks'
  manifest = split_dump.split(whole, str(chunks), lines_per_chunk=6)
  assert manifest['lines'] == [6, 6, 6, 4] and manifest['total_lines'] == len(lines) + 2
  with gzip.open(chunks / 'chunk-00003.json.gz') as f:
    assert f.read().endswith(b']\n')   # line-aligned: the closing bracket in the last chunk
  a_dir, a = _build(tmp_path, 'a', whole)
  b_dir, b = _build(tmp_path, 'b', [str(chunks / 'chunk-0000[01].json.gz'),
                                    str(chunks / 'chunk-0000[23].json.gz')])
  assert b['num_dump_files'] == 4 and a['num_dump_files'] == 1
  for key in ('num_entities', 'num_aliases', 'num_untyped', 'skipped', 'dead_letter'):
    assert a[key] == b[key], key
  ka, kb_b = kb.KnowledgeBase.load(a_dir), kb.KnowledgeBase.load(b_dir)
  assert ka.ids() == kb_b.ids() and [ka.entity(q) for q in ka.ids()] == [
      kb_b.entity(q) for q in kb_b.ids()]


def test_overwrite_replaces_a_kb_but_never_another_folder(tmp_path, capsys):
  dump = write_dump(tmp_path / 'latest-all.json.gz')
  home = tmp_path / 'home'
  home.mkdir()
  (home / 'thesis.tex').write_text('years of work')
  args = ['--wikidata', dump, '--num_shards', '1', '--overwrite'] + IN_MEMORY
  assert build_kb.main(args + ['--out', str(home)]) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'replaces only an earlier output of data_prep.build_kb' in err
  assert os.listdir(home) == ['thesis.tex']
  assert build_kb.main(args + ['--out', str(tmp_path)]) == 1   # contains the dump
  assert 'contains --wikidata' in capsys.readouterr().err
  out = tmp_path / 'kb'
  assert build_kb.main(args + ['--out', str(out)]) == 0
  first = sorted(os.listdir(out))
  assert build_kb.main(args + ['--out', str(out)]) == 0         # an earlier KB: replaced
  assert json.loads((out / 'kb.json').read_text())['num_entities'] == 3
  assert sorted(os.listdir(out)) == first and '.mofi_jax-output.json' in first


class _FakeRemote:
  """FileSystems for 'gs://b/...' paths served from a local folder (size and mtime too)."""

  def __init__(self, folder):
    self.folder = folder

  def _local(self, path):
    return os.path.join(self.folder, path[len('gs://b/'):])

  def match(self, patterns):
    import types as pytypes  # pylint: disable=import-outside-toplevel
    st = os.stat(self._local(patterns[0]))
    meta = pytypes.SimpleNamespace(size_in_bytes=st.st_size, last_updated_in_seconds=st.st_mtime)
    return [pytypes.SimpleNamespace(metadata_list=[meta])]

  def open(self, path):
    return open(self._local(path), 'rb')


def test_remote_index_files_are_cached_privately_and_never_stale(tmp_path, monkeypatch):
  from data_prep.i2e import kb_index  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('MOFI_JAX_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(kb_index, 'FileSystems', _FakeRemote(str(tmp_path)))
  (tmp_path / 'surface-0.marisa').write_bytes(b'first build')
  # Someone else plants a file where the old code would have looked (a fixed /tmp path).
  first = kb_index.local_copy('gs://b/surface-0.marisa')
  assert open(first, 'rb').read() == b'first build'
  assert os.path.dirname(first) == str(tmp_path / 'cache' / 'kb')
  assert os.stat(tmp_path / 'cache' / 'kb').st_mode & 0o777 == 0o700
  assert kb_index.local_copy('gs://b/surface-0.marisa') == first   # made once
  (tmp_path / 'surface-0.marisa').write_bytes(b'rebuilt KB, same path')
  second = kb_index.local_copy('gs://b/surface-0.marisa')
  assert second != first and open(second, 'rb').read() == b'rebuilt KB, same path'


def _old_dump_item(qid, label):
  """An item as dumps before 2019 wrote it: PHP's empty array `[]` for every empty map."""
  return json.dumps({'type': 'item', 'id': qid, 'labels': {'en': {'language': 'en', 'value': label}},
                     'descriptions': [], 'aliases': [], 'claims': [], 'sitelinks': []}).encode()


NAME_LINES = [
    _old_dump_item('Q20', 'Ostrava'),                                  # kept: [] is an empty map
    json.dumps({'type': 'item', 'id': 'Q21', 'labels': [], 'descriptions': [], 'aliases': [],
                'claims': [], 'sitelinks': []}).encode(),              # skipped: no_label
    _typed('Q22', 'John', 'Q12308941'),                                # male given name
    _typed('Q23', 'Mary', 'Q11879590'),                                # female given name
    _typed('Q24', 'Alex', 'Q3409032'),                                 # unisex given name
    _typed('Q25', 'Smith', 'Q101352'),                                 # family name
    _typed('Q26', 'John Smith', 'Q22808320'),                          # name disambiguation
    _typed('Q27', 'Johnny', 'Q202444'),                                # given name
]


def test_old_dump_empty_lists_and_name_items(tmp_path):
  assert wikidata.parse_line(NAME_LINES[0]) == types.Entity('Q20', 'Ostrava', '', (), 0)
  dump = write_dump(tmp_path / 'names.json', NAME_LINES)
  out, meta = _build(tmp_path, 'kb', dump)
  assert meta['skipped'] == {
      'no_label': 1, 'type:male_given_name': 1, 'type:female_given_name': 1,
      'type:unisex_given_name': 1, 'type:family_name': 1, 'type:given_name': 1,
      'type:human_name_disambiguation_page': 1}
  assert meta['dead_letter'] == {} and meta['num_untyped'] == 1
  assert meta['num_entities'] + sum(meta['skipped'].values()) == len(NAME_LINES)
  assert kb.KnowledgeBase.load(out).ids() == ['Q20']


LANGUAGES = ['en', 'de', 'fr', 'es', 'it', 'ja']
MULTILINGUAL_LINES = [
    _item('Q30', {'de': 'Zugspitze'}, {'de': 'höchster Berg Deutschlands'}, {'de': ['Zugspitz']}),
    _item('Q31', {'fr': 'Tour Eiffel', 'de': 'Eiffelturm', 'ja': 'エッフェル塔'},
          {'it': 'torre di Parigi', 'fr': 'tour de Paris'},
          {'fr': ['la dame de fer', 'Tour Eiffel'], 'en': ['Eiffel Tower']}, sitelinks=4),
    _item('Q32', {'ja': '東京タワー', 'en': 'Tokyo Tower'}, {'ja': '東京都港区の電波塔'},
          {'ja': ['日本電波塔']}),
    _item('Q33', {'nl': 'Dom van Utrecht'}),                           # skipped: no_label
]
# By hand: the label and description of the first language that has one; then the other
# languages' labels, in language order, and every language's aliases, each once.
MULTILINGUAL_ENTITIES = [
    types.Entity('Q30', 'Zugspitze', 'höchster Berg Deutschlands', ('Zugspitz',), 0),
    types.Entity('Q31', 'Eiffelturm', 'tour de Paris',
                 ('Tour Eiffel', 'エッフェル塔', 'Eiffel Tower', 'la dame de fer'), 4),
    types.Entity('Q32', 'Tokyo Tower', '東京都港区の電波塔', ('東京タワー', '日本電波塔'), 0),
]


def test_languages_keep_labels_aliases_and_the_first_description(tmp_path, capsys):
  assert wikidata.parse_line(MULTILINGUAL_LINES[1], ('fr', 'de')) == types.Entity(
      'Q31', 'Tour Eiffel', 'tour de Paris', ('Eiffelturm', 'la dame de fer'), 4)
  dump = write_dump(tmp_path / 'multi.json', MULTILINGUAL_LINES)
  out = tmp_path / 'kb'
  args = ['--wikidata', dump, '--out', str(out), '--num_shards', '1'] + IN_MEMORY
  assert build_kb.main(args + ['--languages', ','.join(LANGUAGES)]) == 0
  meta = json.loads((out / 'kb.json').read_text())
  assert meta['languages'] == LANGUAGES and meta['language'] == 'en'
  assert meta['skipped'] == {'no_label': 1} and meta['num_entities'] == 3
  loaded = kb.KnowledgeBase.load(str(out))
  assert [loaded.entity(q) for q in loaded.ids()] == MULTILINGUAL_ENTITIES
  # Scripts without spaces come through unchanged, and the index finds them.
  assert [h.entity_id for h in loaded.lookup('東京タワー')] == ['Q32']
  assert [h.entity_id for h in loaded.lookup('エッフェル塔')] == ['Q31']
  capsys.readouterr()
  # --language stays as the one-language alias: only German here.
  assert build_kb.main(args[:3] + [str(tmp_path / 'kb_de')] + args[4:] + ['--language', 'de']) == 0
  meta = json.loads((tmp_path / 'kb_de' / 'kb.json').read_text())
  assert meta['languages'] == ['de'] and meta['skipped'] == {'no_label': 2}
  for bad, message in (('en,de,en', 'names a language twice'), ('en,DE', "'DE' is not")):
    assert build_kb.main(args[:3] + [str(tmp_path / 'kb_bad')] + args[4:] + ['--languages', bad]) == 1
    assert message in capsys.readouterr().err


def _statements(prop, *ids):
  return [{'mainsnak': {'snaktype': 'value', 'property': prop, 'datavalue': {
      'type': 'wikibase-entityid', 'value': {'entity-type': 'item', 'id': q}}},
           'type': 'statement', 'rank': 'normal'} for q in ids]


def _class(qid, label, *parents, instance_of=()):
  """A class item: its P279 (subclass of) parents, and P31 where given."""
  claims = {'P279': _statements('P279', *parents)}
  if instance_of:
    claims['P31'] = _statements('P31', *instance_of)
  return _typed(qid, label, claims=claims)


# A hand-built hierarchy under the default roots (Q4167410 disambiguation page, Q7187 gene,
# Q202444 given name, Q12308941 male given name, Q4167836 category, Q11266439 template).
HIERARCHY_LINES = [
    _class('Q40', 'list of names page', 'Q4167410'),
    _class('Q41', 'list of surnames page', 'Q40'),
    _class('Q42', 'list of Welsh surnames page', 'Q41'),             # 3 levels under Q4167410
    _class('Q43', 'gene family A', 'Q44'),                            # a cycle, under gene
    _class('Q44', 'gene family B', 'Q43', 'Q7187'),
    _class('Q45', 'loop A', 'Q46'),                                   # a cycle under no root
    _class('Q46', 'loop B', 'Q45'),
    _class('Q12308941', 'male given name', 'Q202444'),                # a root under a root
    _class('Q47', 'Welsh male given name', 'Q12308941'),
    _class('Q48', 'category-template page', 'Q11266439', 'Q4167836'),  # two roots, one level
    _class('Q49', 'tower', 'Q50', instance_of=['Q51']),               # no root above: kept
    _typed('Q60', 'Jones', 'Q42'),                                    # type:disambiguation_page
    _typed('Q61', 'BRCA-like', 'Q43'),                                # type:gene
    _typed('Q62', 'Loopy', 'Q45'),                                    # kept
    _typed('Q63', 'Dafydd', 'Q47'),                                   # type:male_given_name
    _typed('Q64', 'Odd page', 'Q48'),                                 # type:category
    _typed('Q65', 'Eiffel Tower', 'Q49'),                             # kept
    _typed('Q66', 'Bad class', claims={'P279': 'Q5'}),                # kept; P279 unreadable
]


def test_subclass_closure_excludes_descendants_and_ends_on_cycles(tmp_path):
  dump = write_dump(tmp_path / 'hierarchy.json', HIERARCHY_LINES)
  out, meta = _build(tmp_path, 'kb', dump)
  assert meta['skipped'] == {'type:disambiguation_page': 1, 'type:gene': 1,
                             'type:male_given_name': 1, 'type:category': 1}
  assert meta['num_entities'] + sum(meta['skipped'].values()) == len(HIERARCHY_LINES)
  assert kb.KnowledgeBase.load(out).ids() == [
      'Q12308941', 'Q40', 'Q41', 'Q42', 'Q43', 'Q44', 'Q45', 'Q46', 'Q47', 'Q48', 'Q49', 'Q62',
      'Q65', 'Q66']
  assert meta['subclass_closure'] is True and meta['subclass_edges'] == 13
  roots = wikidata.DEFAULT_EXCLUDED_TYPES
  # By hand: each root itself, plus Q40-Q42, Q43-Q44, Q47 (and Q12308941 counted as a root), Q48.
  expected = {r: sum(1 for v in roots.values() if v == r) for r in set(roots.values())}
  for reason, extra in (('disambiguation_page', 3), ('gene', 2), ('male_given_name', 1),
                        ('category', 1)):
    expected[reason] += extra
  assert meta['excluded_classes'] == expected
  # Without the closure, only direct P31 counts (so the closure is what excludes them).
  _, direct = _build(tmp_path, 'kb_direct', dump, subclass_closure=False)
  assert direct['skipped'] == {} and direct['subclass_closure'] is False


def _reference_closure(roots, edges):
  """Nearest root by relaxation to a fixed point (Bellman-Ford), ties to the smallest reason:
  independent of the breadth-first walk."""
  best = {int(q[1:]): (0, r) for q, r in roots.items()}
  changed = True
  while changed:
    changed = False
    for child, parent in edges:
      if parent in best:
        candidate = (best[parent][0] + 1, best[parent][1])
        if candidate < best.get(child, (float('inf'), '')):
          best[child], changed = candidate, True
  return {q: r for q, (_, r) in best.items()}


def test_closure_matches_a_fixed_point_reference_on_random_graphs():
  from data_prep.i2e import wikidata_classes  # pylint: disable=import-outside-toplevel
  rng = __import__('numpy').random.default_rng(0)
  for trial in range(20):
    n = 200
    edges = [(int(c), int(p)) for c, p in rng.integers(1, n, size=(3 * n, 2)) if c != p]
    roots = {f'Q{q}': f'kind{q % 3}' for q in rng.choice(range(1, n), size=4, replace=False)}
    got = wikidata_classes.close_over_subclasses(roots, edges)
    assert got == _reference_closure(roots, edges), trial
    kinds = wikidata_classes.ClassKinds(got)
    assert all(kinds.get(f'Q{q}') == r for q, r in got.items())
    assert kinds.get('Q999999') is None and kinds.get('P31') is None


def test_subclass_closure_on_the_portable_and_multi_process_runners(tmp_path):
  """The closure is a side input: serialised, staged and read by other processes there."""
  dump = write_dump(tmp_path / 'hierarchy.json.gz', HIERARCHY_LINES)
  _, reference = _build(tmp_path, 'kb_in_memory', dump)
  cmd = [sys.executable, '-m', 'data_prep.build_kb', '--wikidata', dump, '--num_shards', '1']
  with portable_services(str(tmp_path)) as flags:
    runs = {'portable': flags, 'multi_processing': []}   # [] : the CLI's default runner
    for name, runner_flags in runs.items():
      done = subprocess.run(cmd + ['--out', str(tmp_path / name)] + runner_flags, cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
      assert done.returncode == 0, done.stderr[-2000:]
  for name in runs:
    meta = json.loads((tmp_path / name / 'kb.json').read_text())
    for key in ('num_entities', 'skipped', 'dead_letter', 'excluded_classes', 'subclass_edges'):
      assert meta[key] == reference[key], (name, key)


# ----------------------------------------------------------------------------- homonyms
# The alias index keeps each alias's best max_candidates_per_alias (most sitelinks, then the
# smaller Q-number) and the count and summed (sitelinks + 1) of the others.

HOMONYM_K = 4
# Label -> how many items carry it: above, at and below K; sitelinks 0..3 so that ties abound.
HOMONYM_NAMES = {'John Smith': 13, 'Mary Jones': HOMONYM_K, 'Ana Lopez': 2, 'Tobrun Quay': 1}


def _homonym_entities(seed=0):
  """Items sharing labels and aliases, Q-numbers whose string order is not their numeric order
  (Q7 < Q30 < Q215), and a lower-case alias that joins another name's candidates at 0.8."""
  rng = __import__('numpy').random.default_rng(seed)
  numbers = iter(rng.choice(range(1, 400), size=sum(HOMONYM_NAMES.values()) + 2, replace=False))
  entities = []
  for name, count in HOMONYM_NAMES.items():
    for _ in range(count):
      aliases = ('Smith',) if rng.random() < 0.5 else ()
      entities.append(types.Entity(f'Q{next(numbers)}', name, '', aliases,
                                   int(rng.integers(0, 4))))
  entities.append(types.Entity(f'Q{next(numbers)}', 'Johnny', '', ('john smith', 'Smith'), 3))
  entities.append(types.Entity(f'Q{next(numbers)}', 'Mary', '', ('MARY JONES',), 2))
  return entities


def _brute_force_aliases(entities):
  """normalised alias -> every (Q-id, quality, sitelinks) naming it, from the forms directly."""
  out = {}
  for e in entities:
    forms = {}
    for form, quality in [(e.label, 1.0)] + [(a, 0.8) for a in e.aliases]:
      key = kb.normalize_alias(form)
      forms[key] = max(quality, forms.get(key, 0.0))
    for key, quality in forms.items():
      out.setdefault(key, []).append((e.id, quality, e.sitelinks))
  return out


def _expected(candidates, k):
  """(the top k by sitelinks desc, Q-number asc, as AliasHits' fields; the mass of all)."""
  ranked = sorted(candidates, key=lambda c: (-c[2], int(c[0][1:])))
  return ranked[:k or None], sum(s + 1 for _, _, s in candidates)


def _lookups(loaded, aliases):
  return {a: ([(h.entity_id, h.quality, h.sitelinks) for h in loaded.lookup(a)],
              loaded.alias_mass(a)) for a in aliases}


def test_alias_index_keeps_the_top_k_and_the_mass_of_all(tmp_path):
  entities = _homonym_entities()
  reference = _brute_force_aliases(entities)
  assert max(len(c) for c in reference.values()) > 2 * HOMONYM_K   # 'smith': 16 items
  sitelinks = [s for _, _, s in reference['john smith']]
  assert len(set(sitelinks)) < len(sitelinks)                      # ties to break by Q-number
  for k in (0, 1, HOMONYM_K, 64):
    expected = {a: _expected(c, k) for a, c in reference.items()}
    in_memory = kb.KnowledgeBase.from_entities(entities, max_candidates_per_alias=k)
    assert _lookups(in_memory, reference) == expected, k
    meta = kb.write_small_kb(str(tmp_path / f'kb{k}'), entities, max_candidates_per_alias=k)
    assert meta['max_candidates_per_alias'] == k and meta['num_alias_keys'] == len(reference)
    assert _lookups(kb.KnowledgeBase.load(str(tmp_path / f'kb{k}')), reference) == expected, k
  # K = 0 keeps every candidate; the hits carry the normalised alias.
  everything = kb.KnowledgeBase.from_entities(entities, max_candidates_per_alias=0)
  assert all(len(everything.lookup(a)) == len(c) for a, c in reference.items())
  assert {h.alias for h in everything.lookup('  JOHN  Smith')} == {'john smith'}
  assert everything.lookup('nobody') == [] and everything.alias_mass('nobody') == 0


def test_candidate_merges_in_any_order_and_grouping_give_one_result():
  """The Beam combiner merges partial results as the runner likes: every split, every order."""
  from data_prep.i2e import kb_index, kb_write  # pylint: disable=import-outside-toplevel
  rng = __import__('numpy').random.default_rng(1)
  singles = [kb_index.AliasCandidates(((f'Q{q}', 1.0, int(rng.integers(0, 5))),), 0, 0)
             for q in rng.choice(range(1, 1000), size=300, replace=False)]
  candidates = [c for s in singles for c in s.kept]
  for k in (0, 1, 7):
    kept, mass = _expected(candidates, k)
    want = kb_index.AliasCandidates(tuple(kept), len(candidates) - len(kept),
                                    mass - sum(s + 1 for _, _, s in kept))
    combine = kb_write._TopCandidates(k)   # pylint: disable=protected-access
    for trial in range(5):
      order = rng.permutation(len(singles))
      cuts = sorted(rng.choice(range(1, len(singles)), size=trial, replace=False))
      accumulators = []
      for part in (list(p) for p in __import__('numpy').split(order, cuts)):
        acc = combine.create_accumulator()
        for i in part:
          acc = combine.add_input(acc, singles[i])
        accumulators.append(acc)
      merged = combine.merge_accumulators(accumulators[::-1])
      assert combine.extract_output(merged) == want, (k, trial)


def test_beam_and_in_memory_builds_store_the_same_alias_index(tmp_path, capsys):
  entities = _homonym_entities()
  dump = write_dump(tmp_path / 'homonyms.json', [
      _item(e.id, {'en': e.label}, aliases={'en': list(e.aliases)}, sitelinks=e.sitelinks)
      for e in entities])
  reference = _brute_force_aliases(entities)
  for k in (HOMONYM_K, 0):
    out = tmp_path / f'kb{k}'
    assert build_kb.main(['--wikidata', dump, '--out', str(out), '--num_shards', '1',
                          '--index_shards', '3', '--max_candidates_per_alias', str(k)]
                         + IN_MEMORY) == 0
    meta = json.loads((out / 'kb.json').read_text())
    assert meta['max_candidates_per_alias'] == k and meta['num_alias_keys'] == len(reference)
    built = kb.KnowledgeBase.load(str(out))
    assert [built.entity(q) for q in built.ids()] == sorted(
        entities, key=lambda e: e.id)   # the dump round-trips, so the reference is the KB's
    in_memory = kb.KnowledgeBase.from_entities(entities, max_candidates_per_alias=k)
    assert _lookups(built, reference) == _lookups(in_memory, reference) == {
        a: _expected(c, k) for a, c in reference.items()}
  capsys.readouterr()
  assert build_kb.main(['--wikidata', dump, '--out', str(tmp_path / 'bad'),
                        '--max_candidates_per_alias', '-1'] + IN_MEMORY) == 1
  err = capsys.readouterr().err
  assert '--max_candidates_per_alias must be an integer >= 0' in err and 'got -1' in err
  with pytest.raises(ValueError, match='--max_candidates_per_alias'):
    kb.write_small_kb(str(tmp_path / 'bad'), entities, max_candidates_per_alias=-2)


def test_a_kb_of_an_older_format_is_refused_with_the_rebuild_command(tmp_path):
  kb.write_small_kb(str(tmp_path / 'kb'), _homonym_entities())
  meta = json.loads((tmp_path / 'kb' / 'kb.json').read_text())
  assert meta['format_version'] == kb.FORMAT_VERSION == 3
  (tmp_path / 'kb' / 'kb.json').write_text(json.dumps(dict(meta, format_version=2)))
  with pytest.raises(kb.KBError, match='a KB of format 2, this code reads format 3.*'
                     'python -m data_prep.build_kb'):
    kb.KnowledgeBase.load(str(tmp_path / 'kb'))
  (tmp_path / 'kb' / 'kb.json').write_text(json.dumps(dict(meta, num_alias_keys=1)))
  with pytest.raises(kb.KBError, match='alias keys in the index but kb.json says 1'):
    kb.KnowledgeBase.load(str(tmp_path / 'kb'))


def test_linker_priors_over_a_truncated_index_equal_the_untruncated_ones():
  """The build keeps 8 of 40 'John Smith's (and 3 of 3 'Mary Jones's): the kept candidates'
  priors, and their order, are those of a KB that kept every item (the denominator sums all)."""
  from data_prep.i2e import link  # pylint: disable=import-outside-toplevel
  entities = [types.Entity(f'Q{(i * 37) % 101 + 1}', 'John Smith', f'person {i}', (), i % 5)
              for i in range(40)]
  entities += [types.Entity(f'Q{200 + i}', 'Mary Jones', '', (), i % 2) for i in range(3)]
  linkers = {k: link.EntityLinker(kb.KnowledgeBase.from_entities(
      entities, max_candidates_per_alias=k), max_candidates=32) for k in (0, 8)}
  reference = _brute_force_aliases(entities)
  for name, n_kept in (('John Smith', 8), ('Mary Jones', 3)):
    mention = types.Mention(0, len(name), name, 'kb')
    truncated, full = (linkers[k]._candidates(mention)   # pylint: disable=protected-access
                       for k in (8, 0))
    assert len(full) == min(32, len(reference[kb.normalize_alias(name)]))
    assert truncated == full[:n_kept]
    best, _ = _expected(reference[kb.normalize_alias(name)], n_kept)
    assert [e.id for e, _, _ in truncated] == [q for q, _, _ in best]
