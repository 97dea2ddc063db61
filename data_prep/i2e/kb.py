"""The knowledge base's format, and the in-memory knowledge base that mention finding and
linking use. wikidata.py builds one from a dump on Beam (python -m data_prep.build_kb).

Files, in KB_DIR:
  entities-XXXXX-of-YYYYY.parquet  id (Q-id), label, description, aliases (list), sitelinks
  aliases-XXXXX-of-YYYYY.parquet   alias (normalize_alias), entity_id, quality (1.0 label,
                                   0.8 alias)
  {entities,aliases,surface}-*.marisa  the mapped index (kb_index.py)
  dead_letter.jsonl                one JSON per malformed line: stage, reason, key, source, detail
  kb.json                          language, counts, file lists, the alias index's
                                   max_candidates_per_alias; written last, so a KB_DIR
                                   without it is an interrupted build, refused by `load`.
"""
import json
import posixpath
import threading

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import kb_index, surface, types
from mofi_jax import user_cache

KB_FILE = 'kb.json'
DEAD_LETTER_FILE = 'dead_letter.jsonl'
ENTITY_PREFIX = 'entities'
ALIAS_PREFIX = 'aliases'
LABEL_QUALITY = 1.0
ALIAS_QUALITY = 0.8
# 2: surface.py's folding and tokens (was: spaCy's blank English tokenizer, lower-cased), form
# values in the surface index, sitelinks in the alias index. 3: one value per alias, its candidates
# ranked and truncated at build time with the dropped ones' count and mass (kb_index.py).
FORMAT_VERSION = 3
SURFACE_TOKENIZER = 'mofi_jax surface.py v1'

ENTITY_SCHEMA = pa.schema([('id', pa.string()), ('label', pa.string()),
                           ('description', pa.string()), ('aliases', pa.list_(pa.string())),
                           ('sitelinks', pa.int64())])
ALIAS_SCHEMA = pa.schema([('alias', pa.string()), ('entity_id', pa.string()),
                          ('quality', pa.float64())])

_ENTITY_CACHE_SIZE = 100_000


class KBError(ValueError):
  """A KB folder or dump that cannot be used as asked."""


def normalize_alias(text):
  """The key of the alias index: surface.py's folded tokens joined by single spaces (NFKC,
  casefold, accents, quotes and dashes folded), so that a mention found in an alt-text and
  the KB form it matched have the same key."""
  return surface.normalize(text)



def alias_rows(entity):
  """The alias-index rows of one entity: its label (1.0) and aliases (0.8), normalised, deduped."""
  quality = {}
  for form, q in [(entity.label, LABEL_QUALITY)] + [(a, ALIAS_QUALITY) for a in entity.aliases]:
    key = normalize_alias(form)
    if key:
      quality[key] = max(q, quality.get(key, 0.0))
  return [dict(alias=a, entity_id=entity.id, quality=q) for a, q in sorted(quality.items())]


def entity_row(entity):
  return dict(id=entity.id, label=entity.label, description=entity.description,
              aliases=list(entity.aliases), sitelinks=entity.sitelinks)



def write_small_kb(kb_dir, entities, language='en', source='in memory',
                   index_shards=kb_index.DEFAULT_SHARDS,
                   max_candidates_per_alias=kb_index.DEFAULT_MAX_CANDIDATES):
  """Writes a one-shard KB folder from Entities without Beam (tests, benchmarks, small demos);
  the alias index ranked and truncated as build_kb's is (kb_index.merge_candidates)."""
  kb_index.check_max_candidates(max_candidates_per_alias)
  entities = sorted(entities, key=lambda e: e.id)
  rows = [r for e in entities for r in alias_rows(e)]
  files = {}
  for prefix, schema, table in ((ENTITY_PREFIX, ENTITY_SCHEMA, [entity_row(e) for e in entities]),
                                (ALIAS_PREFIX, ALIAS_SCHEMA, rows)):
    files[prefix] = f'{prefix}-00000-of-00001.parquet'
    with FileSystems.create(FileSystems.join(kb_dir, files[prefix])) as f:
      pq.write_table(pa.Table.from_pylist(table, schema=schema), f)
  index = kb_index.Index.from_items(
      _index_items(entities, index_shards, max_candidates_per_alias), index_shards)
  index_files = {}
  for kind in kb_index.KINDS:
    index_files[kind] = [kb_index.file_name(kind, s, index_shards) for s in range(index_shards)]
    for trie, name in zip(index._tries[kind], index_files[kind]):  # pylint: disable=protected-access
      kb_index.save_trie(trie, FileSystems.join(kb_dir, name))
  meta = dict(language=language, languages=[language], fallback_languages=[], source=source,
              format_version=FORMAT_VERSION, num_entities=len(entities), num_aliases=len(rows),
              num_alias_keys=index.count('aliases'), skipped={}, dead_letter={},
              entity_files=[files[ENTITY_PREFIX]], alias_files=[files[ALIAS_PREFIX]],
              **index_meta(index_files, index_shards, max_candidates_per_alias))
  with FileSystems.create(FileSystems.join(kb_dir, KB_FILE)) as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True).encode('utf-8'))
  return meta


def index_meta(index_files, index_shards, max_candidates_per_alias):
  """kb.json's record of the tries, with the folding their surface keys depend on and the
  alias index's truncation."""
  return dict(index_files=index_files, index_shards=index_shards,
              surface_tokenizer=SURFACE_TOKENIZER,
              max_candidates_per_alias=max_candidates_per_alias)


def _index_items(entities, index_shards, max_candidates_per_alias):
  return kb_index.index_items(((e, alias_rows(e)) for e in entities), index_shards,
                              max_candidates_per_alias)


# ----------------------------------------------------------------------------- opening


class KnowledgeBase:
  """Entities by Q-id, the alias index and the surface keys of mention finding, over the
  memory-mapped tries of kb_index.py (`load`), or tries built in memory (`from_entities`).
  Nothing is read into Python objects up front: an entity is decoded when asked for."""

  def __init__(self, index, meta=None):
    self.meta = dict(meta or {})
    self._index = index
    self._entity_cache = {}

  @classmethod
  def from_entities(cls, entities, meta=None, index_shards=1,
                    max_candidates_per_alias=kb_index.DEFAULT_MAX_CANDIDATES):
    kb_index.check_max_candidates(max_candidates_per_alias)
    items = _index_items(list(entities), index_shards, max_candidates_per_alias)
    return cls(kb_index.Index.from_items(items, index_shards), meta)

  @classmethod
  def load(cls, kb_dir):
    meta = _read_meta(kb_dir)
    if meta.get('format_version') != FORMAT_VERSION or 'index_files' not in meta:
      raise KBError(f'{FileSystems.join(kb_dir, KB_FILE)}: a KB of format '
                    f'{meta.get("format_version")!r}, this code reads format {FORMAT_VERSION} '
                    '(surface keys folded by surface.py, alias candidates ranked and truncated '
                    'at build time); rebuild it with '
                    'python -m data_prep.build_kb.')
    for kind in kb_index.KINDS:
      for name in meta['index_files'][kind]:
        if not FileSystems.exists(FileSystems.join(kb_dir, name)):
          raise KBError(f'{FileSystems.join(kb_dir, name)}: listed in kb.json but missing; the '
                        'KB folder is incomplete.')
    index = kb_index.Index.open(kb_dir, meta['index_files'], meta['index_shards'],
                                version=user_cache.content_key(meta))
    kb = cls(index, meta)
    for what, kind, expected in (('entities', 'entities', meta.get('num_entities')),
                                 ('alias keys', 'aliases', meta.get('num_alias_keys'))):
      n = kb._index.count(kind)  # pylint: disable=protected-access
      if expected is not None and n != expected:
        raise KBError(f'{kb_dir}: {n} {what} in the index but kb.json says {expected}; the KB '
                      'folder is inconsistent, rebuild it.')
    return kb

  def entity(self, qid):
    entity = self._entity_cache.get(qid)
    if entity is None:
      value = self._index.entity_value(qid)
      if value is None:
        raise KeyError(f'entity {qid!r} is not in the knowledge base '
                       f'({self.meta.get("source", "in memory")})') from None
      if len(self._entity_cache) >= _ENTITY_CACHE_SIZE:
        self._entity_cache.clear()   # bounded: a worker sees millions of entities over a job
      entity = self._entity_cache[qid] = kb_index.decode_entity(qid, value)
    return entity

  def lookup(self, text):
    """AliasHits of the entities with an alias equal to `text` once normalised, most sitelinks
    first (ties: the smaller Q-number), as the alias index stores them: the build kept at most
    kb.json's max_candidates_per_alias (0: all). No entity is decoded."""
    return self.lookup_with_mass(text)[0]

  def alias_mass(self, text):
    """Sum of (sitelinks + 1) over every entity with an alias equal to `text` once normalised,
    the ones the build dropped included: the linker's prior denominator."""
    return self.lookup_with_mass(text)[1]

  def lookup_with_mass(self, text):
    """(lookup(text), alias_mass(text)) from one read of the alias index (the linker needs
    both for each mention)."""
    alias = normalize_alias(text)
    found = self._index.candidates(alias)
    hits = [types.AliasHit(q, quality, alias, sitelinks) for q, quality, sitelinks in found.kept]
    return hits, sum(h.sitelinks + 1 for h in hits) + found.dropped_mass

  def surface_prefixes(self, joined):
    return self._index.surface_prefixes(joined)

  def ids(self):
    return self._index.entity_ids()

  def __len__(self):
    return self._index.count('entities')

  def __contains__(self, qid):
    return self._index.entity_value(qid) is not None


qid_number = kb_index.qid_number


def _read_meta(kb_dir):
  path = FileSystems.join(kb_dir, KB_FILE)
  if not FileSystems.exists(path):
    raise KBError(f'{path} not found: {kb_dir} is not a finished knowledge base '
                  '(python -m data_prep.build_kb writes kb.json last).')
  with FileSystems.open(path) as f:
    try:
      meta = json.loads(f.read().decode('utf-8'))
    except ValueError as e:   # JSON or UTF-8
      raise KBError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(meta, dict):
    raise KBError(f'{path}: expected a JSON object, got {type(meta).__name__}.')
  for key in ('entity_files', 'alias_files', 'language'):
    if key not in meta:
      raise KBError(f'{path}: missing key {key!r}; rebuild the KB with data_prep.build_kb.')
  if 'index_files' in meta:
    _check_index_fields(meta, path)
  return meta


def _check_index_fields(meta, path):
  """index_files {kind: [one plain file name per shard]}, index_shards a positive int: the
  names are joined to the KB folder, so none may lead out of it."""
  shards, files = meta.get('index_shards'), meta['index_files']
  if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
    raise KBError(f'{path}: field index_shards must be a positive integer, got {shards!r}.')
  for kind in kb_index.KINDS:
    names = files.get(kind) if isinstance(files, dict) else None
    if not (isinstance(names, list) and len(names) == shards and all(
        isinstance(n, str) and n and posixpath.basename(n) == n and n not in ('.', '..')
        for n in names)):
      raise KBError(f'{path}: field index_files.{kind} must list {shards} file names '
                    f'inside the KB folder, got {names!r}.')


def check_kb_dir(kb_dir):
  """Raises KBError naming the path unless kb_dir holds a finished KB (cheap: reads kb.json)."""
  _read_meta(kb_dir)


_CACHE = {}
_CACHE_LOCK = threading.Lock()


def load_cached(kb_dir):
  """KnowledgeBase.load, once per process: every stage's DoFn on a worker shares one copy."""
  with _CACHE_LOCK:
    if kb_dir not in _CACHE:
      _CACHE[kb_dir] = KnowledgeBase.load(kb_dir)
    return _CACHE[kb_dir]
