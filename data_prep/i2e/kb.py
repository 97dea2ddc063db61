"""The knowledge base's format, and the in-memory knowledge base that mention finding and
linking use. wikidata.py builds one from a dump on Beam (python -m data_prep.build_kb).

Files, in KB_DIR:
  entities-XXXXX-of-YYYYY.parquet  id (Q-id), label, description, aliases (list), sitelinks
  aliases-XXXXX-of-YYYYY.parquet   alias (normalize_alias), entity_id, quality (1.0 label,
                                   0.8 alias)
  dead_letter.jsonl                one JSON per malformed line: stage, reason, key, source, detail
  kb.json                          language, counts, file lists; written last, so a KB_DIR
                                   without it is an interrupted build, refused by `load`.
"""
import json
import re
import threading
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import types

KB_FILE = 'kb.json'
DEAD_LETTER_FILE = 'dead_letter.jsonl'
ENTITY_PREFIX = 'entities'
ALIAS_PREFIX = 'aliases'
LABEL_QUALITY = 1.0
ALIAS_QUALITY = 0.8
FORMAT_VERSION = 1

ENTITY_SCHEMA = pa.schema([('id', pa.string()), ('label', pa.string()),
                           ('description', pa.string()), ('aliases', pa.list_(pa.string())),
                           ('sitelinks', pa.int64())])
ALIAS_SCHEMA = pa.schema([('alias', pa.string()), ('entity_id', pa.string()),
                          ('quality', pa.float64())])

_WS = re.compile(r'\s+')


class KBError(ValueError):
  """A KB folder or dump that cannot be used as asked."""


def normalize_alias(text):
  """NFKC + casefold + collapsed whitespace: the key of the alias index."""
  text = unicodedata.normalize('NFKC', unicodedata.normalize('NFKC', text).casefold())
  return _WS.sub(' ', text).strip()



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



def write_small_kb(kb_dir, entities, language='en', source='in memory'):
  """Writes a one-shard KB folder from Entities without Beam (tests, benchmarks, small demos)."""
  entities = sorted(entities, key=lambda e: e.id)
  rows = [r for e in entities for r in alias_rows(e)]
  files = {}
  for prefix, schema, table in ((ENTITY_PREFIX, ENTITY_SCHEMA, [entity_row(e) for e in entities]),
                                (ALIAS_PREFIX, ALIAS_SCHEMA, rows)):
    files[prefix] = f'{prefix}-00000-of-00001.parquet'
    with FileSystems.create(FileSystems.join(kb_dir, files[prefix])) as f:
      pq.write_table(pa.Table.from_pylist(table, schema=schema), f)
  meta = dict(language=language, fallback_languages=[], source=source,
              format_version=FORMAT_VERSION, num_entities=len(entities), num_aliases=len(rows),
              skipped={}, dead_letter={}, entity_files=[files[ENTITY_PREFIX]],
              alias_files=[files[ALIAS_PREFIX]])
  with FileSystems.create(FileSystems.join(kb_dir, KB_FILE)) as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True).encode('utf-8'))
  return meta


# ----------------------------------------------------------------------------- loading


class KnowledgeBase:
  """Entities by Q-id and the alias index, in memory (a side input sized by the entity count)."""

  def __init__(self, entities, meta=None, alias_index_rows=None):
    """entities: Entity iterable; alias_index_rows: alias-table rows (default: from entities)."""
    self.meta = dict(meta or {})
    self._entities = {e.id: e for e in entities}
    if alias_index_rows is None:
      alias_index_rows = (r for e in self._entities.values() for r in alias_rows(e))
    index = {}
    for row in alias_index_rows:
      index.setdefault(row['alias'], []).append(
          types.AliasHit(row['entity_id'], float(row['quality']), row['alias']))
    self._index = {a: tuple(sorted(h, key=lambda x: (-x.quality, x.entity_id)))
                   for a, h in index.items()}

  @classmethod
  def load(cls, kb_dir):
    meta = _read_meta(kb_dir)
    entities, rows = [], []
    for name in meta['entity_files']:
      table = _read_parquet(FileSystems.join(kb_dir, name), ENTITY_SCHEMA.names)
      for row in table.to_pylist():
        entities.append(types.Entity(id=row['id'], label=row['label'],
                                     description=row['description'] or '',
                                     aliases=tuple(row['aliases'] or ()),
                                     sitelinks=int(row['sitelinks'] or 0)))
    for name in meta['alias_files']:
      rows.extend(_read_parquet(FileSystems.join(kb_dir, name), ALIAS_SCHEMA.names).to_pylist())
    kb = cls(entities, meta, rows)
    for what, n, expected in (('entities', len(kb), meta.get('num_entities')),
                              ('aliases', len(rows), meta.get('num_aliases'))):
      if expected is not None and n != expected:
        raise KBError(f'{kb_dir}: {n} {what} in the Parquet files but kb.json says {expected}; '
                      'the KB folder is inconsistent, rebuild it.')
    unknown = sorted({r['entity_id'] for r in rows} - set(kb._entities))[:5]
    if unknown:
      raise KBError(f'{kb_dir}: the alias index names entities absent from the entity table, '
                    f'e.g. {unknown}; rebuild the KB.')
    return kb

  def entity(self, qid):
    try:
      return self._entities[qid]
    except KeyError:
      raise KeyError(f'entity {qid!r} is not in the knowledge base '
                     f'({self.meta.get("source", "in memory")})') from None

  def lookup(self, text):
    """AliasHits of every entity with an alias equal to `text` once normalised; best first."""
    return list(self._index.get(normalize_alias(text), ()))

  def alias_items(self):
    for alias, hits in self._index.items():
      for hit in hits:
        yield alias, hit.entity_id

  def aliases(self):
    """The distinct normalised aliases (the keys of the alias index)."""
    return self._index.keys()

  def surface_forms(self):
    """Distinct lower-cased labels and aliases as written, plus the normalised aliases: the
    PhraseMatcher's patterns. (Its LOWER attribute lower-cases text but does not NFKC/casefold
    it, so 'Straße' in a text needs the pattern 'straße' as well as the index key 'strasse'.)"""
    forms = set(self._index)
    for e in self._entities.values():
      forms.update(f.lower() for f in (e.label,) + e.aliases)
    return forms

  def ids(self):
    return sorted(self._entities)

  def __len__(self):
    return len(self._entities)

  def __contains__(self, qid):
    return qid in self._entities


def _read_meta(kb_dir):
  path = FileSystems.join(kb_dir, KB_FILE)
  if not FileSystems.exists(path):
    raise KBError(f'{path} not found: {kb_dir} is not a finished knowledge base '
                  '(python -m data_prep.build_kb writes kb.json last).')
  with FileSystems.open(path) as f:
    meta = json.loads(f.read().decode('utf-8'))
  for key in ('entity_files', 'alias_files', 'language'):
    if key not in meta:
      raise KBError(f'{path}: missing key {key!r}; rebuild the KB with data_prep.build_kb.')
  return meta


def check_kb_dir(kb_dir):
  """Raises KBError naming the path unless kb_dir holds a finished KB (cheap: reads kb.json)."""
  _read_meta(kb_dir)


def _read_parquet(path, columns):
  if not FileSystems.exists(path):
    raise KBError(f'{path}: listed in kb.json but missing; the KB folder is incomplete.')
  with FileSystems.open(path) as f:
    table = pq.read_table(pa.BufferReader(f.read()))
  missing = [c for c in columns if c not in table.column_names]
  if missing:
    raise KBError(f'{path}: missing column(s) {missing}; expected {list(columns)}.')
  return table.select(list(columns))


_CACHE = {}
_CACHE_LOCK = threading.Lock()


def load_cached(kb_dir):
  """KnowledgeBase.load, once per process: every stage's DoFn on a worker shares one copy."""
  with _CACHE_LOCK:
    if kb_dir not in _CACHE:
      _CACHE[kb_dir] = KnowledgeBase.load(kb_dir)
    return _CACHE[kb_dir]
