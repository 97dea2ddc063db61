"""Type checks of a corpus folder's JSON: corpus.json and the rows of entities.jsonl.

schema.py reads the files; this checks the parsed values, so that a field of the wrong type
(`"commit": []`, a bare JSON string, `"num_shards": "4"`) is refused with the file and the
field named, before code that assumes its type meets it. `error` is the caller's exception
class (schema.CorpusError), which keeps this module free of an import cycle.

commit.files keys are paths relative to the corpus folder; one that could leave the folder
(absolute, `..`, or with a backslash) is refused, so that checking the manifest never
looks at files outside the corpus.
"""
import posixpath

COUNT_FIELDS = ('num_entities', 'num_train_examples', 'num_shards', 'text_len')


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def check_meta(meta, path, required, error):
  """Raises `error` unless `meta` is an object with `required` keys and well-typed fields."""
  if not isinstance(meta, dict):
    raise error(f'{path}: expected a JSON object, got {type(meta).__name__}.')
  missing = [k for k in required if k not in meta]
  if missing:
    raise error(f'{path}: missing field(s) {missing}.')
  for key in COUNT_FIELDS:
    if key in meta and not (_is_int(meta[key]) and meta[key] >= 0):
      raise error(f"{path}: field '{key}' must be a non-negative integer, got {meta[key]!r}.")
  if not _is_int(meta['schema_version']):
    raise error(f"{path}: field 'schema_version' must be an integer, got "
                f'{meta["schema_version"]!r}.')
  if 'kind' in meta and not isinstance(meta['kind'], str):
    raise error(f"{path}: field 'kind' must be a string, got {meta['kind']!r}.")
  if 'commit' in meta:
    check_commit(meta['commit'], path, error)


def check_commit(commit, path, error):
  """corpus.json's `commit`: {run_id: str, files: {relative path: bytes}}."""
  if not isinstance(commit, dict):
    raise error(f"{path}: field 'commit' must be an object, got {type(commit).__name__}.")
  if 'run_id' in commit and not isinstance(commit['run_id'], str):
    raise error(f"{path}: field 'commit.run_id' must be a string, got {commit['run_id']!r}.")
  files = commit.get('files', {})
  if not isinstance(files, dict):
    raise error(f"{path}: field 'commit.files' must be an object of path: bytes, got "
                f'{type(files).__name__}.')
  for rel, size in files.items():
    if not is_contained_path(rel):
      raise error(f"{path}: field 'commit.files' names {rel!r}, which is not a plain "
                  'relative path inside the corpus folder.')
    if not (_is_int(size) and size >= 0):
      raise error(f"{path}: field 'commit.files' gives {rel!r} a size of {size!r}, expected "
                  'a non-negative integer.')


def is_contained_path(rel):
  """Whether `rel` is a relative POSIX path that stays inside its folder."""
  if not isinstance(rel, str) or not rel or '\\' in rel or '\0' in rel or rel.startswith('/'):
    return False
  parts = rel.split('/')
  return all(p not in ('', '.', '..') for p in parts) and posixpath.normpath(rel) == rel


ENTITY_TYPES = {'index': 'integer', 'id': 'string', 'name': 'string', 'description': 'string',
                'count': 'integer'}


def check_entity_row(row, where, error):
  """A parsed entities.jsonl line: an object with ENTITY_TYPES fields of those types."""
  if not isinstance(row, dict):
    raise error(f'{where}: expected a JSON object, got {type(row).__name__}.')
  missing = [k for k in ENTITY_TYPES if k not in row]
  if missing:
    raise error(f'{where}: missing field(s) {missing}.')
  for key, kind in ENTITY_TYPES.items():
    ok = _is_int(row[key]) and row[key] >= 0 if kind == 'integer' else isinstance(row[key], str)
    if not ok:
      article = 'a non-negative' if kind == 'integer' else 'a'
      raise error(f"{where}: field '{key}' must be {article} {kind}, got {row[key]!r}.")
