"""Linear probe: the JAX L-BFGS logistic regression against scikit-learn, known-by-construction
accuracies, CLIP's L2 search, and the evaluator on a folder."""
import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from mofi_jax.evals import datasets, embedding, linear_probe


def gaussian_classes(spread, seed, n=240, dim=10, num_classes=4):
  """Features of `num_classes` Gaussian clusters. Tests share the default shape, because
  the probe compiles once per (examples, dim, classes) shape."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim))
  labels = rng.integers(0, num_classes, n)
  return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def softmax(z):
  z = np.exp(z - z.max(1, keepdims=True))
  return z / z.sum(1, keepdims=True)


def assert_matches_scikit_learn(w, b, x, y, l2):
  """Same predictions, probabilities and (class-centred) weights as sklearn's fit."""
  oracle = LogisticRegression(C=1 / l2, tol=1e-10, max_iter=10_000).fit(x.astype(np.float64), y)
  ours, theirs = x @ w + b, oracle.decision_function(x)
  assert np.mean(ours.argmax(1) == theirs.argmax(1)) >= 0.99
  np.testing.assert_allclose(softmax(ours), softmax(theirs), atol=2e-3)
  # Softmax is shift-invariant, so compare the weights after centring over classes.
  centred = lambda m: m - m.mean(1, keepdims=True)
  np.testing.assert_allclose(centred(w), centred(oracle.coef_.T), atol=5e-3)


@pytest.mark.parametrize('l2', [0.1, 3.0, 100.0])
def test_fit_matches_scikit_learn(l2):
  x, y = gaussian_classes(spread=1.5, seed=0)
  w, b, _ = linear_probe.fit(x, y, 4, l2)
  assert_matches_scikit_learn(w, b, x, y, l2)


def test_zero_weight_rows_are_left_out_of_the_fit():
  x, y = gaussian_classes(spread=1.0, seed=1)
  keep = np.arange(240) < 160
  w, b, _ = linear_probe.fit(x, y, 4, 1.0, weights=keep.astype(np.float32))
  assert_matches_scikit_learn(w, b, x[keep], y[keep], 1.0)


def test_separable_features_score_100_and_shuffled_labels_chance():
  x, y = gaussian_classes(spread=0.05, seed=2, n=400)
  split = lambda a: (a[:200], a[200:240], a[240:])  # train + val = 240 rows: the shared shape
  (xtr, xva, xte), (ytr, yva, yte) = split(x), split(y)
  separable = linear_probe.probe(xtr, ytr, xva, yva, xte, yte, 4)
  assert separable['top1'] == 1.0 and separable['num_test'] == 160
  # Labels drawn independently of the features: no probe can beat chance on unseen data.
  rng = np.random.default_rng(3)
  shuffled = linear_probe.probe(xtr, rng.permutation(ytr), xva, rng.permutation(yva), xte,
                                rng.integers(0, 4, 160), 4)
  assert abs(shuffled['top1'] - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 160), shuffled


def test_l2_search_follows_clips_schedule():
  peak = 1.3  # log10 l2 of the best validation score
  tried = []

  def score(v):
    tried.append(v)
    return (-abs(v - peak),)

  best, scores = linear_probe.search_l2(score)
  assert best == pytest.approx(1.25)  # nearest to 1.3 on the 1/8-decade grid around the peak
  assert sorted(tried[:7]) == [-6, -4, -2, 0, 2, 4, 6]  # the published starting values
  assert len(tried) == len(scores) == 7 + 2 * 4  # then two neighbours per halving, 4 halvings
  # Ties go to the stronger regularisation.
  assert linear_probe.search_l2(lambda v: (0.5,))[0] == 6


def test_holdout_is_stratified_and_disjoint():
  labels = np.repeat([0, 1, 2], [10, 5, 1])
  train, val = datasets.holdout_indices(labels, 0.2)
  assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
  assert sorted(np.concatenate([train, val]).tolist()) == list(range(16))


def test_evaluator_on_a_folder(tmp_path):
  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (6, 3))
  for c, colour in enumerate(colours):
    for j in range(10):
      pixels = np.clip(colour + rng.integers(-3, 4, (8, 8, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f'{c}_{j}.png')
  cfg = ml_collections.ConfigDict(dict(dataset='folder', data_dir=str(tmp_path), max_iter=100,
                                       batch_size=16))
  evaluator = linear_probe.Evaluator(cfg, image_size=8)
  metrics = evaluator.run(embedding.Towers(lambda batch: batch.mean(axis=(1, 2))))
  assert metrics['top1'] == 1.0 and metrics['top5'] == 1.0
  assert (metrics['num_train'], metrics['num_val'], metrics['num_test']) == (24, 6, 30)
  assert evaluator.info['val_split'] == '0.2 of train'
