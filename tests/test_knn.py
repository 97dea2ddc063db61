"""Weighted kNN (DINO) against a float64 NumPy brute force, and the evaluator end to end."""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mofi_jax.evals import embedding, knn, zeroshot


def reference_votes(train, train_labels, test, num_classes, k, temperature):
  """DINO's knn_classifier in float64 NumPy, one query at a time."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  votes = np.zeros((len(test), num_classes))
  for q, query in enumerate(test.astype(np.float64)):
    sims = train.astype(np.float64) @ query
    nearest = np.argsort(-sims, kind='stable')[:k]
    for j in nearest:
      votes[q, train_labels[j]] += np.exp(sims[j] / temperature)
  return votes


@pytest.mark.parametrize('k, temperature, block_size', [(1, 0.07, 256), (7, 0.07, 16),
                                                       (20, 0.5, 9), (60, 1.0, 64)])
def test_votes_match_numpy_brute_force(k, temperature, block_size):
  rng = np.random.default_rng(k)
  train, test = rng.normal(size=(60, 12)), rng.normal(size=(37, 12))
  labels = rng.integers(0, 6, 60)
  got = knn.knn_votes(train, labels, test, 6, k=k, temperature=temperature, block_size=block_size)
  expected = reference_votes(train, labels, test, 6, k, temperature)
  np.testing.assert_allclose(got, expected, rtol=2e-5)
  np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
  assert zeroshot.topk_accuracy(got, labels[:37] % 6) == zeroshot.topk_accuracy(
      expected, labels[:37] % 6)


def test_k1_is_the_nearest_neighbours_label_and_votes_sum_by_hand():
  train = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  labels = np.array([0, 1, 1])
  test = np.array([[0.8, 0.6], [1.0, 0.1]])
  votes = knn.knn_votes(train, labels, test, 2, k=2, temperature=0.5)
  # Query 0: cosines (.8, .6, .96): neighbours 2 and 0 -> class 1 gets e^(.96/.5), class 0 e^(.8/.5).
  np.testing.assert_allclose(votes[0], [np.exp(1.6), np.exp(1.92)], rtol=1e-5)
  assert knn.knn_votes(train, labels, test, 2, k=1, temperature=0.5).argmax(1).tolist() == [1, 0]


def test_argument_errors():
  x, y = np.ones((4, 2)), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match=r'k must be in 1..4'):
    knn.knn_votes(x, y, x, 2, k=5)
  with pytest.raises(ValueError, match='temperature must be positive'):
    knn.knn_votes(x, y, x, 2, k=1, temperature=0)
  with pytest.raises(ValueError, match=r'Train labels must be in \[0, 2\)'):
    knn.knn_votes(x, np.array([0, 1, 2, 0]), x, 2, k=1)


def test_evaluator_on_a_folder_split_by_image_index(tmp_path):
  """Four colours, 10 images each: images 0-4 are the memory bank, 5-9 the queries."""
  colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)]
  rng = np.random.default_rng(0)
  for c, colour in enumerate(colours):
    for j in range(10):
      pixels = np.clip(np.array(colour) + rng.integers(-5, 6, (8, 8, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f'{c}_{j}.png')
  cfg = ml_collections.ConfigDict(dict(dataset='folder', data_dir=str(tmp_path), k=3,
                                       batch_size=8))
  evaluator = knn.Evaluator(cfg, image_size=8)
  seen = []

  def mean_pixel(batch):
    seen.append(batch.shape)
    return batch.mean(axis=(1, 2))

  assert evaluator.run(embedding.Towers(mean_pixel)) == dict(
      top1=1.0, acc1=1.0, mean_per_class_recall=1.0, num_train=20, num_test=20)
  assert set(seen) == {(8, 8, 8, 3)}
  assert evaluator.info == dict(dataset='folder', train_split='train', test_split='test', k=3,
                                temperature=0.07, image_size=8, resize=None, preprocess='tf')
