"""Image-to-entity retrieval, two ways side by side (the paper's qualitative comparison).

- Classifier head: the head's columns act as entity embeddings. Scores are the head's own
  logits: x W + b on the raw image embedding for the linear head (as in training), and
  the cosine between the normalised embedding and each column for the cosine head (its
  learned scale multiplies every logit alike, so it does not change the ranking).
- Text tower: cosine similarity between the image embedding and each entity's text,
  `input.entity_template` ('{name}, {description}') filled from the corpus entity table.
  Entity text embeddings are cached in the user's cache (user_cache.py), keyed by the
  weights, config and token ids, since a 2M-entity table takes a while to embed.
"""
import os

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from mofi_jax import user_cache
from mofi_jax.data import pipeline
from mofi_jax.evals import embedding


def top_k(scores, k):
  """(indices, scores) of the k best entries of a 1-D array; ties to the lower index."""
  scores = np.asarray(scores)
  k = min(int(k), len(scores))
  order = np.lexsort((np.arange(len(scores)), -scores))[:k]
  return order, scores[order]


def head_scores(raw_embedding, kernel, bias, kind):
  """[C] head logits (linear) or cosines (cosine head) of one raw image embedding [D]."""
  return embedding.head_logits(np.asarray(raw_embedding)[None], kernel, bias, kind)[0]


def text_cache_key(encoder, texts):
  """What the entity text embeddings depend on: the weights, the model config, and the
  token ids of every entity text (so the entity table, template and tokenizer too)."""
  params = traverse_util.flatten_dict(jax.device_get(encoder.params), sep='/')
  return user_cache.content_key(sorted(params.items()), encoder.config.model.to_json(),
                                encoder.tokenize(list(texts)))


def _cache_path(encoder, texts):
  """Where the embeddings of `texts` are cached; None (with a warning) when the cache
  folder is not usable (a read-only home, someone else's folder): they are computed."""
  try:
    folder = user_cache.folder('entity_texts')
  except OSError as e:
    logging.warning('entity texts are not cached: %s', e)
    return None
  return os.path.join(folder, f'{text_cache_key(encoder, texts)}.npy')


def entity_text_embeddings(encoder, cache=False, batch_size=1024):
  """[C, D] text embeddings of every entity; with `cache`, kept in the user's cache
  (user_cache.py) under a key of everything they depend on, never beside the model."""
  table = encoder.entities
  texts = pipeline.entity_texts(table, encoder.config.input.get('entity_template',
                                                                pipeline.DEFAULT_ENTITY_TEMPLATE))
  path = _cache_path(encoder, texts) if cache else None
  if path:
    cached = user_cache.load_array(path)
    if cached is not None and cached.shape[0] == len(texts):
      return cached
  emb = embedding.embed_in_batches(encoder.embed_texts, texts, min(batch_size, len(texts)),
                                   desc='entity texts')
  if path:
    user_cache.save_array(path, emb)
  return emb


def rank_entities(encoder, image_bytes, k=10, cache=False):
  """{'head': [...], 'text': [...]}, each a list of {rank, index, id, name, description,
  score} (or None where the model has no head / no text tower)."""
  if encoder.entities is None:
    raise ValueError(f'{encoder.source}: no entity table (entities.jsonl of the training '
                     'corpus) to name entities with.')
  images = encoder.preprocess([image_bytes])
  ranked = {'head': None, 'text': None}
  if encoder.has_head:
    kernel, bias, kind = encoder.head_weights()
    ranked['head'] = head_scores(encoder.embed_images(images, normalize=False)[0], kernel,
                                 bias, kind)
  if encoder.has_text and encoder.tokenize is not None:
    image = encoder.embed_images(images)[0]
    ranked['text'] = entity_text_embeddings(encoder, cache) @ image
  if ranked['head'] is None and ranked['text'] is None:
    raise ValueError(f'{encoder.source}: the model has neither an entity head nor a usable '
                     'text tower (with a tokenizer) to rank entities with.')
  table = encoder.entities
  for way, scores in ranked.items():
    if scores is not None:
      idx, values = top_k(scores, k)
      ranked[way] = [dict(rank=r + 1, index=int(i), id=table.ids[i], name=table.names[i],
                          description=table.descriptions[i], score=float(v))
                     for r, (i, v) in enumerate(zip(idx, values))]
  return ranked


def format_table(ranked):
  """The two rankings side by side, one line per rank."""
  headers = {'head': 'classifier head (logit)', 'text': 'text tower (cosine)'}
  ways = [w for w in ('head', 'text') if ranked.get(w)]
  cells = {w: [f'{e["name"][:28]:<28} {e["score"]:>8.3f}' for e in ranked[w]] for w in ways}
  width = 37
  lines = ['rank  ' + '   '.join(f'{headers[w]:<{width}}' for w in ways).rstrip()]
  for r in range(max(len(c) for c in cells.values())):
    row = [cells[w][r] if r < len(cells[w]) else '' for w in ways]
    lines.append(f'{r + 1:>4}  ' + '   '.join(f'{c:<{width}}' for c in row).rstrip())
  return '\n'.join(lines)
