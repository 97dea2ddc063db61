"""Tests for mofi_jax/evals/gpr1200.py against an independent re-implementation of the official loop."""
import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mofi_jax import evals
from mofi_jax.data import preprocess
from mofi_jax.evals import embedding, gpr1200, image_folder


def official_aps(features, categories, queries=None, stable=False):
  """The official GPR1200 loop (eval/utils.py), in float64: rank everything, AP at each positive.

  `stable=True` is the official code with a stable sort, the tie rule we document; its default sort is
  unstable, so only tie-free data can be compared against it as written.
  """
  features = np.asarray(features, np.float64)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  features = features / np.where(norms > 0, norms, 1)  # zero rows stay zero, as in ours (not official)
  categories = np.asarray(categories)
  queries = np.arange(len(features)) if queries is None else np.asarray(queries)
  sims = features[queries] @ features.T  # full rows: every image, the query itself included
  aps = []
  for query, row in zip(queries, sims):
    ranking = np.argsort(row, kind='stable' if stable else 'quicksort')[::-1]
    positive_positions = np.where(categories[ranking] == categories[query])[0]
    hits = np.arange(1, len(positive_positions) + 1)
    aps.append(np.mean(hits / (positive_positions + 1.0)))
  return np.array(aps)


def clustered_features(categories, noise, dim=8, seed=0):
  """A random centroid per category plus Gaussian noise of scale `noise` (per image, broadcastable)."""
  rng = np.random.default_rng(seed)
  centroids = rng.standard_normal((categories.max() + 1, dim))
  return centroids[categories] + np.reshape(noise, (-1, 1)) * rng.standard_normal((len(categories), dim))


@pytest.mark.parametrize('categories, block_size', [
    (np.arange(400) // 10, 1024),  # one block larger than N
    (np.arange(400) // 10, 64),    # block size that does not divide N
    (np.arange(400) // 10, 100),   # block size that divides N
    (np.random.default_rng(1).integers(0, 30, 257), 13),  # uneven categories, singletons possible
    (np.zeros(5, int), 2),         # a single category: every ranking is perfect
])
def test_matches_official_loop(categories, block_size):
  features = clustered_features(categories, noise=1.5, seed=block_size)
  expected = official_aps(features, categories)
  aps = gpr1200.average_precisions(features, categories, block_size=block_size)
  np.testing.assert_allclose(aps, expected, rtol=0, atol=1e-6)
  scores = gpr1200.mean_average_precision(features, categories, block_size=block_size)
  assert scores == {'all': pytest.approx(expected.mean(), abs=1e-6)}


def test_gpr1200_layout_has_six_domains_in_official_order(tmp_path, monkeypatch):
  categories = gpr1200.gpr1200_categories()
  # Noise grows domain by domain, so a domain read from the wrong block would break the ordering below.
  noise = np.repeat([0.2, 0.5, 0.8, 1.1, 1.4, 1.7], 2000)
  features = clustered_features(categories, noise)
  aps = gpr1200.average_precisions(features, categories)  # default block 1024 does not divide 12000
  queries = np.random.default_rng(0).choice(12000, 300, replace=False)
  np.testing.assert_allclose(aps[queries], official_aps(features, categories, queries), atol=1e-6)

  def cached_aps(f, c, **unused_kw):  # the APs were just checked; here we check file loading and averaging
    np.testing.assert_array_equal(f, features)
    np.testing.assert_array_equal(c, categories)
    return aps

  monkeypatch.setattr(gpr1200, 'average_precisions', cached_aps)
  np.save(tmp_path / 'features.npy', features)
  scores = gpr1200.score_features_file(tmp_path / 'features.npy')
  assert list(scores) == ['all', 'landmarks', 'inat', 'sketch', 'instre', 'sop', 'faces']
  assert scores['all'] == pytest.approx(aps.mean(), abs=1e-12)
  for domain, start in zip(list(scores)[1:], range(0, 12000, 2000)):
    assert scores[domain] == pytest.approx(aps[start:start + 2000].mean(), abs=1e-12)
  domain_maps = [scores[d] for d in list(scores)[1:]]
  assert domain_maps == sorted(domain_maps, reverse=True), domain_maps


def test_layout_detection():
  categories = gpr1200.gpr1200_categories()
  assert gpr1200.is_gpr1200_layout(categories)
  assert gpr1200.is_gpr1200_layout(categories.astype(str))  # official labels are filename prefixes
  assert not gpr1200.is_gpr1200_layout(categories[::-1])
  assert not gpr1200.is_gpr1200_layout(categories[:400])
  assert not gpr1200.is_gpr1200_layout(np.array(['cat'] * 12000))


def test_perfect_features_score_one():
  categories = np.arange(400) // 10
  tight = clustered_features(categories, noise=1e-4)  # distinct, tie-free, every category separated
  identical = clustered_features(categories, noise=0.0)  # exact ties within each category
  assert gpr1200.mean_average_precision(tight, categories)['all'] == pytest.approx(1.0, abs=1e-12)
  assert gpr1200.mean_average_precision(identical, categories)['all'] == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_two_by_two():
  # Images 0, 1 in category A; 2, 3 in category B; unit vectors in 2-D.
  features = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
  categories = np.array([0, 0, 1, 1])
  # Query 0: sims (1, .6, .8, 0)   -> ranking 0, 2, 1, 3: positives at ranks 1, 3 -> (1/1 + 2/3) / 2
  # Query 1: sims (.6, 1, .96, .8) -> ranking 1, 2, 3, 0: positives at ranks 1, 4 -> (1/1 + 2/4) / 2
  # Query 2: sims (.8, .96, 1, .6) -> ranking 2, 1, 0, 3: positives at ranks 1, 4 -> (1/1 + 2/4) / 2
  # Query 3: sims (0, .8, .6, 1)   -> ranking 3, 1, 2, 0: positives at ranks 1, 3 -> (1/1 + 2/3) / 2
  expected = [5 / 6, 3 / 4, 3 / 4, 5 / 6]
  np.testing.assert_allclose(gpr1200.average_precisions(features, categories), expected, atol=1e-12)
  assert gpr1200.mean_average_precision(features, categories)['all'] == pytest.approx(19 / 24, abs=1e-12)


def test_ties_rank_larger_index_first():
  # Collapsed features: every similarity ties, so the ranking is 3, 2, 1, 0 for every query. Category
  # {2, 3} is at ranks 1, 2 (AP 1); category {0, 1} at ranks 3, 4 (AP (1/3 + 2/4) / 2 = 5/12).
  collapsed = np.ones((4, 3))
  categories = np.array([0, 0, 1, 1])
  np.testing.assert_allclose(gpr1200.average_precisions(collapsed, categories),
                             [5 / 12, 5 / 12, 1, 1], atol=1e-12)
  # Duplicates across categories and some zero features, against the official loop with a stable sort.
  rng = np.random.default_rng(3)
  features = rng.standard_normal((60, 4))
  features[30:40] = features[0:10]
  features[50:53] = 0.0
  categories = rng.integers(0, 8, 60)
  np.testing.assert_allclose(gpr1200.average_precisions(features, categories, block_size=7),
                             official_aps(features, categories, stable=True), atol=1e-12)


def test_chance_map_closed_form():
  # 3 images, categories {0, 1} and {2}: query 2 is alone (AP 1); query 0 has its partner at rank 2 or 3
  # with equal chance: AP (1 + 2/2) / 2 = 1 or (1 + 2/3) / 2 = 5/6, mean 11/12; same for query 1.
  assert gpr1200.chance_map([0, 0, 1]) == pytest.approx((11 / 12 * 2 + 1) / 3, abs=1e-12)
  assert gpr1200.chance_map([7] * 5) == pytest.approx(1.0, abs=1e-12)
  # GPR1200: about 1/10 (the query itself, at rank 1, is one of the 10 positives).
  assert gpr1200.chance_map(gpr1200.gpr1200_categories()) == pytest.approx(0.10194, abs=1e-5)


def test_chance_map_matches_monte_carlo():
  categories = np.repeat(np.arange(25), np.random.default_rng(0).integers(1, 12, 25))
  rng = np.random.default_rng(1)
  # Uniform, not Gaussian, features: the closed form should hold for any i.i.d. continuous features.
  trials = [gpr1200.mean_average_precision(rng.uniform(-1, 1, (len(categories), 6)), categories)['all']
            for _ in range(60)]
  stderr = np.std(trials) / np.sqrt(len(trials))
  exact = gpr1200.chance_map(categories)
  assert abs(np.mean(trials) - exact) < 4 * stderr, (np.mean(trials), exact, stderr)
  assert gpr1200.chance_map(categories, num_trials=20) == pytest.approx(exact, abs=8 * stderr)


@pytest.mark.parametrize('features, n_expected, message', [
    (np.zeros(8), None, r'\[N, D\].*\(8,\)'),
    (np.zeros((2, 3, 4)), None, r'\[N, D\].*\(2, 3, 4\)'),
    (np.zeros((0, 4)), None, r'\[N, D\].*\(0, 4\)'),
    (np.zeros((5, 4)), 6, r'5 rows but 6 were expected'),
    (np.array([[1.0, np.nan], [1.0, 2.0], [np.inf, 0.0]]), None, r'2 of 3 feature rows.*\[0, 2\]'),
    (np.array([['a', 'b']]), None, r'real numbers'),
])
def test_validate_features_errors(features, n_expected, message):
  with pytest.raises(ValueError, match=message):
    gpr1200.validate_features(features, n_expected)


def test_mean_average_precision_input_errors(tmp_path):
  with pytest.raises(ValueError, match=r'4 rows but 5 were expected'):
    gpr1200.mean_average_precision(np.ones((4, 2)), [0, 0, 1, 1, 2])
  with pytest.raises(ValueError, match=r'1-D'):
    gpr1200.mean_average_precision(np.ones((4, 2)), np.zeros((4, 1)))
  with pytest.raises(ValueError, match=r"'empty' selects no queries"):
    gpr1200.mean_average_precision(np.eye(4), [0, 0, 1, 1], domains={'empty': slice(4, 8)})
  np.save(tmp_path / 'small.npy', np.ones((400, 8)))
  with pytest.raises(ValueError, match=r'expected GPR1200 features \[12000, D\].*\(400, 8\)'):
    gpr1200.score_features_file(tmp_path / 'small.npy')


def test_registry():
  assert evals.get_evaluator('gpr1200') is gpr1200.Evaluator
  assert evals.known_types() == ['classifier', 'gpr1200', 'image_text', 'knn', 'linear_probe',
                                 'zeroshot']
  with pytest.raises(ValueError, match=r"Unknown evaluator type 'nope'.*'gpr1200'"):
    evals.get_evaluator('nope')
  with pytest.raises(ValueError, match=r"Unknown evaluator type 'templates'"):
    evals.get_evaluator('templates')  # a helper module, not an evaluator


# ----------------------------------------------------------------------------------------
# Image folders in the GPR1200 layout, and the evaluator that streams them.

# Category c is drawn in COLORS[c] (PNG: lossless, so pixel values are known exactly).
COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])


def write_folder(folder, counts=(10,) * 5, ext='png', categories=None):
  """Writes counts[i] images of category categories[i] (default i) named {c}_img{j}.{ext}."""
  folder.mkdir(exist_ok=True)
  for c, n in zip(categories or range(len(counts)), counts):
    for j in range(n):
      Image.fromarray(np.full((12, 16, 3), COLORS[c % len(COLORS)], np.uint8)).save(
          folder / f'{c}_img{j:02d}.{ext}')
  return str(folder)


def mean_color(batch):
  """A stand-in image tower: the mean pixel of each (preprocessed) image."""
  return batch.mean(axis=(1, 2))


def test_evaluator_streams_in_padded_batches_and_scores(tmp_path):
  folder = write_folder(tmp_path / 'gpr')
  (tmp_path / 'gpr' / 'categories.json').write_text('[]')  # non-images are ignored
  cfg = ml_collections.ConfigDict({'data_dir': folder, 'batch_size': 8})
  evaluator = gpr1200.Evaluator(cfg, image_size=8)
  shapes = []

  def embed(batch):
    shapes.append(batch.shape)
    return mean_color(batch)

  features = evaluator.embed(embedding.Towers(embed_images=embed))
  assert shapes == [(8, 8, 8, 3)] * 7  # 50 images: 6 full batches, then 2 real rows + 6 padding
  # Official order: row i is category i // 10, drawn in that category's colour.
  expected = (COLORS[np.arange(50) // 10] / 255.0 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD
  np.testing.assert_allclose(features, expected, atol=1e-5)
  metrics = evaluator.run(embedding.Towers(embed_images=mean_color))
  chance = gpr1200.chance_map(np.arange(50) // 10)
  assert metrics == {'map': pytest.approx(1.0), 'chance_map': chance}


def test_evaluator_rejects_bad_embeddings(tmp_path):
  cfg = ml_collections.ConfigDict({'data_dir': write_folder(tmp_path / 'gpr'), 'batch_size': 16})
  evaluator = gpr1200.Evaluator(cfg, image_size=8)
  with pytest.raises(ValueError, match=r'must map a batch of 16 to \[16, D\].*\(3, 2\)'):
    evaluator.run(embedding.Towers(embed_images=lambda batch: np.zeros((3, 2))))
  with pytest.raises(ValueError, match=r'50 of 50 feature rows contain NaN'):
    evaluator.run(embedding.Towers(embed_images=lambda batch: np.full((16, 2), np.nan)))


@pytest.mark.parametrize('layout, official, message', [
    (dict(counts=(10, 10, 9, 10)), False,
     r'categories with a wrong number of images \(expected 10\): 2: 9'),
    (dict(counts=(10, 10, 10), categories=[0, 1, 3]), False, r'missing categories \[2\]'),
    (dict(counts=(10, 11)), False, r'1: 11'),
    (dict(counts=(10,) * 3), True,
     r'official GPR1200 layout: 30 images, expected 12000 \(1200 categories x 10\); '
     r'missing categories \[3, 4, 5, 6, 7, 8, 9, 10\] \.\.\. \(1197 in all\)'),
])
def test_folder_layout_errors_name_the_problem(tmp_path, layout, official, message):
  folder = write_folder(tmp_path / 'gpr', **layout)
  with pytest.raises(image_folder.FolderError, match=re.escape(folder) + '.*' + message):
    image_folder.list_images(folder, official=official)


def test_folder_naming_errors(tmp_path):
  with pytest.raises(image_folder.FolderError, match='image folder not found'):
    image_folder.list_images(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(image_folder.FolderError, match=r'no images named \{category\}_\{name\}'):
    image_folder.list_images(tmp_path / 'empty')
  folder = write_folder(tmp_path / 'gpr', counts=(10,))
  (tmp_path / 'gpr' / 'cat_7.jpg').write_bytes(b'x')
  with pytest.raises(image_folder.FolderError,
                     match=r"1 image file\(s\) not named.*\['cat_7.jpg'\]"):
    image_folder.list_images(folder)


def test_unreadable_image_is_named_after_streaming_the_good_ones(tmp_path):
  folder = write_folder(tmp_path / 'gpr', counts=(10, 10))
  bad = tmp_path / 'gpr' / '1_img05.png'
  bad.write_bytes(b'not an image at all')
  cfg = ml_collections.ConfigDict({'data_dir': folder, 'batch_size': 4})
  evaluator = gpr1200.Evaluator(cfg, image_size=8)  # listing does not decode
  seen = []

  def embed(batch):
    seen.append(len(batch))
    return mean_color(batch)

  with pytest.raises(image_folder.FolderError, match=re.escape(str(bad)) + ': unreadable image'):
    evaluator.run(embedding.Towers(embed_images=embed))
  assert len(seen) == 3  # images 0-11 were embedded batch by batch before reaching image 15


def test_evaluator_on_jpegs_of_the_real_pipeline_layout(tmp_path):
  """JPEGs (lossy) of 2 categories; the official order ignores the listing order."""
  rng = np.random.default_rng(0)
  for category in (1, 0):
    for i in range(10):
      pixels = np.clip(COLORS[category] * 0.8 + rng.integers(0, 40, (20, 24, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / f'{category}_img{i}.jpg')
  paths, categories = image_folder.list_images(tmp_path)
  assert categories.tolist() == [0] * 10 + [1] * 10
  assert [os.path.basename(p) for p in paths[:2]] == ['0_img0.jpg', '0_img1.jpg']
  cfg = ml_collections.ConfigDict({'data_dir': str(tmp_path), 'batch_size': 4})
  metrics = gpr1200.Evaluator(cfg, image_size=8).run(embedding.Towers(embed_images=mean_color))
  assert metrics['map'] == pytest.approx(1.0)
