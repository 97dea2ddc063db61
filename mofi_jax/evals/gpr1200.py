"""GPR1200 retrieval mAP, reproducing the official protocol, plus the in-training evaluator.

Protocol (github.com/Visual-Computing/GPR1200, `eval/utils.py` and `eval/GPR1200.py`):
- every image is a query against all N images, ITSELF INCLUDED: the query counts as one of its own
  positives and, with L2-normalised features, normally sits at rank 1;
- similarity is the dot product of L2-normalised features (cosine); no cut-off, the whole list is ranked;
- AP = mean over the query's positives p of (#positives ranked at or above p) / rank(p);
- the official order puts category c at images 10c..10c+9 and the six domains in blocks of 2000 images:
  Landmarks, iNat, Sketch (ImageNet-Sketch), INSTRE, SOP, Faces. A domain's mAP averages the APs of its
  2000 queries, each ranked against all 12000 images.
- ties: the official code ranks with `np.argsort(sims)[::-1]` (numpy's default, unstable sort; a later
  version uses torch's, also unstable), so the order of equal similarities is unspecified there. We fix
  it as that code does with a stable sort: among equal similarities the LARGER index ranks first. This
  only matters for exact duplicates or collapsed features, which then score an arbitrary-looking mAP
  in the official code too.
- the official code rounds to 4 decimals for printing; we return unrounded floats.

Implementation: NumPy on the host, queries in blocks of `block_size`, so memory is about
2 x block_size x N x itemsize (the similarities and their sorted copy), never N x N. Only the ranks of
the positives matter, so we sort similarity VALUES per block (much faster than argsort) and find each
positive's rank by binary search; ranks are exact integer counts, with no tolerance anywhere. We keep
this on the host rather than in JAX so that it takes no accelerator memory from the training state,
compiles nothing, and handles categories of any size without padding.
"""
import os

import numpy as np
from tqdm import tqdm

from mofi_jax.data import eval_transform
from mofi_jax.evals import embedding, image_folder

GPR1200_SIZE = 12000
GPR1200_IMAGES_PER_CATEGORY = 10
MAX_FEATURE_DIM = 1 << 16   # features files wider than this are a corrupt header, not a model
GPR1200_DOMAINS = {
    'landmarks': slice(0, 2000),
    'inat': slice(2000, 4000),
    'sketch': slice(4000, 6000),
    'instre': slice(6000, 8000),
    'sop': slice(8000, 10000),
    'faces': slice(10000, 12000),
}


def gpr1200_categories():
  """Category of each image in the official order: image i is in category i // 10."""
  return np.arange(GPR1200_SIZE) // GPR1200_IMAGES_PER_CATEGORY


def validate_features(features, n_expected=None):
  """Returns `features` as a float array [N, D], or raises ValueError saying what is wrong."""
  features = np.asarray(features)
  if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
    raise ValueError(f'Features must be real numbers, got dtype {features.dtype}.')
  if features.ndim != 2 or 0 in features.shape:
    raise ValueError(f'Features must be [N, D] with one non-empty row per image, got shape {features.shape}.')
  if n_expected is not None and features.shape[0] != n_expected:
    raise ValueError(f'Features have {features.shape[0]} rows but {n_expected} were expected '
                     '(one per image, as many as there are category labels).')
  bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
  if bad_rows.size:
    raise ValueError(f'{bad_rows.size} of {features.shape[0]} feature rows contain NaN or Inf '
                     f'(first: {bad_rows[:5].tolist()}); expected finite features.')
  return features.astype(np.result_type(features.dtype, np.float32), copy=False)


def _l2_normalize(features):
  # Divide by the row's max |x| first so that squaring cannot overflow; all-zero rows stay zero
  # (similarity 0 to everything) instead of turning into NaN.
  scale = np.max(np.abs(features), axis=1, keepdims=True)
  features = features / np.where(scale > 0, scale, 1)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return features / np.where(norms > 0, norms, 1)


def _category_members(categories):
  """Per image, the ascending indices of all images of its category (itself included)."""
  _, codes = np.unique(categories, return_inverse=True)
  codes = codes.reshape(-1)
  by_category = np.argsort(codes, kind='stable')  # stable: members stay in ascending index order
  bounds = np.concatenate([[0], np.cumsum(np.bincount(codes))])
  return [by_category[bounds[c]:bounds[c + 1]] for c in codes]


def _query_average_precision(sims, sorted_sims, positives):
  """AP of one query from its similarity row, that row sorted ascending, and its positives' indices."""
  values = sims[positives]
  n_at_most = np.searchsorted(sorted_sims, values, side='right')
  n_below = np.searchsorted(sorted_sims, values, side='left')
  ranks = sims.shape[0] - n_at_most + 1  # 1 + number strictly more similar
  for i in np.flatnonzero(n_at_most - n_below > 1):  # ties: larger indices rank first (see module doc)
    ranks[i] += np.count_nonzero(sims[positives[i] + 1:] == values[i])
  # The same order restricted to positives gives the number of positives at or above each one.
  order = np.lexsort((-positives, -values))
  hits = np.empty(len(positives))
  hits[order] = np.arange(1, len(positives) + 1)
  return np.mean(hits / ranks)


def average_precisions(features, categories, *, block_size=1024):
  """Per-query AP [N] (float64) under the GPR1200 protocol; see the module docstring."""
  categories = np.asarray(categories)
  if categories.ndim != 1:
    raise ValueError(f'Categories must be 1-D (one label per image), got shape {categories.shape}.')
  features = _l2_normalize(validate_features(features, n_expected=len(categories)))
  if block_size < 1:
    raise ValueError(f'block_size must be a positive number of queries, got {block_size}.')
  members = _category_members(categories)
  aps = np.empty(len(categories))
  for start in tqdm(range(0, len(categories), block_size), desc='mAP', unit='block', disable=None):
    sims = features[start:start + block_size] @ features.T
    sorted_sims = np.sort(sims, axis=1)
    for row in range(sims.shape[0]):
      aps[start + row] = _query_average_precision(sims[row], sorted_sims[row], members[start + row])
  return aps


def is_gpr1200_layout(categories):
  """True when `categories` are the official ones: 12000 images, image i in category i // 10."""
  categories = np.asarray(categories)
  if categories.shape != (GPR1200_SIZE,):
    return False
  try:
    return bool(np.array_equal(categories.astype(np.int64), gpr1200_categories()))
  except (TypeError, ValueError):  # labels that are not integers (or digit strings)
    return False


def mean_average_precision(features, categories, *, block_size=1024, domains=None):
  """GPR1200-protocol mAP: {'all': mAP over all queries, <domain>: mAP over that domain's queries}.

  Args:
    features: [N, D] features, any scale (rows are L2-normalised here).
    categories: [N] labels; images with equal labels are each other's positives.
    block_size: queries per block; memory is about 2 * block_size * N * itemsize bytes.
    domains: {name: slice or index array of queries}. None means the six GPR1200 domains when
      `categories` are in the official layout (see `is_gpr1200_layout`), else none.
  """
  if domains is None:
    domains = GPR1200_DOMAINS if is_gpr1200_layout(categories) else {}
  aps = average_precisions(features, categories, block_size=block_size)
  scores = {'all': float(np.mean(aps))}
  for name, queries in domains.items():
    domain_aps = aps[queries]
    if domain_aps.size == 0:
      raise ValueError(f'Domain {name!r} selects no queries out of {len(aps)}; expected a non-empty subset.')
    scores[name] = float(np.mean(domain_aps))
  return scores


def _expected_random_ap(category_size, n):
  """E[AP] of a query whose category has `category_size` images among `n`, with random features.

  With continuous i.i.d. random features the query itself is first (similarity 1) and the other n - 1
  images come in uniformly random order. With R = category_size - 1 other positives among M = n - 1
  others, linearity over rank positions r = 1..M (overall rank r + 1) gives
    E[sum_p hits_p / rank_p] = sum_r [2 R/M + (r - 1) R(R - 1)/(M(M - 1))] / (r + 1),
  where the 2 counts the query itself plus the positive at r, and (r - 1) R(R-1)/(M(M-1)) the expected
  positives ranked above it among the others.
  """
  others, other_positives = n - 1, category_size - 1
  if others == 0:
    return 1.0
  harmonic = np.sum(1.0 / np.arange(2, n + 1))  # sum_{r=1..M} 1 / (r + 1)
  pairs = other_positives * (other_positives - 1) / (others * (others - 1)) if others > 1 else 0.0
  expected = 1 + 2 * other_positives / others * harmonic + pairs * (others - 2 * harmonic)
  return expected / category_size


def chance_map(categories, num_trials=0, seed=0, dim=32):
  """Expected mAP ('all') of random features for this category layout.

  num_trials=0 (default) gives the exact closed form (see `_expected_random_ap`), valid for any
  continuous i.i.d. features such as Gaussians in dim >= 2. num_trials > 0 instead averages
  `mean_average_precision` over that many draws of Gaussian [N, dim] features, as a check.
  """
  categories = np.asarray(categories)
  if num_trials > 0:
    rng = np.random.default_rng(seed)
    trials = [mean_average_precision(rng.standard_normal((len(categories), dim)), categories,
                                      domains={})['all'] for _ in range(num_trials)]
    return float(np.mean(trials))
  _, sizes = np.unique(categories, return_counts=True)
  # Each category of size m contributes m queries with the same expected AP.
  total = sum(m * _expected_random_ap(m, len(categories)) for m in sizes)
  return float(total / len(categories))


class FeaturesFileError(ValueError):
  """A features file is not a [12000, D] numeric .npy array."""


def _npy_header(path):
  """(shape, dtype, data offset) from an .npy header; nothing of the array is read yet."""
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  with open(path, 'rb') as f:
    try:
      version = np.lib.format.read_magic(f)
      if version not in readers:
        raise ValueError(f'.npy format version {version}, this reads {sorted(readers)}')
      shape, _, dtype = readers[version](f)
    except ValueError as e:   # .npz (a zip), pickles, text, truncated headers
      raise FeaturesFileError(f'{path}: not an .npy array file ({e}); expected GPR1200 '
                              f'features [{GPR1200_SIZE}, D] saved by np.save.') from e
    return shape, dtype, f.tell()


def read_features_file(path):
  """[12000, D] features of an .npy, checked from its header before anything is allocated:
  a header claiming more data than the file holds, or a D past MAX_FEATURE_DIM, is refused."""
  path = str(path)
  shape, dtype, offset = _npy_header(path)
  if len(shape) != 2 or shape[0] != GPR1200_SIZE or not 0 < shape[1] <= MAX_FEATURE_DIM:
    raise FeaturesFileError(f'{path}: expected GPR1200 features [{GPR1200_SIZE}, D] in the '
                            f'official order (0 < D <= {MAX_FEATURE_DIM}), got shape {shape}.')
  if dtype.kind not in 'fiu':
    raise FeaturesFileError(f'{path}: expected real-valued features, got dtype {dtype}.')
  declared, actual = shape[0] * shape[1] * dtype.itemsize, os.path.getsize(path) - offset
  if declared != actual:
    raise FeaturesFileError(f'{path}: its header declares {shape} {dtype} ({declared} bytes) '
                            f'but the file holds {actual} bytes of data; truncated or corrupt.')
  return np.load(path, allow_pickle=False)


def score_features_file(path):
  """Scores an .npy of [12000, D] features in the official GPR1200 order: {'all': ..., <domain>: ...}."""
  return mean_average_precision(read_features_file(path), gpr1200_categories())


class Evaluator:
  """Retrieval mAP (GPR1200 protocol) on a folder of `{category}_{name}.jpg` images.

  cfg (evals.<name>, type='gpr1200'): data_dir (the folder), batch_size, optional
  block_size (queries per scoring block), resize, preprocess, official (demand the benchmark's
  1,200 x 10 images). The folder is listed and checked here; `run` streams its images, so
  no more than a few batches are ever decoded at once.
  """
  needs_text = False

  def __init__(self, cfg, *, image_size):
    self.official = bool(cfg.get('official', False))
    self.paths, self.categories = image_folder.list_images(cfg.data_dir, official=self.official)
    self.folder = cfg.data_dir
    self.transform = eval_transform.EvalTransform.from_config(cfg, image_size)
    self.batch_size = int(cfg.batch_size)
    self.block_size = int(cfg.get('block_size', 1024))
    self.chance = chance_map(self.categories)
    self.info = dict(folder=cfg.data_dir, num_images=len(self.paths), official=self.official,
                     **self.transform.info())

  def embed(self, towers):
    """Features [N, D] in the official order (row i has category i // 10)."""
    batches = image_folder.image_batches(self.paths, self.categories, self.transform,
                                         self.batch_size, desc='gpr1200')
    features, _ = embedding.embed_labelled(towers.embed_images, batches, self.batch_size)
    return features

  def score(self, features):
    scores = mean_average_precision(features, self.categories, block_size=self.block_size)
    metrics = {'map': scores.pop('all'), 'chance_map': self.chance}
    metrics.update({f'map/{name}': value for name, value in scores.items()})
    return metrics

  def run(self, towers):
    return self.score(self.embed(towers))
