"""Typed answers and request bodies of the search API, for its documentation at /docs.

The request bodies are parsed by hand (serve_app.read_fields: one route takes a multipart
upload, a form or JSON), so they are described here as OpenAPI request bodies.
"""
from typing import List, Optional

from pydantic import BaseModel, ConfigDict


class Health(BaseModel):
  status: str
  index: str
  rows: int
  dim: int
  model: str
  step: Optional[int] = None
  has_head: bool
  has_text: bool
  entities: int


class Hit(BaseModel):
  """A result: its rank, cosine score and collection row, the row's metadata columns
  (image_path, key, url, caption, width, height, ...), and `image`, this server's path of
  its thumbnail (null when the row's image is not a served file)."""
  model_config = ConfigDict(extra='allow')
  rank: int
  score: float
  row: int
  image: Optional[str] = None


class SearchAnswer(BaseModel):
  query: dict
  results: List[Hit]


class Entity(BaseModel):
  rank: int
  index: int
  id: str
  name: str
  description: str
  score: float


class EntitiesAnswer(BaseModel):
  entities: List[Entity]


def _body(properties, required=()):
  image = dict(type='string', format='binary', description='an image file')
  form = dict(type='object', properties=dict(properties, image=image, k=dict(type='integer')))
  as_json = dict(type='object', properties=dict(
      properties, image=dict(type='string', description='base64 of an image file'),
      k=dict(type='integer')))
  for schema in (form, as_json):
    if required:
      schema['required'] = list(required)
  return {'requestBody': {'content': {'multipart/form-data': {'schema': form},
                                      'application/json': {'schema': as_json}}}}


SEARCH_BODY = _body(dict(text=dict(type='string'),
                         entity=dict(type='string', description='a Q-id, e.g. Q90')))
ENTITIES_BODY = _body({}, required=('image',))
