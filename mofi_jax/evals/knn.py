"""Weighted k-nearest-neighbour classification on frozen features, as in DINO's kNN eval.

For each test image: cosine similarities s to every train image (features L2-normalised),
its k most similar train images, and class votes sum_j exp(s_j / T) over those of each
class (Wu et al. 2018, used by DINO with k=20, T=0.07). The prediction is the class with
the most votes; top-5 is the 5 classes with the most votes (ties: lower class index first,
as `lax.top_k` orders them).

Config (evals.<name>, type='knn'): dataset, data_dir, train_split, test_split (defaults:
'train' and the dataset's test split; a folder is split by image index, see
image_folder.py), train_per_category (folder), k, temperature, batch_size, resize.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mofi_jax.data import eval_transform
from mofi_jax.evals import datasets, embedding
from mofi_jax.evals.zeroshot import classification_metrics

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def _normalize(x):
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def _block_votes(queries, train, train_labels, *, k, num_classes, temperature):
  sims = queries @ train.T                                   # [b, N_train]
  top_sims, top_idx = jax.lax.top_k(sims, k)                 # [b, k]
  weights = jnp.exp(top_sims / temperature)
  rows = jnp.broadcast_to(jnp.arange(queries.shape[0])[:, None], top_idx.shape)
  return jnp.zeros((queries.shape[0], num_classes), jnp.float32).at[
      rows, train_labels[top_idx]].add(weights)


def knn_votes(train_features, train_labels, test_features, num_classes, *, k=DEFAULT_K,
              temperature=DEFAULT_TEMPERATURE, block_size=256):
  """Class votes [N_test, C]; queries go in blocks so memory is block_size x N_train."""
  train_labels = np.asarray(train_labels)
  if k < 1 or k > len(train_labels):
    raise ValueError(f'k must be in 1..{len(train_labels)} (the train set size), got {k}.')
  if temperature <= 0:
    raise ValueError(f'temperature must be positive, got {temperature}.')
  if train_labels.min() < 0 or train_labels.max() >= num_classes:
    raise ValueError(f'Train labels must be in [0, {num_classes}).')
  train = jnp.asarray(_normalize(train_features))
  labels = jnp.asarray(train_labels, jnp.int32)
  queries = _normalize(test_features)
  out = []
  for start in range(0, len(queries), block_size):
    block = queries[start:start + block_size]
    real = len(block)
    if real < block_size and start > 0:  # keep one block shape: pad the last block
      block = np.concatenate([block, np.zeros((block_size - real, block.shape[1]), np.float32)])
    votes = _block_votes(jnp.asarray(block), train, labels, k=int(k),
                         num_classes=int(num_classes), temperature=float(temperature))
    out.append(np.asarray(votes)[:real])
  return np.concatenate(out)


class Evaluator:
  """kNN top-1/top-5 accuracy: train split as the memory bank, test split as queries."""
  needs_text = False

  def __init__(self, cfg, *, image_size):
    self.train = datasets.open_from_config(cfg, 'train_split', 'train', need_names=False)
    self.test = datasets.open_from_config(cfg, 'test_split', need_names=False)
    self.k = int(cfg.get('k', DEFAULT_K))
    self.temperature = float(cfg.get('temperature', DEFAULT_TEMPERATURE))
    self.transform = eval_transform.EvalTransform.from_config(cfg, image_size)
    self.embed_args = (self.transform, int(cfg.get('batch_size', 256)))
    self.info = dict(dataset=cfg.get('dataset'), train_split=self.train.split,
                     test_split=self.test.split, k=self.k, temperature=self.temperature,
                     **self.transform.info())

  def run(self, towers):
    train_x, train_y = embedding.embed_source(towers, self.train, *self.embed_args)
    test_x, test_y = embedding.embed_source(towers, self.test, *self.embed_args)
    num_classes = len(self.train.class_names)
    votes = knn_votes(train_x, train_y, test_x, num_classes, k=min(self.k, len(train_y)),
                      temperature=self.temperature)
    metrics = classification_metrics(votes, test_y, num_classes)
    metrics.update(num_train=len(train_y), num_test=len(test_y))
    return metrics
