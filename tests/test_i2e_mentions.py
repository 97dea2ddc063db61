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
  expected = [('k1', (M(11, 24, 'New York City', 'kb'), M(34, 37, 'nyc', 'kb'))),
              ('k3', (M(0, 5, 'AC/DC', 'kb'), M(14, 19, 'PARIS', 'kb'))),
              ('k5', (M(0, 14, 'GROSSE STRASSE', 'kb'), M(17, 29, 'große straße', 'kb'))),
              ('k7', (M(0, 7, 'The Who', 'kb'), M(14, 16, 'It', 'kb')))]
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


def phrase_matcher_spans(entities, texts):
  """The reference: spaCy's PhraseMatcher (attr='LOWER') over every surface form of the KB,
  each label and alias lower-cased as written and normalised: the matcher this stage used
  before the mapped index, which holds one Python pattern per alias."""
  from spacy.matcher import PhraseMatcher  # pylint: disable=import-outside-toplevel
  nlp = spacy.blank('en')
  matcher = PhraseMatcher(nlp.vocab, attr='LOWER')
  forms = set()
  for e in entities:
    for form in (e.label,) + e.aliases:
      forms.update((form.lower(), kb.normalize_alias(form)))
  matcher.add('kb', list(nlp.tokenizer.pipe(sorted(f for f in forms if f))))
  return [sorted((s.start_char, s.end_char) for s in matcher(doc, as_spans=True))
          for doc in nlp.tokenizer.pipe(texts)]


TRICKY = ['Skyline of New York City at dusk, nyc', 'new  york city', 'NEW YORK-CITY',
          'york york york', 'Große Straße / GROSSE STRASSE / grosse strasse', 'AC/DC, ac/dc.',
          '"Paris"(Paris)[PARIS]', 'Ada Lovelace-Ada lovelace', 'it it IT It', 'x X x.',
          'Londoner in London', '', '   ', 'New York City New York City', 'nyc\tNYC\nNyc']


@pytest.mark.parametrize('index_shards', [1, 3])
def test_trie_matcher_equals_phrase_matcher(tmp_path, index_shards):
  path = str(tmp_path / 'kb')
  kb.write_small_kb(path, ENTITIES, index_shards=index_shards)
  finder = mentions.MentionFinder(kb.KnowledgeBase.load(path))
  reference = phrase_matcher_spans(ENTITIES, TRICKY)
  assert sum(map(len, reference)) > 20
  assert [finder.alias_spans(t) for t in TRICKY] == reference


def test_trie_matcher_equals_phrase_matcher_on_the_demo_world(tmp_path):
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
  reference = phrase_matcher_spans(entities, texts)
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
