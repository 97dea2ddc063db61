"""What the search server answers, without HTTP: a loaded model and index, queried.

`python -m mofi_jax.serve` (serve_app.py) is a thin FastAPI layer over SearchService; the
tests call the same methods. Every error a client can cause is a ServeError carrying the
HTTP status it maps to, with a one-line message.

Uploads are checked before any pixel is decoded: empty (400), over the byte cap (413),
over image_limits' pixel or aspect-ratio caps read from the header (413), not a format PIL
identifies (415); an image the model's decoder still refuses is a 400.

Images of the collection are served (GET /images/{row}) only when a row's image_path is a
file inside the collection's image folder, after symlinks are resolved: the folder that
`python -m mofi_jax.embed --images` was given (embed_info.json beside the embeddings), or
--image_root. Rows of --pairs collections name keys, not files, and are never served.
"""
import base64
import binascii
import os

import numpy as np

from mofi_jax import embed_shards, safe_outputs, search_queries
from mofi_jax.data import image_limits
from mofi_jax.evals import entities as entity_ranking

MAX_UPLOAD_BYTES = 16 << 20   # a 24-Mpx JPEG is ~10 MB; the model sees 224 px anyway
MAX_K = 1000


class ServeError(ValueError):
  """A request the server refuses; `status` is its HTTP status."""

  def __init__(self, status, message):
    super().__init__(message)
    self.status = status


def check_upload(data, max_bytes=MAX_UPLOAD_BYTES):
  """Refuses an upload that is empty, too big, or not an image, from its header alone."""
  if not data:
    raise ServeError(400, 'empty upload: send the bytes of an image file.')
  if len(data) > max_bytes:
    raise ServeError(413, f'upload of {len(data):,} bytes is over the limit of {max_bytes:,}.')
  try:
    size = image_limits.header_size(data, all_frames=True)
  except image_limits.ImageLimitError as e:
    raise ServeError(413, f'{str(e).rstrip(".")}.') from e
  if size is None:
    raise ServeError(415, 'not an image: the upload is not a JPEG, PNG, GIF, BMP or WebP '
                          'file that can be read.')


def decode_base64(text):
  """The bytes of a base64 image field (a data: URL prefix is allowed)."""
  if not isinstance(text, str):
    raise ServeError(400, 'image: expected a base64 string.')
  try:
    return base64.b64decode(text.split(',', 1)[-1] if text.startswith('data:') else text,
                            validate=True)
  except (binascii.Error, ValueError) as e:
    raise ServeError(400, f'image: not valid base64 ({e}).') from e


def check_k(k):
  try:
    k = int(k)
  except (TypeError, ValueError):
    raise ServeError(400, f'k={k!r}: expected an integer.') from None
  if not 1 <= k <= MAX_K:
    raise ServeError(400, f'k={k}: must be between 1 and {MAX_K}.')
  return k


def image_root(index_info):
  """The folder the collection's images were embedded from, or None when its embed run
  read --pairs, or it was embedded by another tool."""
  info = embed_shards.read_info(index_info.get('embeddings') or '')
  spec = (info.get('input') if isinstance(info, dict) else None) or {}
  if spec.get('kind') != 'images' or not spec.get('pattern'):
    return None
  return safe_outputs.pattern_root(spec['pattern'])


class SearchService:
  """An Encoder and a search_index.SearchIndex, loaded once, answering queries."""

  def __init__(self, encoder, index, root=None, name=None, max_bytes=MAX_UPLOAD_BYTES):
    self.encoder, self.index, self.max_bytes = encoder, index, max_bytes
    root = root or image_root(index.info)
    self.root = os.path.realpath(root) if root else None
    self.name = name or os.path.basename(os.path.normpath(index.folder))
    # Nothing here is locked: faiss searches are thread-safe, and the index's RowTable
    # guards its own cache (each row-group read opens its own file), so concurrent queries
    # share the cores (a lock around the search held the 1M-row API to one search at a time).

  def health(self):
    e = self.encoder
    return dict(status='ok', index=self.name, rows=len(self.index.rows), dim=self.index.dim,
                model=e.source, step=e.step, has_head=e.has_head,
                has_text=bool(e.has_text and e.tokenize is not None),
                entities=0 if e.entities is None else len(e.entities.ids))

  def image_vector(self, data):
    check_upload(data, self.max_bytes)
    try:
      return search_queries.image_vectors(self.encoder, [data], ['upload'])[0]
    except search_queries.QueryError as e:
      raise ServeError(400, str(e)) from e

  def query_vector(self, image=None, text=None, entity=None):
    """(vector [D], description of the query) of exactly one of image/text/entity."""
    given = [name for name, v in (('image', image), ('text', text), ('entity', entity))
             if v is not None]
    if len(given) != 1:
      raise ServeError(400, f'give exactly one of image, text, entity (got {given or "none"}).')
    try:
      if image is not None:
        return self.image_vector(image), dict(kind='image', bytes=len(image))
      if text is not None:
        return search_queries.text_vector(self.encoder, text), dict(kind='text', text=text)
      vector, how = search_queries.entity_vector(self.encoder, entity)
    except search_queries.QueryError as e:
      raise ServeError(400, str(e)) from e
    return vector, dict(kind='entity', entity=entity, how=how)

  def nearest(self, vector, k):
    return self.index.search(np.asarray(vector, np.float32)[None], k)[0]

  def search(self, k=10, **query):
    """{'query': what was asked, 'results': [{rank, score, row, metadata, image}]}; image
    is the hit's URL path on this server, or None."""
    k = check_k(k)
    vector, asked = self.query_vector(**query)
    hits = self.nearest(vector, k)
    for hit in hits:
      hit['image'] = f'images/{hit["row"]}' if self.served_path(hit) else None
    return dict(query=asked, results=hits)

  def entities(self, image, k=10):
    """The image's top-k entities by the classifier head: {rank, index, id, name,
    description, score} (the head's logit, or cosine for a cosine head)."""
    k = check_k(k)
    e = self.encoder
    if not e.has_head:
      raise ServeError(404, f'{e.source}: the model has no entity head to predict entities '
                            'with (search by text or entity instead).')
    if e.entities is None:
      raise ServeError(404, f'{e.source}: no entity table (entities.jsonl of the training '
                            'corpus) to name entities with.')
    check_upload(image, self.max_bytes)
    try:
      raw = e.embed_images(e.preprocess([image]), normalize=False)[0]
    except Exception as err:  # pylint: disable=broad-except  # TF's decode errors vary
      raise ServeError(400, f'upload: unreadable image ({str(err).splitlines()[0]}).') from err
    kernel, bias, kind = e.head_weights()
    order, scores = entity_ranking.top_k(entity_ranking.head_scores(raw, kernel, bias, kind), k)
    table = e.entities
    return [dict(rank=r + 1, index=int(i), id=table.ids[i], name=table.names[i],
                 description=table.descriptions[i], score=float(s))
            for r, (i, s) in enumerate(zip(order, scores))]

  def served_path(self, meta):
    """The real path of a row's image when it is a file inside the image folder, else None."""
    path = meta.get('image_path')
    if not self.root or not isinstance(path, str) or not path:
      return None
    real = os.path.realpath(path)
    inside = os.path.commonpath([real, self.root]) == self.root
    return real if inside and os.path.isfile(real) else None

  def metadata(self, row):
    try:
      return self.index.rows.metadata(int(row))
    except (IndexError, TypeError, ValueError) as e:
      raise ServeError(404, f'row {row!r}: no such row ({e}).') from e

  def image_file(self, row):
    """The path of row `row`'s image, for GET /images/{row}."""
    path = self.served_path(self.metadata(row))
    if path is None:
      raise ServeError(404, f'row {row}: its image is not a file inside the collection\'s '
                            f'image folder ({self.root or "none known; pass --image_root"}).')
    return path
