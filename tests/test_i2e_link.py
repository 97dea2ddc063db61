"""Stage d, LinkEntities (data_prep/i2e/link.py): scores computed by hand from the docstring."""
import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from data_prep.i2e import kb
from data_prep.i2e import link
from data_prep.i2e import types

IN_MEMORY = ['--runner=DirectRunner', '--direct_running_mode=in_memory', '--direct_num_workers=1']
M = types.Mention

ENTITIES = [
    types.Entity('Q90', 'Paris', 'capital of France', (), 99),
    types.Entity('Q47899', 'Paris Hilton', 'American media personality', ('Paris',), 49),
    types.Entity('Q35694', 'Jaguar', 'large cat species of the Americas', (), 9),
    types.Entity('Q30055', 'Jaguar', 'British car brand', (), 9),
    types.Entity('Q3783', 'Amazon rainforest', 'tropical rainforest of the Americas', (), 19),
    types.Entity('Q7700001', 'Evening Glow', 'painting', ('Dusk',), 0),
]
JAGUAR_TEXT = (M(0, 6, 'Jaguar', 'kb'), M(14, 31, 'Amazon rainforest', 'kb'))

# Default weights 0.3 / 0.4 / 0.3, nil_sitelinks 10; match counted from 0.72, so the sums of
# weights are 0.3 + 0.4 * 0.28 = 0.412 without coherence and 0.712 with it.
# 'Paris' alone (no coherence): Q90 prior 100/(150 + 10), label match 1.0; Q47899 prior
# 50/160, alias 0.8.
PARIS_Q90 = (0.3 * 100 / 160 + 0.4 * 0.28) / 0.412        # 0.727
PARIS_HILTON = (0.3 * 50 / 160 + 0.4 * 0.08) / 0.412      # 0.305
# 'Jaguar' + 'Amazon rainforest'. Words: jaguar/large/cat/species/americas,
# jaguar/british/car/brand, amazon/rainforest/tropical/americas: J(animal, forest) = 1/8, J(car,
# forest) = 0. Priors tie (10/30 each), both exact labels.
JAGUAR_ANIMAL = (0.3 * 10 / 30 + 0.4 * 0.28 + 0.3 * (1 / 8)) / 0.712   # 0.350
JAGUAR_CAR = (0.3 * 10 / 30 + 0.4 * 0.28 + 0.3 * 0.0) / 0.712         # 0.298
FOREST = (0.3 * 20 / 30 + 0.4 * 0.28 + 0.3 * (1 / 8)) / 0.712         # 0.491


@pytest.fixture(scope='module')
def kb_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kb') / 'kb')
  kb.write_small_kb(path, ENTITIES)
  return path


@pytest.fixture(scope='module')
def knowledge_base(kb_dir):
  return kb.KnowledgeBase.load(kb_dir)


def _scores(candidates):
  return [(c.entity_id, c.mention, pytest.approx(c.link_score, abs=1e-9)) for c in candidates]


def _all_scores(linker, mentions):
  return [(m, [(e.id, pytest.approx(s, abs=1e-9)) for e, s in scored])
          for m, scored in linker.score(mentions)]


def test_ambiguous_alias_resolved_by_popularity_prior(knowledge_base):
  linker = link.EntityLinker(knowledge_base, min_score=0.0)
  paris = M(0, 5, 'Paris', 'kb')
  assert _all_scores(linker, (paris,)) == [(paris, [('Q90', PARIS_Q90),
                                                    ('Q47899', PARIS_HILTON)])]
  # Top-k (default 3): both senses go on to CLIP, best first; top_k=1 is the text-only linker.
  assert _scores(linker.link((paris,))) == [('Q90', paris, PARIS_Q90),
                                            ('Q47899', paris, PARIS_HILTON)]
  assert _scores(link.EntityLinker(knowledge_base, min_score=0.0, top_k=1).link((paris,))) == [
      ('Q90', paris, PARIS_Q90)]
  # Upper case matches only after case folding: match quality x 0.9.
  upper = M(0, 5, 'PARIS', 'kb')
  assert _all_scores(linker, (upper,)) == [(upper, [
      ('Q90', (0.3 * 100 / 160 + 0.4 * (0.9 - 0.72)) / 0.412),
      ('Q47899', (0.3 * 50 / 160 + 0.4 * 0.0) / 0.412)])]


def test_tied_priors_resolved_by_coherence(knowledge_base):
  linker = link.EntityLinker(knowledge_base, min_score=0.0)
  assert _all_scores(linker, JAGUAR_TEXT) == [
      (JAGUAR_TEXT[0], [('Q30055', JAGUAR_CAR), ('Q35694', JAGUAR_ANIMAL)]),
      (JAGUAR_TEXT[1], [('Q3783', FOREST)])]
  # Grouped by mention, the mentions by their best score; within a mention best first.
  assert _scores(linker.link(JAGUAR_TEXT)) == [('Q3783', JAGUAR_TEXT[1], FOREST),
                                               ('Q35694', JAGUAR_TEXT[0], JAGUAR_ANIMAL),
                                               ('Q30055', JAGUAR_TEXT[0], JAGUAR_CAR)]
  # Without coherence the priors and matches tie; the tie goes to the smaller Q-number, the car.
  no_coherence = link.EntityLinker(knowledge_base, coherence_weight=0.0, min_score=0.0,
                                   top_k=1)
  assert [c.entity_id for c in no_coherence.link(JAGUAR_TEXT)] == ['Q3783', 'Q30055']


def test_min_score_top_k_and_repeated_mentions(knowledge_base):
  # min_score judges a mention by its best candidate; a kept mention keeps its weaker senses
  # (the car's 0.298 < 0.3) for CLIP to choose among.
  assert [c.entity_id for c in link.EntityLinker(knowledge_base, min_score=0.3).link(
      JAGUAR_TEXT)] == ['Q3783', 'Q35694', 'Q30055']  # 0.3 <= 0.350, the animal
  assert [c.entity_id for c in link.EntityLinker(knowledge_base, min_score=0.4).link(
      JAGUAR_TEXT)] == ['Q3783']                     # 0.350 < 0.4 <= 0.491
  assert link.EntityLinker(knowledge_base, min_score=0.5).link(JAGUAR_TEXT) == ()
  # The same text twice: linked once (the first mention); no coherence between mentions of
  # the same text.
  twice = (M(0, 5, 'Paris', 'kb'), M(7, 12, 'Paris', 'kb'))
  assert _scores(link.EntityLinker(knowledge_base, top_k=1).link(twice)) == [
      ('Q90', twice[0], PARIS_Q90)]


def test_nil_mass_rejects_an_obscure_unambiguous_name(knowledge_base):
  """'DUSK' names one item, with no sitelink, through an alias matched after case folding
  (match 0.72, the floor): the prior is 1/(1 + 10), the score (0.3 / 11) / 0.412 = 0.066, under
  the default min_score (0.1). Without the nil mass the prior is 1 and nothing could reject it:
  0.3 / 0.412 = 0.728."""
  dusk = (M(0, 4, 'DUSK', 'kb'),)
  default = link.EntityLinker(knowledge_base)
  assert _all_scores(default, dusk) == [(dusk[0], [('Q7700001', (0.3 / 11) / 0.412)])]
  assert default.link(dusk) == ()
  assert _scores(link.EntityLinker(knowledge_base, nil_sitelinks=0).link(dusk)) == [
      ('Q7700001', dusk[0], 0.3 / 0.412)]


def test_link_stage_routes_pairs(kb_dir):
  def mp(key, *ms):
    return types.MentionedPair(types.Pair(key, b'x', 'text', 's'), tuple(ms))
  pairs = [mp('k1', *JAGUAR_TEXT), mp('k2', M(0, 4, 'Lyon', 'ner:GPE')),   # not in the KB
           mp('k3', M(0, 5, 'Paris', 'kb'))]
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(pairs) | link.LinkEntities(kb_dir, min_score=0.3, top_k=2)
    assert_that(out['main'] | 'Main' >> beam.Map(
        lambda lp: (lp.pair.key, [(c.entity_id, round(c.link_score, 6)) for c in lp.candidates])),
                equal_to([('k1', [('Q3783', round(FOREST, 6)),
                                  ('Q35694', round(JAGUAR_ANIMAL, 6)),
                                  ('Q30055', round(JAGUAR_CAR, 6))]),   # 0.298: a weaker sense
                          ('k3', [('Q90', round(PARIS_Q90, 6)),
                                  ('Q47899', round(PARIS_HILTON, 6))])]), label='main')
    assert_that(out['filtered'] | 'F' >> beam.Map(lambda f: (f.stage, f.reason, f.key)),
                equal_to([('link', 'no_candidate', 'k2')]), label='filtered')
    assert_that(out['dead_letter'], equal_to([]), label='dead')


def test_bad_settings_are_clear_errors(kb_dir):
  with pytest.raises(ValueError, match='min_score must be in'):
    link.LinkEntities(kb_dir, min_score=1.5)
  with pytest.raises(ValueError, match='weights must be >= 0'):
    link.LinkEntities(kb_dir, prior_weight=-1.0)
  with pytest.raises(ValueError, match='nil_sitelinks must be >= 0'):
    link.LinkEntities(kb_dir, nil_sitelinks=-1)
  with pytest.raises(ValueError, match='top_k must be >= 1'):
    link.LinkEntities(kb_dir, top_k=0)


def test_a_homonym_shared_by_thousands_decodes_only_the_kept_candidates(tmp_path, monkeypatch):
  """'John Smith' names thousands of items: the alias index's sitelinks order them and sum the
  prior's total; only max_candidates entities are decoded, and the priors equal the
  docstring's formula over all of them."""
  entities = [types.Entity(f'Q{i}', 'John Smith', f'person {i}', (), (i * 7919) % 1000)
              for i in range(1, 2001)]
  kb.write_small_kb(str(tmp_path / 'kb'), entities)
  loaded = kb.KnowledgeBase.load(str(tmp_path / 'kb'))
  decoded = []
  real_entity = loaded.entity
  monkeypatch.setattr(loaded, 'entity', lambda q: decoded.append(q) or real_entity(q))
  linker = link.EntityLinker(loaded, max_candidates=32, top_k=3, min_score=0.0)
  (_, scored), = linker.score((M(0, 10, 'John Smith', 'kb'),))
  assert len(decoded) == 32
  total = sum(e.sitelinks + 1 for e in entities)
  best = sorted(entities, key=lambda e: (-e.sitelinks, int(e.id[1:])))[:32]
  assert [e.id for e, _ in scored] == [e.id for e in best]
  assert [s for _, s in scored] == pytest.approx(
      [(0.3 * (e.sitelinks + 1) / (total + 10) + 0.4 * 0.28) / 0.412 for e in best], abs=1e-12)
