"""The FastAPI app of `python -m mofi_jax.serve`: routes over a SearchService.

  GET  /                the search page (search_page.html)
  GET  /health          {status, index, rows, dim, model, step, has_head, has_text, entities}
  POST /search          an image (multipart field "image", or base64 "image" in JSON), or
                        "text", or "entity" (a Q-id), as multipart/form or JSON; "k"
                        -> {query, results: [{rank, score, row, image_path, url, caption,
                        key, ..., image}]}; image: this server's URL path of the thumbnail
  POST /entities        an image (as for /search), "k" -> {entities: [{rank, id, name,
                        description, score, index}]}; 404 when the model has no head
  GET  /images/{row}    the row's image file (only files inside the collection's folder)
  /knn-service, /indices-list, /metadata: clip-back's API (clip_back_api.py)
Errors are JSON {"error": "<one line>"} with a 4xx status; the API is documented at /docs.
"""
import json
import os

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from mofi_jax import clip_back_api, serve_schema
from mofi_jax.search_service import ServeError, decode_base64

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'search_page.html')
FORM_TYPES = ('multipart/form-data', 'application/x-www-form-urlencoded')
BODY_OVERHEAD = 64 << 10   # multipart boundaries and other fields, beyond the image cap


def _error(status, message):
  return JSONResponse({'error': message}, status_code=status)


async def _read_body(request, cap):
  """The raw body, refused (413) as soon as it passes `cap` bytes."""
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > cap:
      raise ServeError(413, f'request body over the limit of {cap:,} bytes.')
    chunks.append(chunk)
  return b''.join(chunks)


async def _form_fields(request, cap):
  if request.headers.get('content-length') is None:
    raise ServeError(411, 'a form upload needs a Content-Length header.')
  fields = {}
  form = await request.form(max_files=2, max_fields=10)
  for key, value in form.multi_items():
    fields[key] = await value.read(cap + 1) if hasattr(value, 'read') else value
  return fields


async def read_fields(request, max_bytes):
  """The query's fields from a form (files as bytes) or a JSON object (base64 images),
  plus the URL's query parameters; bodies over the cap are refused."""
  cap = max_bytes + BODY_OVERHEAD
  length = request.headers.get('content-length')
  if length is not None and length.isdigit() and int(length) > cap:
    raise ServeError(413, f'request of {int(length):,} bytes is over the limit of {cap:,}.')
  content_type = request.headers.get('content-type', '')
  if content_type.startswith(FORM_TYPES):
    fields = await _form_fields(request, cap)
  else:
    fields = await _json_body(request, cap) or {}
  if isinstance(fields.get('image'), str) and fields['image']:
    fields['image'] = decode_base64(fields['image'])
  return dict(request.query_params, **fields)


async def _json_body(request, cap):
  body = await _read_body(request, cap)
  if not body.strip():
    return None
  try:
    payload = json.loads(body)
  except ValueError as e:
    raise ServeError(400, f'body: not JSON ({e}).') from e
  if not isinstance(payload, dict):
    raise ServeError(400, 'body: expected a JSON object.')
  return payload


def _query(fields):
  """The search fields, empty strings as absent (an empty form field)."""
  return {name: fields[name] for name in ('image', 'text', 'entity')
          if fields.get(name) not in (None, '')}


def add_routes(app, service):
  @app.get('/', include_in_schema=False)
  def page():
    return FileResponse(PAGE, media_type='text/html')

  @app.get('/health', response_model=serve_schema.Health)
  def health():
    return service.health()

  @app.post('/search', response_model=serve_schema.SearchAnswer,
            openapi_extra=serve_schema.SEARCH_BODY)
  async def search(request: Request):
    fields = await read_fields(request, service.max_bytes)
    return await run_in_threadpool(service.search, fields.get('k', 10), **_query(fields))

  @app.post('/entities', response_model=serve_schema.EntitiesAnswer,
            openapi_extra=serve_schema.ENTITIES_BODY)
  async def entities(request: Request):
    fields = await read_fields(request, service.max_bytes)
    ranked = await run_in_threadpool(service.entities, fields.get('image'), fields.get('k', 10))
    return {'entities': ranked}

  @app.get('/images/{row}')
  def image(row: int):
    return FileResponse(service.image_file(row))


def add_clip_back_routes(app, service):
  @app.get('/indices-list')
  def indices_list():
    return [service.name]

  @app.post('/knn-service')
  async def knn_service(request: Request):
    payload = await _json_body(request, service.max_bytes * 2) or {}
    return await run_in_threadpool(clip_back_api.knn_service, service, payload)

  @app.post('/metadata')
  async def metadata(request: Request):
    payload = await _json_body(request, service.max_bytes) or {}
    return await run_in_threadpool(clip_back_api.metadata, service, payload)


def create_app(service):
  app = FastAPI(title='mofi_jax search', description=__doc__)
  # clip-front is usually served from another origin than its back end.
  app.add_middleware(CORSMiddleware, allow_origins=['*'], allow_methods=['*'],
                     allow_headers=['*'])

  @app.exception_handler(ServeError)
  async def refused(_, error):
    return _error(error.status, str(error))

  @app.exception_handler(HTTPException)   # unknown routes, malformed multipart bodies
  async def http_error(_, error):
    return _error(error.status_code, str(error.detail))

  @app.exception_handler(Exception)
  async def failed(_, error):   # a bug, not the client's: still JSON, and the server lives on
    return _error(500, f'internal error: {type(error).__name__}: {error}')

  @app.exception_handler(RequestValidationError)
  async def invalid(_, error):
    first = error.errors()[0] if error.errors() else {}
    return _error(422, f'{".".join(map(str, first.get("loc", ())))}: {first.get("msg", error)}')

  add_routes(app, service)
  add_clip_back_routes(app, service)
  return app
