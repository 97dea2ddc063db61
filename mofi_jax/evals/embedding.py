"""What evaluators embed with, and the batching they share.

Evaluators see a model only through `Towers`: the CLI builds one from an
`inference.Encoder`, training builds one from the current parameters
(periodic_evals.py), so every evaluation runs the same code in both places.
"""
import dataclasses
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class Towers:
  """embed_images: float32 [B, S, S, 3] preprocessed images -> [B, D] L2-normalised.
  embed_texts: list of B strings -> [B, D] L2-normalised; None for models without a text
  tower. Both may be jitted for one batch shape: callers pad (see `embed_in_batches`)."""
  embed_images: Callable
  embed_texts: Optional[Callable] = None
  # float32 [B, S, S, 3] -> [B, C] scores of the model's own head; None without a head.
  classify_images: Optional[Callable] = None

  @classmethod
  def from_encoder(cls, encoder):
    """Towers of an `inference.Encoder` (the CLI's models)."""
    texts = encoder.embed_texts if encoder.has_text and encoder.tokenize is not None else None
    classify = None
    if encoder.has_head:
      classify = lambda x: head_logits(encoder.embed_images(x, normalize=False),
                                       *encoder.head_weights())
    return cls(embed_images=encoder.embed_images, embed_texts=texts, classify_images=classify)


def head_logits(raw, kernel, bias, kind):
  """[N, C] head logits (linear) or cosines (cosine head) of raw image embeddings [N, D]
  (float64; ranks as the entity loss's logits do)."""
  x = np.asarray(raw, np.float64)
  kernel = np.asarray(kernel, np.float64)
  if kind == 'linear':
    return x @ kernel + (0.0 if bias is None else np.asarray(bias, np.float64))
  if kind == 'cosine':
    columns = kernel / np.maximum(np.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)) @ columns
  raise ValueError(f'Unknown head kind {kind!r}; expected linear or cosine.')


def check_embeddings(embeddings, rows, what):
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2 or embeddings.shape[0] != rows:
    raise ValueError(f'{what} must map a batch of {rows} to [{rows}, D], got shape '
                     f'{embeddings.shape}.')
  return embeddings


def embed_in_batches(embed_fn, inputs, batch_size, desc='embed'):
  """Runs `embed_fn` over `inputs` (array or list) in batches of exactly `batch_size`.

  The last batch is padded (zeros, or repeats of the last string) so that a jitted
  embed_fn sees one shape and compiles once; padded rows are dropped.
  """
  out = []
  for start in tqdm(range(0, len(inputs), batch_size), desc=desc, disable=None):
    batch = inputs[start:start + batch_size]
    real = len(batch)
    out.append(check_embeddings(embed_fn(pad_batch(batch, batch_size)), batch_size, 'embed_fn')[:real])
  if not out:
    raise ValueError(f'{desc}: nothing to embed.')
  return np.concatenate(out)


def pad_batch(batch, batch_size):
  missing = batch_size - len(batch)
  if not missing:
    return batch
  if isinstance(batch, list):
    return batch + [batch[-1]] * missing
  return np.concatenate([batch, np.zeros((missing,) + batch.shape[1:], batch.dtype)])


def embed_labelled(embed_images, batches, batch_size):
  """(features [N, D], labels [N]) from an iterator of (images, labels) host batches."""
  features, labels = [], []
  for images, batch_labels in batches:
    real = len(images)
    out = check_embeddings(embed_images(pad_batch(images, batch_size)), batch_size, 'embed_images')
    features.append(out[:real])
    labels.append(np.asarray(batch_labels))
  if not features:
    raise ValueError('No images to embed: the split is empty.')
  return np.concatenate(features), np.concatenate(labels)


def embed_source(towers, source, transform, batch_size):
  """(features [N, D], labels [N]) of a datasets.Source through a eval_transform.EvalTransform,
  streamed batch by batch."""
  return embed_labelled(towers.embed_images, source.batches(transform, batch_size),
                        batch_size)


def class_embeddings(embed_texts, class_names, templates, batch_size=256):
  """[C, D] zero-shot classifier: per class, the mean of its L2-normalised template
  embeddings, re-normalised (CLIP's prompt ensembling)."""
  if embed_texts is None:
    raise ValueError('Zero-shot classification needs a text tower and its tokenizer; '
                     'this model has none.')
  texts = [t.format(name) for name in class_names for t in templates]
  emb = embed_in_batches(embed_texts, texts, batch_size, desc='class prompts')
  emb = emb.astype(np.float64).reshape(len(class_names), len(templates), -1)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  mean = emb.mean(axis=1)
  return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)
