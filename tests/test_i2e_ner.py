"""data_prep/i2e/ner_train.py and data_prep/train_ner.py: weak labels from KB aliases, a spaCy
NER trained on them, and the gate it puts on the alias matcher, scored against the ground truth
of a caption world whose KB has common-word aliases (data_prep/demo_world/common_words.py)."""
import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import spacy
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from configs import i2e as i2e_config
from data_prep import train_ner
from data_prep.demo_world import common_words
from data_prep.i2e import kb as kb_lib
from data_prep.i2e import mentions, ner_train, types


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('ner_world')
  kb_lib.write_small_kb(str(root / 'kb'), common_words.kb_entities())
  return root


def _write_pairs(path, texts):
  read = i2e_config.get_config().read
  table = pa.table({read.parquet_image_column: [b'\xff\xd8 not decoded'] * len(texts),
                    read.parquet_caption_column[0]: texts})
  pq.write_table(table, path)


def test_weak_labels_follow_how_the_corpus_writes_each_form(world):
  kb = kb_lib.KnowledgeBase.load(str(world / 'kb'))
  texts = ['A red apple on a table', 'Fresh apple juice in Paris', 'the Apple store in Tokyo',
           'Apple pie with cream', 'Paris at night', 'fans of The Who in London',
           'Apple Store In Paris Today', 'apple pie']
  labelled, common = ner_train.weak_labels(texts, kb)
  assert common == {'apple'}     # 2 of 3 informative 'apple's are lower case; 'paris' 0 of 2
  spans = [(e.entities, e.missing) for e in labelled]
  assert spans == [
      ((), ()),                         # lower case, in a text with capitals: a word
      (((21, 26),), ()),                # 'paris' is not common
      (((4, 9), (19, 24)), ()),         # capitalised mid-text: the name
      ((), ((0, 5),)),                  # at the start, case tells nothing: missing
      (((0, 5),), ()),
      (((8, 15), (19, 25)), ()),
      (((15, 20),), ((0, 5),)),         # Title Case: a common form is missing
      ((), ((0, 5),))]                  # all lower case: missing
  variants = ner_train.case_variants(labelled)
  assert [v.text for v in variants] == ['The Apple store in Tokyo', 'Fans of The Who in London']
  assert [v.entities for v in variants] == [spans[2][0], spans[5][0]]


def test_trained_ner_gate_cuts_false_mentions(world, tmp_path, capsys):
  texts = [c.text for c in common_words.captions(2000, seed=0)]
  _write_pairs(str(tmp_path / 'a.parquet'), texts[:1000])
  _write_pairs(str(tmp_path / 'b.parquet'), texts[1000:])
  out = str(tmp_path / 'ner')
  train_ner.main(['--pairs', str(tmp_path / '*.parquet'), '--kb', str(world / 'kb'),
                  '--out', out, '--epochs', '6'])
  assert 'NER trained on 2000 alt-texts' in capsys.readouterr().out
  nlp = spacy.load(out)
  assert nlp.meta['i2e_weak_labels']['texts'] == 2000

  kb = kb_lib.KnowledgeBase.load(str(world / 'kb'))
  held_out = common_words.captions(1000, seed=1)
  alias = common_words.score(mentions.MentionFinder(kb, case_rules=False), held_out)
  rules = common_words.score(mentions.MentionFinder(kb), held_out)
  gate = common_words.score(mentions.MentionFinder(kb, nlp, ner_gate=True), held_out)
  # Every alias hit: the common words are all found. The case rules drop lower-case ones;
  # the gate drops most of them and keeps the names.
  assert alias['false_per_100'] > 25 and alias['recall'] > 0.97
  assert rules['false_per_100'] < 0.8 * alias['false_per_100']
  assert gate['false_per_100'] < 0.6 * alias['false_per_100']
  assert gate['recall'] > 0.9

  # The Beam stage loads the folder by path and gives the same mentions.
  pairs = [types.Pair(f'k{i}', b'', c.text) for i, c in enumerate(held_out[:40])]
  finder = mentions.MentionFinder(kb, nlp, ner_gate=True)
  expected = [(p.key, m) for p, m in zip(pairs, finder.find([p.text for p in pairs])) if m]
  with TestPipeline() as p:
    found = (p | beam.Create(pairs)
             | mentions.FindMentions(str(world / 'kb'), ner_model=out, ner_gate=True))
    assert_that(found['main'] | beam.Map(lambda m: (m.pair.key, m.mentions)),
                equal_to(expected))


def test_train_ner_clear_errors(world, tmp_path):
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('good data')
  with pytest.raises(SystemExit, match='--out .*not empty'):
    train_ner.main(['--pairs', str(tmp_path / '*.parquet'), '--kb', str(world / 'kb'),
                    '--out', str(tmp_path / 'out')])
  assert (tmp_path / 'out' / 'keep.txt').read_text() == 'good data'
  with pytest.raises(SystemExit, match="--pairs .*nothing.parquet' matched no file"):
    train_ner.main(['--pairs', str(tmp_path / 'nothing.parquet'), '--kb', str(world / 'kb'),
                    '--out', str(tmp_path / 'new')])
  with pytest.raises(SystemExit, match='kb.json'):
    train_ner.main(['--pairs', str(tmp_path / '*.parquet'), '--kb', str(tmp_path / 'nokb'),
                    '--out', str(tmp_path / 'new')])
  _write_pairs(str(tmp_path / 'few.parquet'), ['a cat on a mat'] * 30)
  with pytest.raises(SystemExit, match='no alt-text holds a KB alias'):
    train_ner.main(['--pairs', str(tmp_path / 'few.parquet'), '--kb', str(world / 'kb'),
                    '--out', str(tmp_path / 'new')])
  assert not os.path.exists(tmp_path / 'new')
