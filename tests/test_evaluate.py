"""`python -m mofi_jax.evaluate`: JSON out and beside the checkpoint, clear one-line errors.

The checkpoint-based commands run on a tiny multitask model with random weights, saved the
way training saves it, over the tiny synthetic corpus (conftest.tiny_corpus); their numbers
are checked against independent computations with inference.Encoder and NumPy.
"""
import glob
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mofi_jax import checkpointing, evaluate, inference, run_setup, sharding, trainer
from mofi_jax.evals import gpr1200, image_folder, knn, results
from test_trainer import small_config

STEP = 3


class _NoInput:
  """Stands in for the tf.data iterator, whose position is not under test here."""

  def save(self, path):
    del path


def tiny_config(corpus):
  """test_trainer's small multitask config, sized for `corpus` (entities, vocabulary)."""
  c = small_config()
  c.model.head.num_classes = -1
  c.model.text.vocab_size = -1
  c = run_setup.resolve_from_corpus(c, corpus)
  c.input.data_dir = str(corpus)
  return c


def random_head(head, key=1):
  """The init's zero kernel would rank all entities equally: a random one instead."""
  kernel = jax.random.normal(jax.random.key(key), head['kernel'].shape)
  return dict(head, kernel=jax.device_put(kernel, head['kernel'].sharding))


def save_tiny_run(workdir, corpus):
  """A multitask model over `corpus` with random towers and a random head, saved at STEP
  the way training saves it."""
  c = tiny_config(corpus)
  mesh = sharding.make_mesh(c.mesh)
  sharding.activate(mesh)
  state = trainer.build(c, mesh).init(mesh, seed=0)
  params = dict(state.params, entity_head=random_head(state.params['entity_head']))
  ckpt = checkpointing.Checkpointer(workdir, ml_collections.ConfigDict(
      dict(every_steps=1, keep=1, async_save=False)))
  ckpt.save(STEP, state.replace(params=params), {}, _NoInput(), force=True)
  ckpt.close()
  inference.write_config(workdir, c, data_dir=str(corpus))
  jax.set_mesh(None)
  return workdir


@pytest.fixture(scope='module')
def tiny_run(tiny_corpus, tmp_path_factory):
  return save_tiny_run(str(tmp_path_factory.mktemp('eval_run')), tiny_corpus)


@pytest.fixture(scope='module')
def encoder(tiny_run):
  return inference.load(tiny_run)


@pytest.fixture(scope='module')
def heldout(tiny_corpus, encoder):
  """(folder, categories, class names, L2-normalised features) of the corpus's held-out set,
  embedded independently of the evaluators: files read in official order, Encoder.embed."""
  folder = os.path.join(tiny_corpus, 'retrieval')
  files = sorted(glob.glob(os.path.join(folder, '*.jpg')),
                 key=lambda p: (int(os.path.basename(p).split('_')[0]), os.path.basename(p)))
  categories = np.array([int(os.path.basename(p).split('_')[0]) for p in files])
  images = []
  for path in files:
    with open(path, 'rb') as f:
      images.append(f.read())
  with open(os.path.join(folder, 'categories.json')) as f:
    names = [entry['description'] for entry in json.load(f)]
  # Padded to the CLI's default batch (256), so that the model compiles for one shape only.
  pixels = encoder.preprocess(images)
  pixels = np.concatenate([pixels, np.zeros((256 - len(pixels),) + pixels.shape[1:], np.float32)])
  return folder, categories, names, encoder.embed_images(pixels)[:len(images)]


@pytest.fixture
def loaded_once(tiny_run, encoder, monkeypatch):
  """Makes the CLI reuse the loaded `encoder` (already compiled) for `tiny_run`: the CLI's
  own load is exercised by the gpr1200 test; the others need not pay for it again."""
  def load(workdir, step=None):
    assert workdir == tiny_run and step in (None, STEP)
    return encoder
  monkeypatch.setattr(evaluate.inference, 'load', load)


def run_cli(capsys, *argv):
  out = evaluate.main(list(argv))
  capsys.readouterr()
  return out


def cli_error(*argv):
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(list(argv))
  message = str(exit_info.value.code)
  assert message.startswith('mofi_jax.evaluate: error:') and '\n' not in message, message
  return message


# ----------------------------------------------------------------------------------------
# gpr1200 --features (any model's features).


def features_file(tmp_path, features):
  path = tmp_path / 'features.npy'
  np.save(path, features)
  return str(path)


def test_perfect_features_score_one_everywhere(tmp_path, capsys):
  # One direction per category (rows in official order: category i // 10),
  # so every query ranks its own 10 images first: AP 1 by hand.
  categories = np.arange(12000) // 10
  feats = np.zeros((12000, 1200), np.float32)
  feats[np.arange(12000), categories] = 1.0
  evaluate.main(['gpr1200', '--features', features_file(tmp_path, feats)])
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {'all', 'landmarks', 'inat', 'sketch', 'instre', 'sop', 'faces'}
  assert all(v == pytest.approx(1.0) for v in printed.values())


def test_printed_json_is_the_library_result(tmp_path, capsys):
  feats = np.random.default_rng(0).normal(size=(12000, 8)).astype(np.float32)
  evaluate.main(['gpr1200', '--features', features_file(tmp_path, feats)])
  printed = json.loads(capsys.readouterr().out)
  expected = gpr1200.mean_average_precision(feats, np.arange(12000) // 10)
  assert printed == pytest.approx(expected, abs=1e-12)
  # Random features sit at the exact chance level, not at 1.
  assert printed['all'] == pytest.approx(gpr1200.chance_map(np.arange(12000) // 10), abs=0.01)


@pytest.mark.parametrize('case,expect', [
    ('nan', 'NaN or Inf'), ('shape', 'expected GPR1200 features'), ('missing', 'No such file')])
def test_bad_features_exit_with_one_clear_line(tmp_path, case, expect):
  if case == 'missing':
    path = str(tmp_path / 'nowhere.npy')
  elif case == 'shape':
    path = features_file(tmp_path, np.zeros((100, 8), np.float32))
  else:
    feats = np.random.default_rng(0).normal(size=(12000, 8)).astype(np.float32)
    feats[5, 3] = np.nan
    path = features_file(tmp_path, feats)
  message = cli_error('gpr1200', '--features', path)
  assert path in message and expect.lower() in message.lower(), message


# ----------------------------------------------------------------------------------------
# From a checkpoint.


def test_gpr1200_from_checkpoint_saves_features_and_results(tiny_run, heldout, tmp_path,
                                                            capsys):
  folder, categories, _, features = heldout
  saved = str(tmp_path / 'feats.npy')
  out = run_cli(capsys, 'gpr1200', '--workdir', tiny_run, '--images', folder,
                '--save_features', saved)
  np.testing.assert_allclose(np.load(saved), features, atol=1e-5)  # official order, streamed
  expected = gpr1200.mean_average_precision(features, categories)['all']
  assert out['metrics']['map'] == pytest.approx(expected, abs=1e-5)
  assert out['metrics']['chance_map'] == pytest.approx(gpr1200.chance_map(categories))
  assert out['results_file'] == os.path.join(tiny_run, 'eval', f'gpr1200_retrieval_step{STEP}.json')
  with open(out['results_file']) as f:
    written = json.load(f)
  assert written['step'] == STEP and written['metrics'] == out['metrics']
  assert written['options']['num_images'] == len(categories)
  # A second run must not overwrite the saved features.
  before = os.path.getmtime(saved)
  message = cli_error('gpr1200', '--workdir', tiny_run, '--images', folder,
                      '--save_features', saved)
  assert saved in message and 'already exists' in message
  assert os.path.getmtime(saved) == before


def official_folder(folder):
  """12,000 small JPEGs in the official layout, {category}_{i}.jpg: each category a colour
  of its own plus per-image noise, so that rankings are neither perfect nor random."""
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (image_folder.GPR1200_CATEGORIES, 3))
  os.makedirs(folder)
  for c, colour in enumerate(colours):
    for i in range(image_folder.IMAGES_PER_CATEGORY):
      pixels = np.clip(colour + rng.normal(0, 40, (12, 12, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(os.path.join(folder, f'{c}_{i}.jpg'), quality=90)
  return folder


def test_gpr1200_official_from_the_command_line(tiny_run, encoder, tmp_path):
  """`gpr1200 --official` as a user runs it, on a folder of the benchmark's size: the saved
  features are the Encoder's (spot-checked on files embedded here), the six domains are
  reported, and the printed metrics are the library's scoring (tested against the official
  loop in test_gpr1200.py / test_study.py) of exactly those features."""
  folder = official_folder(str(tmp_path / 'gpr1200'))
  saved = str(tmp_path / 'feats.npy')
  proc = subprocess.run(
      [sys.executable, '-m', 'mofi_jax.evaluate', 'gpr1200', '--workdir', tiny_run,
       '--images', folder, '--official', '--save_features', saved],
      capture_output=True, text=True, check=False,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout)
  features = np.load(saved)
  categories = np.arange(12000) // 10
  expected = gpr1200.mean_average_precision(features, categories)
  assert printed['metrics']['map'] == pytest.approx(expected.pop('all'), abs=1e-6)
  assert {k: printed['metrics'][f'map/{k}'] for k in expected} == pytest.approx(expected,
                                                                                 abs=1e-6)
  assert set(expected) == {'landmarks', 'inat', 'sketch', 'instre', 'sop', 'faces'}
  with open(printed['results_file']) as f:
    assert json.load(f)['options']['official'] is True
  rows = np.random.default_rng(1).choice(12000, 16, replace=False)
  files = [os.path.join(folder, f'{r // 10}_{r % 10}.jpg') for r in rows]
  images = [open(f, 'rb').read() for f in files]  # pylint: disable=consider-using-with
  np.testing.assert_allclose(features[rows], encoder.embed_images(encoder.preprocess(images)),
                             atol=1e-5)
  assert 0.1 < expected['landmarks'] < 0.99   # neither random nor perfect: a real ranking


def test_official_refuses_a_folder_of_another_size(tiny_run, heldout):
  message = cli_error('gpr1200', '--workdir', tiny_run, '--images', heldout[0], '--official')
  assert heldout[0] in message and 'official GPR1200 layout' in message
  assert 'expected 12000 (1200 categories x 10)' in message, message


def test_zeroshot_and_knn_match_independent_computation(tiny_run, encoder, heldout, loaded_once,
                                                        capsys):
  folder, categories, names, features = heldout
  out = run_cli(capsys, 'zeroshot', '--workdir', tiny_run, '--dataset', 'folder',
                '--data_dir', folder, '--split', 'all', '--templates', 'identity')
  class_emb = encoder.embed_texts(names).astype(np.float64)
  predicted = np.argmax(features @ class_emb.T, axis=1)
  assert out['metrics']['top1'] == pytest.approx(np.mean(predicted == categories), abs=1e-9)
  assert out['results_file'].endswith(f'zeroshot_folder-retrieval_step{STEP}.json')

  out = run_cli(capsys, 'knn', '--workdir', tiny_run, '--dataset', 'folder', '--data_dir',
                folder, '--k', '4')
  train = np.arange(len(categories)) % 10 < 5  # folder split: images 0-4 of each category
  votes = knn.knn_votes(features[train], categories[train], features[~train], 5, k=4)
  assert out['metrics']['top1'] == pytest.approx(
      np.mean(votes.argmax(1) == categories[~train]), abs=1e-9)
  assert out['metrics']['num_train'] == out['metrics']['num_test'] == len(categories) // 2


def sklearn_probe_top1(features, categories, l2):
  """The folder protocol in scikit-learn: images 0-4 of each category (train + the
  held-out validation images) fit at `l2` (C = 1 / l2), scored on images 5-9."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  train = np.arange(len(categories)) % 10 < 5
  clf = LogisticRegression(C=1.0 / l2, max_iter=10000, tol=1e-10)
  clf.fit(features[train].astype(np.float64), categories[train])
  return float(np.mean(clf.predict(features[~train]) == categories[~train]))


def test_linear_probe_cli_matches_scikit_learn_at_its_chosen_l2(tiny_run, heldout, loaded_once,
                                                               capsys):
  """The CLI's test accuracy equals scikit-learn's LogisticRegression refit on the same
  features at the l2 the CLI chose. A probe that returned chance (0.2 here) fails it."""
  folder, categories, _, features = heldout
  out = run_cli(capsys, 'linear_probe', '--workdir', tiny_run, '--step', str(STEP),
                '--dataset', 'folder', '--data_dir', folder)
  with open(out['results_file']) as f:
    written = json.load(f)
  assert written['step'] == STEP and written['source'].endswith(f'(step {STEP})')
  m = written['metrics']
  assert (m['num_train'], m['num_val'], m['num_test']) == (20, 5, 25)   # 5 categories x 10
  top1 = sklearn_probe_top1(features, categories, m['l2'])
  # Within one test image: the two solvers stop at slightly different points.
  assert abs(m['top1'] - top1) <= 1 / m['num_test'] + 1e-9, (m['top1'], top1)
  assert top1 >= 0.6, f'scikit-learn reaches only {top1} here: the check would be weak'


def test_hf_clip_goes_through_the_interop_loader(tiny_run, encoder, heldout, tmp_path,
                                                 monkeypatch, capsys):
  # Patch the real module's attribute: `from mofi_jax.interop import hf_import` reads the
  # package attribute once another test has imported it, so a sys.modules stub is not enough.
  from mofi_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
  loaded = []
  monkeypatch.setattr(hf_import, 'load_encoder',
                      lambda folder: loaded.append(folder) or encoder)
  hf_folder = str(tmp_path / 'hf')
  (tmp_path / 'elsewhere').mkdir()
  monkeypatch.chdir(tmp_path / 'elsewhere')
  out = run_cli(capsys, 'gpr1200', '--hf_clip', hf_folder, '--images', heldout[0])
  assert loaded == [hf_folder]
  # Results go beside us, never into the imported folder (it may be read-only or shared).
  assert out['results_file'] == str(tmp_path / 'elsewhere' / 'eval_results' / 'hf' /
                                    f'gpr1200_retrieval_step{STEP}.json')
  assert not os.path.exists(hf_folder)


@pytest.mark.parametrize('case', ['unknown_dataset', 'missing_data_dir', 'empty_data_dir',
                                  'image_size', 'step', 'no_model', 'bad_folder'])
def test_cli_errors_are_one_clear_line(tiny_run, heldout, tmp_path, case):
  model = ['--workdir', tiny_run]
  empty = tmp_path / 'empty'
  empty.mkdir()
  argv, expect = {
      'unknown_dataset': (['zeroshot', *model, '--dataset', 'imagenet3000', '--data_dir',
                           heldout[0]], "Unknown dataset 'imagenet3000'"),
      'missing_data_dir': (['knn', *model, '--dataset', 'cifar10', '--data_dir',
                            str(tmp_path / 'nowhere')], 'missing or empty'),
      'empty_data_dir': (['linear_probe', *model, '--dataset', 'cifar10', '--data_dir',
                          str(empty)], f'data_dir {empty} is missing or empty'),
      'image_size': (['gpr1200', *model, '--images', heldout[0], '--image_size', '224'],
                     '--image_size 224, but the model takes 32'),
      'step': (['knn', *model, '--step', '7', '--dataset', 'folder', '--data_dir', heldout[0]],
               'no checkpoint for step 7; available steps: [3]'),
      'no_model': (['zeroshot', '--dataset', 'folder', '--data_dir', heldout[0]],
                   'needs a model'),
      'bad_folder': (['gpr1200', *model, '--images', str(empty)], 'no images named'),
  }[case]
  assert expect in cli_error(*argv)


def test_results_never_overwrite_other_steps_or_options(tmp_path):
  kw = dict(eval_name='knn', dataset='folder-x', source='w', metrics={'top1': 0.5})
  first = results.write(str(tmp_path), step=10, options={'k': 20}, **kw)
  other_step = results.write(str(tmp_path), step=20, options={'k': 20}, **kw)
  other_options = results.write(str(tmp_path), step=10, options={'k': 5}, **kw)
  again = results.write(str(tmp_path), step=10, options={'k': 20}, **dict(kw, metrics={'top1': 1}))
  assert first == again == str(tmp_path / 'knn_folder-x_step10.json')
  assert other_step == str(tmp_path / 'knn_folder-x_step20.json')
  assert other_options.startswith(str(tmp_path / 'knn_folder-x_step10_')) and other_options != first
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in
                                                (first, other_step, other_options))
  with open(other_options) as f:
    assert json.load(f)['options'] == {'k': 5}


def test_folder_split_is_by_image_index():
  categories = np.repeat(np.arange(3), 10)
  train = image_folder.split_indices(categories, 'train', 5)
  test = image_folder.split_indices(categories, 'test', 5)
  assert train.tolist() == [i for i in range(30) if i % 10 < 5]
  assert test.tolist() == [i for i in range(30) if i % 10 >= 5]
  with pytest.raises(image_folder.FolderError, match='train_per_category must be in 1..9'):
    image_folder.split_indices(categories, 'train', 10)
