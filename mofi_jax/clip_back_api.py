"""clip-retrieval's back-end API (clip_back.py) over a SearchService, so that clip-front
works against `python -m mofi_jax.serve` unchanged.

  GET  /indices-list  -> ["<index name>"]
  POST /knn-service   {text | image (base64) | embedding_input, modality, num_images,
                       num_result_ids, indice_name, ...}
                      -> [{<metadata columns>, image (base64, local files), id, similarity}]
  POST /metadata      {ids, indice_name} -> [{id, metadata: {<columns>, image}}]

Bodies are JSON whatever their content type (clip-front's fetch sends none). As in
clip-back, a non-empty text wins over an image, and an image over an embedding. Differences,
each refused or stated rather than silently wrong: the index holds image embeddings only, so
modality "text" is a 400; image_url is a 400 (the server downloads nothing: send the image);
deduplicate, use_mclip, use_safety_model, use_violence_detector and the aesthetic fields are
accepted and ignored (results are not deduplicated).
"""
import base64

import numpy as np

from mofi_jax.search_service import ServeError, check_k, decode_base64

DEFAULT_NUM_IMAGES = 100   # clip-back's default
HIT_FIELDS = ('rank', 'score', 'row', 'image')   # ours, not metadata columns


def _check_index(service, payload):
  if not isinstance(payload, dict):
    raise ServeError(400, 'expected a JSON object.')
  name = payload.get('indice_name')
  if name not in (None, '', service.name):
    raise ServeError(400, f'indice_name {name!r}: this server holds {service.name!r} '
                          '(GET /indices-list).')


def clip_metadata(service, meta):
  """A row's metadata as clip-back returns it: None columns left out (clip-front tests
  fields with `!== undefined`), the image file as base64 when it is served here."""
  out = {k: v for k, v in meta.items() if v is not None and k not in HIT_FIELDS}
  path = service.served_path(meta)
  if path:
    with open(path, 'rb') as f:
      out['image'] = base64.b64encode(f.read()).decode('ascii')
  return out


def _embedding(service, values):
  try:
    x = np.asarray(values, np.float32).reshape(-1)
  except (TypeError, ValueError) as e:
    raise ServeError(400, f'embedding_input: expected a list of numbers ({e}).') from e
  norm = float(np.linalg.norm(x)) if np.isfinite(x).all() else 0.0
  if x.shape != (service.index.dim,) or norm == 0:
    raise ServeError(400, f'embedding_input: expected {service.index.dim} finite numbers, '
                          'not all zero.')
  return x / norm


def _query_vector(service, payload):
  if payload.get('image_url'):
    raise ServeError(400, 'image_url: this server downloads nothing; send the image itself, '
                          'base64-encoded, as "image".')
  if payload.get('text'):
    return service.query_vector(text=payload['text'])[0]
  if payload.get('image') is not None:
    return service.query_vector(image=decode_base64(payload['image']))[0]
  if payload.get('embedding_input') is not None:
    return _embedding(service, payload['embedding_input'])
  raise ServeError(400, 'must fill one of text, image and embedding_input.')


def knn_service(service, payload):
  _check_index(service, payload)
  modality = payload.get('modality', 'image')
  if modality != 'image':
    raise ServeError(400, f'modality {modality!r}: this index holds image embeddings only '
                          '(modality "image").')
  num_images = check_k(payload.get('num_images', DEFAULT_NUM_IMAGES))
  num_ids = max(check_k(payload.get('num_result_ids') or num_images), num_images)
  hits = service.nearest(_query_vector(service, payload), num_ids)[:num_images]
  return [dict(clip_metadata(service, hit), id=hit['row'], similarity=hit['score'])
          for hit in hits]


def metadata(service, payload):
  _check_index(service, payload)
  ids = payload.get('ids')
  if not isinstance(ids, list):
    raise ServeError(400, 'ids: expected a list of row ids.')
  return [dict(id=i, metadata=clip_metadata(service, service.metadata(i))) for i in ids]
