"""Image-text retrieval, COCO / Flickr30k style: recall@1/5/10 both ways.

Data (`dataset='captions'`, `data_dir` D): the images under D and a captions file beside them,
  captions.jsonl  one object a line: {"image": "<path under D>", "captions": ["...", ...]}
  captions.csv    a header `image,caption`, one row a caption (an image's rows anywhere)
the layouts Flickr30k's and COCO's Karpathy-split exports are usually converted to. Images are
in file order of first appearance; an image path must stay inside D.

Scores are cosines of the towers' L2-normalised embeddings. With CLIP_benchmark's names:
  image_retrieval_recall@K   text -> image: the share of captions whose own image is among
                             the K images scoring highest for it
  text_retrieval_recall@K    image -> text: the share of images with at least one of their
                             captions among the K captions scoring highest for them
Ties rank the lower index first (as topk_accuracy does). Config (evals.<name>,
type='image_text'): dataset ('captions'), data_dir, batch_size, text_batch_size, resize.
"""
import csv
import io
import json
import os

import numpy as np
import tensorflow as tf

from mofi_jax.data import eval_transform
from mofi_jax.evals import embedding, image_folder

DATASET = 'captions'
FILES = ('captions.jsonl', 'captions.csv')
KS = (1, 5, 10)
_BLOCK = 256   # rows of a score block: [256 x 5 captions, T] floats at most


class CaptionsError(ValueError):
  """A captions folder that cannot be read as described in the module docstring."""


def _inside(folder, rel, where):
  if not isinstance(rel, str) or not rel.strip():
    raise CaptionsError(f'{where}: "image" must be a non-empty path, got {rel!r}.')
  path = os.path.normpath(os.path.join(folder, rel))
  if os.path.isabs(rel) or os.path.commonpath([path, os.path.normpath(folder)]) != \
      os.path.normpath(folder):
    raise CaptionsError(f'{where}: image {rel!r} is outside {folder}.')
  if not tf.io.gfile.exists(path):
    raise CaptionsError(f'{where}: image {rel!r} not found under {folder}.')
  return path


def _rows(folder):
  """[(where, image path under folder, caption)] of the captions file."""
  for name in FILES:
    path = os.path.join(folder, name)
    if tf.io.gfile.exists(path):
      break
  else:
    raise CaptionsError(f'{folder}: no {" or ".join(FILES)} (image-text pairs to retrieve).')
  with tf.io.gfile.GFile(path, 'rb') as f:
    try:
      text = f.read().decode('utf-8-sig')
    except UnicodeDecodeError as e:
      raise CaptionsError(f'{path}: not UTF-8 text ({e}).') from e
  if name.endswith('.csv'):
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {'image', 'caption'} <= set(reader.fieldnames):
      raise CaptionsError(f'{path}: expected a header with image,caption; got '
                          f'{reader.fieldnames}.')
    return [(f'{path}:{i + 2}', row['image'], row['caption']) for i, row in enumerate(reader)]
  rows = []
  for i, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    where = f'{path}:{i + 1}'
    try:
      entry = json.loads(line)
    except ValueError as e:
      raise CaptionsError(f'{where}: not JSON ({e}).') from e
    captions = entry.get('captions') if isinstance(entry, dict) else None
    if not isinstance(captions, list) or not captions:
      raise CaptionsError(f'{where}: expected {{"image": ..., "captions": [...]}} with at '
                          'least one caption.')
    rows += [(where, entry.get('image'), c) for c in captions]
  return rows


def load_pairs(folder):
  """(image paths, captions, caption -> image index int64 [T]) of a captions folder."""
  folder = os.fspath(folder)
  images, index, captions, owner = [], {}, [], []
  for where, rel, caption in _rows(folder):
    if not isinstance(caption, str) or not caption.strip():
      raise CaptionsError(f'{where}: empty or non-text caption {caption!r}.')
    path = _inside(folder, rel, where)
    if path not in index:
      index[path] = len(images)
      images.append(path)
    captions.append(caption)
    owner.append(index[path])
  if not captions:
    raise CaptionsError(f'{folder}: the captions file holds no pairs.')
  return images, captions, np.asarray(owner, np.int64)


def _ranks(scores, positive):
  """Rank of column positive[r] in each row of scores (0 = best; ties: lower index first)."""
  own = scores[np.arange(len(positive)), positive][:, None]
  lower = np.arange(scores.shape[1])[None, :] < positive[:, None]
  return np.sum((scores > own) | ((scores == own) & lower), axis=1)


def retrieval_recalls(image_emb, text_emb, owner, ks=KS):
  """CLIP_benchmark's recall@K both ways (module docstring), blocked over rows."""
  image_emb, text_emb = np.asarray(image_emb, np.float32), np.asarray(text_emb, np.float32)
  text_ranks = np.concatenate([_ranks(text_emb[i:i + _BLOCK] @ image_emb.T, owner[i:i + _BLOCK])
                               for i in range(0, len(text_emb), _BLOCK)])
  best = np.full(len(image_emb), np.iinfo(np.int64).max)
  for i in range(0, len(image_emb), _BLOCK):
    scores = image_emb[i:i + _BLOCK] @ text_emb.T           # [b, T]
    rows = np.flatnonzero((owner >= i) & (owner < i + _BLOCK))
    ranks = _ranks(scores[owner[rows] - i], rows)           # each caption vs its own image's row
    np.minimum.at(best, owner[rows], ranks)
  out = {}
  for k in ks:
    out[f'image_retrieval_recall@{k}'] = float(np.mean(text_ranks < k))
    out[f'text_retrieval_recall@{k}'] = float(np.mean(best < k))
  return out


class Evaluator:
  """recall@1/5/10 text -> image and image -> text on a captions folder."""
  needs_text = True

  def __init__(self, cfg, *, image_size):
    if cfg.get('dataset', DATASET) != DATASET:
      raise CaptionsError(f'image_text: dataset {cfg.get("dataset")!r}; expected {DATASET!r} '
                          '(a folder of images with captions.jsonl or captions.csv).')
    if not cfg.get('data_dir'):
      raise CaptionsError('image_text: no data_dir given; pass the captions folder.')
    self.images, self.captions, self.owner = load_pairs(cfg.data_dir)
    self.transform = eval_transform.EvalTransform.from_config(cfg, image_size)
    self.batch_size = int(cfg.get('batch_size', 256))
    self.text_batch_size = int(cfg.get('text_batch_size', 256))
    self.info = dict(dataset=DATASET, num_images=len(self.images),
                     num_captions=len(self.captions), **self.transform.info())

  def run(self, towers):
    batches = image_folder.image_batches(self.images, np.arange(len(self.images)),
                                         self.transform, self.batch_size, desc='images')
    image_emb, order = embedding.embed_labelled(towers.embed_images, batches, self.batch_size)
    if not np.array_equal(order, np.arange(len(self.images))):
      raise RuntimeError('image_text: images came back out of order.')
    text_emb = embedding.embed_in_batches(towers.embed_texts, self.captions,
                                          self.text_batch_size, desc='captions')
    metrics = retrieval_recalls(image_emb, text_emb, self.owner)
    metrics.update(num_images=len(self.images), num_captions=len(self.captions))
    return metrics
