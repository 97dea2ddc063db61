"""Query vectors for a search index, from a loaded model (inference.Encoder).

Every vector is L2-normalised, as the indexed image embeddings are, so an inner product
is a cosine:
- image: the image tower's embedding of the encoded image;
- text: the text tower's embedding of the string;
- entity (a Q-id of the corpus's entity table, whose row i is head class i): the entity
  head's column of that class, normalised (an image's head logit for it, up to the bias and
  the norm of the raw embedding); a model without a head embeds the entity's text,
  input.entity_template ('{name}, {description}') with the text tower.
"""
import numpy as np

from mofi_jax.data import pipeline


class QueryError(ValueError):
  """A query the model cannot answer (unknown entity, no text tower, unreadable image)."""


def image_vectors(encoder, images_bytes, names=None):
  """float32 [N, D] of encoded images; an unreadable one raises, naming it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  pixels = []
  for i, data in enumerate(images_bytes):
    try:
      pixels.append(encoder.preprocess([data])[0])
    except tf.errors.InvalidArgumentError as e:
      name = names[i] if names else f'image {i}'
      raise QueryError(f'{name}: unreadable image ({e.message.splitlines()[0]}).') from e
  return encoder.embed_images(np.stack(pixels))


def text_vector(encoder, text):
  if not encoder.has_text or encoder.tokenize is None:
    raise QueryError(f'{encoder.source}: the model has no text tower (with a tokenizer) to '
                     'embed --text with.')
  return encoder.embed_texts([text])[0]


def entity_class(encoder, qid):
  """The head class (row of the entity table) of entity `qid`."""
  table = encoder.entities
  if table is None:
    raise QueryError(f'{encoder.source}: no entity table (entities.jsonl of the training '
                     'corpus) to find entities in.')
  try:
    return table.ids.index(qid)
  except ValueError:
    raise QueryError(f'{qid}: not in the model\'s entity table ({len(table)} entities, e.g. '
                     f'{", ".join(table.ids[:3])}).') from None


def entity_vector(encoder, qid):
  """(vector [D], how): the head's normalised class vector, or the text tower's embedding
  of the entity's text when the model has no head."""
  c = entity_class(encoder, qid)
  if encoder.has_head:
    kernel, _, _ = encoder.head_weights()
    column = np.asarray(kernel[:, c], np.float32)
    return column / max(float(np.linalg.norm(column)), 1e-12), 'head'
  template = encoder.config.input.get('entity_template', pipeline.DEFAULT_ENTITY_TEMPLATE)
  table = encoder.entities
  text = template.format(name=table.names[c], description=table.descriptions[c])
  return text_vector(encoder, text), 'text'
