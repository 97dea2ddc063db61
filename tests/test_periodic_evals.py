"""In-training evals: the demo config's evaluators on its held-out folder, the towers built
from jitted embed functions, and their scalars in TensorBoard and eval_results.jsonl."""
import glob
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from clu import metric_writers

from configs import demo
from mofi_jax import periodic_evals, run_setup
from mofi_jax.data import preprocess, schema
from mofi_jax.data import tokenizer as tokenizer_lib


def demo_evals(mode='multitask'):
  """The demo config's evals, as train.py resolves them."""
  c = demo.get_config(mode)
  c.input.image_size = 16
  return c


class RecordingWriter:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


def pixel_towers(corpus):
  """Stand-in towers that make every demo eval decidable: an image is its mean colour and a
  held-out category's description ('a red star on a dark background') is the colour it
  names, so zero-shot, kNN and the probe all see the colour signal."""
  with open(os.path.join(corpus, 'retrieval', 'categories.json')) as f:
    colour_of = {e['description']: e['color'] for e in json.load(f)}
  from data_prep.demo_world import world  # pylint: disable=g-import-not-at-top
  rgb = {name: (np.array(v) / 255.0 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
         for name, v in world.COLORS.items()}
  from mofi_jax.evals import embedding  # pylint: disable=g-import-not-at-top
  return embedding.Towers(
      embed_images=lambda batch: batch.mean(axis=(1, 2)),
      embed_texts=lambda texts: np.stack([rgb[colour_of[t]] for t in texts]))


def numpy_colour_features(corpus, size=16):
  """(L2-normalised mean colours [N, 3] of the held-out images in official order, their
  categories, each category's colour vector): pixel_towers' numbers, computed here."""
  from data_prep.demo_world import world  # pylint: disable=g-import-not-at-top
  from mofi_jax.data import eval_transform  # pylint: disable=g-import-not-at-top
  folder = os.path.join(corpus, 'retrieval')
  files = sorted(glob.glob(os.path.join(folder, '*.jpg')),
                 key=lambda p: (int(os.path.basename(p).split('_')[0]), os.path.basename(p)))
  transform = eval_transform.EvalTransform(size)
  rows = []
  for path in files:
    with open(path, 'rb') as f:
      rows.append(transform(tf.constant(f.read())).numpy().astype(np.float64).mean(axis=(0, 1)))
  features = np.stack(rows)
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  with open(os.path.join(folder, 'categories.json')) as f:
    colours = [e['color'] for e in json.load(f)]
  texts = [(np.array(world.COLORS[c]) / 255.0 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
           for c in colours]
  categories = np.array([int(os.path.basename(p).split('_')[0]) for p in files])
  return features, categories, texts


def test_demo_evals_build_and_report_to_tensorboard(tiny_corpus, tmp_path):
  evaluators = periodic_evals.from_config(demo_evals(), data_dir=tiny_corpus,
                                          workdir=str(tmp_path))
  assert {n: (type(e).__module__.split('.')[-1], every) for n, (e, every) in evaluators.items()} == {
      'retrieval': ('gpr1200', 350), 'zeroshot': ('zeroshot', 350), 'knn': ('knn', 350),
      'linear_probe': ('linear_probe', 350)}
  assert periodic_evals.due(evaluators, 350) == list(evaluators)
  assert periodic_evals.due(evaluators, 351) == []
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  periodic_evals.run(evaluators, list(evaluators), 350, pixel_towers(tiny_corpus), writer,
                     str(tmp_path))
  writer.flush()
  # TensorBoard: every eval's scalars under '<eval name>/<metric>' at the step.
  logged = {}
  for path in glob.glob(str(tmp_path / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        logged[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
  for tag in ('retrieval/map', 'zeroshot/top1', 'knn/top1', 'linear_probe/top1',
              'linear_probe/log10_l2'):
    assert (350, tag) in logged, sorted(logged)
  # The values themselves, computed independently in NumPy from the same towers: zero-shot
  # as the cosine argmax against each category's colour, retrieval as GPR1200's mAP.
  features, categories, texts = numpy_colour_features(tiny_corpus)
  classes = np.stack([t / np.linalg.norm(t) for t in texts])
  zeroshot_top1 = np.mean(np.argmax(features @ classes.T, axis=1) == categories)
  assert logged[(350, 'zeroshot/top1')] == pytest.approx(zeroshot_top1, abs=1e-6)
  assert zeroshot_top1 >= 0.4   # colour separates most categories: a check with teeth
  from mofi_jax.evals import gpr1200  # pylint: disable=import-outside-toplevel
  expected_map = gpr1200.mean_average_precision(features.astype(np.float64), categories)['all']
  assert logged[(350, 'retrieval/map')] == pytest.approx(expected_map, abs=1e-5)
  with open(tmp_path / 'eval_results.jsonl') as f:
    lines = [json.loads(line) for line in f]
  assert [(r['step'], r['eval']) for r in lines] == [(350, n) for n in evaluators]
  by_eval = {r['eval']: r for r in lines}
  assert by_eval['zeroshot']['top1'] == pytest.approx(logged[(350, 'zeroshot/top1')])
  assert by_eval['retrieval']['map'] == pytest.approx(logged[(350, 'retrieval/map')])


def test_towers_from_jitted_embed_fns_pad_and_tokenize(tiny_corpus):
  c = demo_evals()
  calls = []

  def embed_tokens(params, tokens):
    calls.append((params, tokens))
    return np.asarray(tokens[:, :3], np.float32)

  towers = periodic_evals.towers_factory(c, tiny_corpus, lambda p, x: x, embed_tokens,
                                         text_batch_size=4)('PARAMS')
  texts = ['a red star', 'a blue ring on a dark background', 'x', 'y', 'z']
  out = towers.embed_texts(texts)
  tok = tokenizer_lib.load_tokenizer(os.path.join(tiny_corpus, schema.TOKENIZER_FILE))
  expected = tokenizer_lib.tokenize(tok, texts, c.input.text_len)
  np.testing.assert_array_equal(out, expected[:, :3])
  assert [p for p, _ in calls] == ['PARAMS'] * 2 and [t.shape for _, t in calls] == [(4, 16)] * 2
  supervised = periodic_evals.towers_factory(demo_evals('supervised'), tiny_corpus,
                                             lambda p, x: x)('PARAMS')
  assert supervised.embed_texts is None


@pytest.mark.parametrize('change, message', [
    (lambda c: c.model.update(mode='supervised'),
     r'config.evals.zeroshot: zeroshot needs a text tower'),
    (lambda c: c.evals.knn.update(data_dir='{data_dir}/missing'),
     r'config.evals.knn: .*missing: image folder not found'),
    (lambda c: c.evals.knn.update(type='knm'), r"config.evals.knn: Unknown evaluator type 'knm'"),
    (lambda c: c.evals.zeroshot.update(dataset='imagenet3000'),
     r"config.evals.zeroshot: Unknown dataset 'imagenet3000'"),
])
def test_bad_eval_config_stops_at_start_naming_the_eval(tiny_corpus, tmp_path, change, message):
  c = demo_evals()
  change(c)
  with pytest.raises(run_setup.ConfigError, match=message):
    periodic_evals.from_config(c, data_dir=tiny_corpus, workdir=str(tmp_path))
  assert issubclass(run_setup.ConfigError, run_setup.USER_ERRORS)  # one line from train.py


def test_supervised_demo_has_no_zeroshot_eval():
  assert 'zeroshot' not in demo.get_config('supervised').evals
  assert ml_collections.ConfigDict(demo.get_config('contrastive').evals.zeroshot).type == 'zeroshot'
