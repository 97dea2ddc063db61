"""Stage e, SelectWithClip (data_prep/i2e/select.py): CLIP scores through RunInference."""
import hashlib
import io
import json
import os

import apache_beam as beam
import jax
import ml_collections
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from data_prep.i2e import kb
from data_prep.i2e import select
from data_prep.i2e import types

IN_MEMORY = ['--runner=DirectRunner', '--direct_running_mode=in_memory', '--direct_num_workers=1']

ENTITIES = [types.Entity('Q1', 'Apple', 'red fruit', (), 10),
            types.Entity('Q2', 'Lime', 'green fruit', (), 10),
            types.Entity('Q3', 'Banana', 'yellow fruit', (), 10),
            types.Entity('Q4', 'Sky', 'blue', (), 10)]
# The fake encoder's text embeddings of '{name}, {description}'.
TEXT_VECTORS = {'Apple, red fruit': [0.6, 0.8, 0.0], 'Lime, green fruit': [0.0, 1.0, 0.0],
                'Banana, yellow fruit': [0.8, 0.6, 0.0], 'Sky, blue': [0.0, 0.0, 1.0]}
RED, GREEN, YELLOW = (255, 0, 0), (0, 255, 0), (255, 255, 0)

# Calls seen by the fake model, in this process (the in-memory runner runs here).
LOADS, IMAGE_BATCHES, TEXTS_EMBEDDED = [], [], []


def png(color, size=(6, 4)):
  buf = io.BytesIO()
  Image.new('RGB', size, color).save(buf, format='PNG')
  return buf.getvalue()


class FakeEncoder:
  """Image embedding = mean RGB in [0, 1]; text embedding from TEXT_VECTORS (not normalised:
  the stage normalises). Same methods as inference.Encoder."""
  has_text = True
  source = 'fake'

  def preprocess(self, images):
    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert('RGB'), np.float32)
                     .mean((0, 1)) / 255 for b in images])

  def embed_images(self, x, batch_size=256):
    assert len(x) % batch_size == 0, 'towers must always see whole fixed-size batches'
    IMAGE_BATCHES.append(int((np.abs(x).sum(1) > 0).sum()))   # real (non-padding) rows
    return np.asarray(x)

  def embed_texts(self, texts, batch_size=1024):
    assert len(texts) % batch_size == 0, 'towers must always see whole fixed-size batches'
    TEXTS_EMBEDDED.extend(t for t in texts if t)   # '' pads a batch to a fixed size
    return np.array([TEXT_VECTORS[t] if t else [0.0, 0.0, 0.0] for t in texts], np.float32) * 2


class FakeLoader:
  def __call__(self):
    LOADS.append(os.getpid())
    return FakeEncoder()


@pytest.fixture(scope='module')
def kb_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kb') / 'kb')
  kb.write_small_kb(path, ENTITIES)
  return path


def linked(key, image, *qids):
  """Each candidate its own mention: CLIP keeps or drops each, there is nothing to choose."""
  return types.LinkedPair(types.Pair(key, image, f'text {key}', 'shard0'), tuple(
      types.Candidate(q, types.Mention(i, i + 1, f'x{i}', 'kb'), 0.5)
      for i, q in enumerate(qids)))


def ambiguous(key, image, *mentions):
  """mentions: (text, [(qid, link score), ...] best first): one mention, several senses."""
  out = []
  for i, (text, cands) in enumerate(mentions):
    m = types.Mention(10 * i, 10 * i + len(text), text, 'kb')
    out += [types.Candidate(q, m, score) for q, score in cands]
  return types.LinkedPair(types.Pair(key, image, f'text {key}', 'shard0'), tuple(out))


PAIRS = [linked('p1', png(RED), 'Q1', 'Q3', 'Q4'),
         linked('p2', png(YELLOW), 'Q2', 'Q4'),
         linked('p3', png(GREEN), 'Q4'),
         linked('p4', b'not an image', 'Q1'),
         linked('p5', png(GREEN, (3, 9)), 'Q1', 'Q2'),
         linked('p6', png(RED), 'Q999'),
         linked('p7', png(RED), 'Q1')]


def numpy_reference(threshold, top_k):
  """key -> (ids, scores) by a plain cosine over the colours and TEXT_VECTORS."""
  colours = {'p1': RED, 'p2': YELLOW, 'p3': GREEN, 'p5': GREEN, 'p7': RED}
  texts = {e.id: f'{e.label}, {e.description}' for e in ENTITIES}
  out = {}
  for lp in PAIRS:
    if lp.pair.key not in colours:
      continue
    img = np.array(colours[lp.pair.key], np.float64)
    ranked = []
    for c in lp.candidates:
      txt = np.array(TEXT_VECTORS[texts[c.entity_id]])
      ranked.append((img @ txt / np.linalg.norm(img) / np.linalg.norm(txt), c.entity_id))
    ranked = sorted([r for r in ranked if r[0] >= threshold], key=lambda r: (-r[0], r[1]))
    ranked = ranked[:top_k] if top_k else ranked
    if ranked:
      out[lp.pair.key] = (tuple(e for _, e in ranked), tuple(s for s, _ in ranked))
  return out


def _close_to(want):
  """A Beam matcher: SelectedPairs equal `want` {key: (ids, scores)}, scores to 2e-5."""
  def check(actual):
    got = {s.pair.key: (s.entity_ids, s.scores) for s in actual}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key, (ids, scores) in want.items():
      assert got[key][0] == ids, (key, got[key], ids)
      np.testing.assert_allclose(got[key][1], scores, rtol=0, atol=2e-5, err_msg=key)
  return check


def _run_select(kb_dir, threshold, top_k, want, want_filtered, batch_size=2):
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(PAIRS) | select.SelectWithClip(
        None, kb_dir, threshold=threshold, top_k=top_k, batch_size=batch_size,
        reference_images=0, loader=FakeLoader())
    assert_that(out['main'], _close_to(want), label='main')
    assert_that(out['main'], _close_to(numpy_reference(threshold, top_k)), label='reference')
    assert_that(out['filtered'] | 'F' >> beam.Map(lambda f: (f.stage, f.reason, f.key)),
                equal_to(want_filtered), label='filtered')
    assert_that(out['dead_letter'] | 'D' >> beam.Map(lambda d: (d.stage, d.reason, d.key)),
                equal_to([('select', 'undecodable_image', 'p4'),
                          ('select', 'unknown_entity', 'p6')]), label='dead')


def test_kept_entities_and_scores_equal_numpy_cosine(kb_dir):
  del LOADS[:], IMAGE_BATCHES[:], TEXTS_EMBEDDED[:]
  # By hand: red.(0.6,0.8)=0.6, red.(0.8,0.6)=0.8, yellow.(0,1)=0.7071, green.(0,1)=1, ...
  want = {'p1': (('Q3', 'Q1'), (0.8, 0.6)), 'p2': (('Q2',), (2 ** -0.5,)),
          'p5': (('Q2', 'Q1'), (1.0, 0.8)), 'p7': (('Q1',), (0.6,))}
  _run_select(kb_dir, 0.5, 0, want, [('select', 'below_threshold', 'p3')])
  # One model load for the whole run; batches of at most batch_size=2 images; every entity
  # text embedded once (the per-worker cache), though Q1 is in three pairs.
  assert len(LOADS) == 1
  assert sum(IMAGE_BATCHES) == 5 and max(IMAGE_BATCHES) <= 2 and len(IMAGE_BATCHES) >= 3
  assert sorted(TEXTS_EMBEDDED) == sorted(TEXT_VECTORS)


def test_threshold_and_top_k(kb_dir):
  want = {'p1': (('Q3',), (0.8,)), 'p2': (('Q2',), (2 ** -0.5,)), 'p5': (('Q2',), (1.0,))}
  _run_select(kb_dir, 0.65, 1, want, [('select', 'below_threshold', 'p3'),
                                      ('select', 'below_threshold', 'p7')], batch_size=3)


def test_keep_entities_order_and_ties():
  choices = [types.MentionChoice('a', ('Q2', 'Q1'), (0.9, 0.8), (0.5, 0.5), 0),
             types.MentionChoice('b', ('Q1',), (0.7,), (0.5,), 0),
             types.MentionChoice('c', ('Q3',), (0.9,), (0.1,), -1)]
  assert select.keep_entities(choices, 0) == (('Q1', 'Q2'), (0.5, 0.5))
  assert select.keep_entities(choices, 1) == (('Q1',), (0.5,))
  assert select.keep_entities(choices[2:], 0) == ((), ())


FRUIT = [('Q1', 0.9), ('Q3', 0.6), ('Q2', 0.5)]   # 'Fruit': Apple, Banana or Lime
SENSES = [ambiguous('s1', png(GREEN), ('Fruit', FRUIT)),
          ambiguous('s2', png(RED), ('Fruit', FRUIT)),
          ambiguous('s3', png(YELLOW), ('Fruit', FRUIT[:1] + FRUIT[2:]), ('Sky', [('Q4', 0.8)])),
          ambiguous('s4', png((0, 0, 255)), ('Fruit', FRUIT))]


def choice_reference(lp, threshold, link_weight):
  """[(mention, ids, link, clip, chosen)] in float64 from the docstring's formula."""
  colours = {'s1': GREEN, 's2': RED, 's3': YELLOW, 's4': (0, 0, 255)}
  img = np.array(colours[lp.pair.key], np.float64)
  texts = {e.id: TEXT_VECTORS[f'{e.label}, {e.description}'] for e in ENTITIES}
  out = []
  for mention in dict.fromkeys(c.mention for c in lp.candidates):
    cands = [c for c in lp.candidates if c.mention == mention]
    clip = [img @ texts[c.entity_id] / np.linalg.norm(img) / np.linalg.norm(texts[c.entity_id])
            for c in cands]
    total = [x + link_weight * c.link_score for x, c in zip(clip, cands)]
    best = int(np.argmax(total))   # first of the maxima: the better-linked one
    out.append((mention.text, [c.entity_id for c in cands], [c.link_score for c in cands],
                clip, best if clip[best] >= threshold else -1))
  return out


@pytest.mark.parametrize('link_weight, want_chosen', [
    (0.0, {'s1': 'Q2', 's2': 'Q3', 's3': 'Q1'}),    # CLIP alone: Lime, Banana, Apple
    (0.1, {'s1': 'Q2', 's2': 'Q3', 's3': 'Q1'}),
    (1.0, {'s1': 'Q1', 's2': 'Q1', 's3': 'Q1'})])   # the link score dominates: Apple
def test_clip_chooses_the_sense_the_image_shows(kb_dir, link_weight, want_chosen):
  def check(actual):
    got = {s.pair.key: s for s in actual}
    assert sorted(got) == ['s1', 's2', 's3'], sorted(got)   # s4 (blue): no fruit passes 0.5
    for key, sp in got.items():
      ref = choice_reference(next(lp for lp in SENSES if lp.pair.key == key), 0.5, link_weight)
      assert [(c.mention, list(c.entity_ids), list(c.link_scores), c.chosen)
              for c in sp.choices] == [r[:3] + (r[4],) for r in ref]
      for c, r in zip(sp.choices, ref):
        np.testing.assert_allclose(c.clip_scores, r[3], atol=2e-5, err_msg=key)
      assert sp.entity_ids[-1 if key == 's3' else 0] == want_chosen[key]
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(SENSES) | select.SelectWithClip(
        None, kb_dir, threshold=0.5, link_weight=link_weight, reference_images=0,
        loader=FakeLoader())
    assert_that(out['main'], check, label='main')
    assert_that(out['filtered'] | 'F' >> beam.Map(lambda f: f.key), equal_to(['s4']),
                label='filtered')


def test_text_bias_from_the_reference_images(kb_dir):
  """c = cosine - mean cosine of the text with the 2 pairs of smallest sha256(key)."""
  colours = {'s1': GREEN, 's2': RED, 's3': YELLOW, 's4': (0, 0, 255)}
  ref_keys = sorted(colours, key=lambda k: hashlib.sha256(k.encode()).digest())[:2]
  unit = lambda v: np.asarray(v, np.float64) / np.linalg.norm(v)
  reference = np.stack([unit(colours[k]) for k in ref_keys])
  texts = {e.id: unit(TEXT_VECTORS[f'{e.label}, {e.description}']) for e in ENTITIES}

  def check(actual):
    got = {s.pair.key: s for s in actual}
    assert got, 'nothing kept'
    for key, sp in got.items():
      for choice in sp.choices:
        bias = [float((reference @ texts[e]).mean()) for e in choice.entity_ids]
        cos = [float(unit(colours[key]) @ texts[e]) for e in choice.entity_ids]
        np.testing.assert_allclose(choice.text_bias, bias, atol=2e-5, err_msg=key)
        np.testing.assert_allclose(choice.clip_scores, np.subtract(cos, bias), atol=2e-5)
        best = int(np.argmax(np.subtract(cos, bias)))
        assert choice.chosen == (best if cos[best] - bias[best] >= 0.1 else -1), (key, choice)
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(SENSES) | select.SelectWithClip(
        None, kb_dir, threshold=0.1, link_weight=0.0, reference_images=2, loader=FakeLoader())
    assert_that(out['main'], check, label='main')


def test_resolve_clip_and_clear_errors(tmp_path, kb_dir):
  work, hf = tmp_path / 'run', tmp_path / 'hf'
  work.mkdir()
  hf.mkdir()
  (work / 'config.json').write_text(json.dumps({'model': {}, 'input': {}}))
  (hf / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
  assert select.resolve_clip(str(work)) == {'workdir': str(work)}
  assert select.resolve_clip(str(hf)) == {'hf_clip': str(hf)}
  assert select.resolve_clip({'workdir': '', 'hf_clip': str(hf)}) == {'hf_clip': str(hf)}
  with pytest.raises(ValueError, match='exactly one of workdir / hf_clip'):
    select.resolve_clip({'workdir': str(work), 'hf_clip': str(hf)})
  with pytest.raises(ValueError, match=r'nowhere/config.json not found'):
    select.SelectWithClip(str(tmp_path / 'nowhere'), kb_dir)
  with pytest.raises(ValueError, match='may only use'):
    select.SelectWithClip(str(work), kb_dir, template='{label}')
  with pytest.raises(ValueError, match='link_weight >= 0'):
    select.SelectWithClip(str(work), kb_dir, link_weight=-0.1)


# ----------------------------------------------------------------------------- a real checkpoint


@pytest.fixture(scope='module')
def clip_workdir(tmp_path_factory):
  """A tiny contrastive run with random weights, saved like train.py saves it."""
  # pylint: disable=g-import-not-at-top
  from mofi_jax import checkpointing, inference, sharding, trainer
  from mofi_jax.data import schema, tokenizer as tokenizer_lib
  from test_trainer import small_config
  root = tmp_path_factory.mktemp('clip')
  tok = tokenizer_lib.train_bpe([t for t in TEXT_VECTORS] * 3, 300)
  tok.save(str(root / schema.TOKENIZER_FILE))
  c = small_config('contrastive')
  c.input.update(image_size=16, text_len=8)
  c.model.image.update(depth=1, patch=8)
  c.model.text.update(vocab_size=tok.get_vocab_size(), context=8)
  mesh = sharding.make_mesh(c.mesh)
  sharding.activate(mesh)
  setup = trainer.build(c, mesh)
  rng = np.random.default_rng(0)   # random values straight into the state's shapes: no init compile
  state = jax.tree.map(
      lambda a, sh: jax.device_put((rng.normal(size=a.shape) * 0.1).astype(a.dtype), sh),
      setup.abstract, setup.shardings)
  ckpt = checkpointing.Checkpointer(str(root / 'run'), ml_collections.ConfigDict(
      dict(every_steps=1, keep=1, async_save=False)))

  class _NoInput:
    def save(self, path):
      del path
  ckpt.save(1, state, {}, _NoInput(), force=True)
  ckpt.close()
  inference.write_config(str(root / 'run'), c, data_dir=str(root))
  jax.set_mesh(None)
  return str(root / 'run')


def test_workdir_checkpoint_scores_equal_encoder_reference(kb_dir, clip_workdir):
  from mofi_jax import inference  # pylint: disable=g-import-not-at-top
  pairs = [linked('a', png(RED, (40, 24)), 'Q1', 'Q2', 'Q3'),
           linked('b', png((20, 90, 200), (24, 24)), 'Q4', 'Q1'),
           linked('c', png(YELLOW, (16, 50)), 'Q2')]
  enc = inference.load(clip_workdir)
  texts = {e.id: f'{e.label}, {e.description}' for e in ENTITIES}
  want = {}
  for lp in pairs:   # one image, one text at a time: no batching in the reference
    img = enc.embed_images(enc.preprocess([lp.pair.image]))[0]
    ref = {c.entity_id: float(img @ enc.embed_texts([texts[c.entity_id]])[0])
           for c in lp.candidates}
    order = sorted(ref, key=lambda q: (-ref[q], q))
    want[lp.pair.key] = (tuple(order), tuple(ref[q] for q in order))
  assert len({s for _, scores in want.values() for s in scores}) == 6   # not degenerate
  with test_pipeline.TestPipeline(options=PipelineOptions(IN_MEMORY)) as p:
    out = p | beam.Create(pairs) | select.SelectWithClip(
        {'workdir': clip_workdir}, kb_dir, threshold=-1.0, top_k=0, batch_size=2,
        reference_images=0)
    assert_that(out['main'], _close_to(want), label='main')
