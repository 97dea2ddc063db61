"""The knowledge base as memory-mapped tries: opened by every worker process, never loaded.

Three kinds of marisa-trie file, each cut into `index_shards` shards:

  entities-SSSSS-of-NNNNN.marisa  BytesTrie  Q-id -> JSON [label, description, aliases, sitelinks]
  aliases-SSSSS-of-NNNNN.marisa   BytesTrie  normalised alias -> b'Q-id<TAB>quality<TAB>sitelinks',
                                             one value per entity (the alias index)
  surface-SSSSS-of-NNNNN.marisa   BytesTrie  surface keys (surface.py): the folded tokens of
                                             every label and alias joined by SEP, and the
                                             character keys of forms in no-space scripts ->
                                             how each form is written (FORM_*; what the mention
                                             finder's case rules read)

Why marisa-trie (benchmarks/kb_index.py measures it against LMDB): the files are a few times
smaller than the alias table itself (keys share prefixes), `mmap` opens them in microseconds,
and every SDK process of a worker VM reads one copy through the page cache, as Scio's Sparkey
side inputs do. A prefix query (`Trie.prefixes`) returns every surface key that starts an
n-gram in one call, which is what replaces spaCy's PhraseMatcher.

Shards: entities and aliases by the CRC32 of their key, token keys by the CRC32 of their
first token and character keys by their first character, so that every key a prefix walk
can reach from one start is in one shard.
Each shard is built by one worker from its own keys, so no machine ever holds the whole KB.
"""
import json
import os
import tempfile
import threading
import zlib

import marisa_trie
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import surface, types
from mofi_jax import user_cache

KINDS = ('entities', 'aliases', 'surface')
SEP = surface.SEP
# How a KB form behind a surface key is written: 'S' + its case key (surface.is_case_sensitive:
# 'LA' matches only 'LA'), 'L' in lower case ('adidas'), 'T' otherwise ('Paris'); 'C' for every
# form of a concept, an item whose label is in lower case (Wikidata writes common nouns so:
# 'dog', whose German label is 'Hund').
FORM_STRICT, FORM_LOWER, FORM_OTHER, FORM_CONCEPT = b'S', b'L', b'T', b'C'
SUFFIX = '.marisa'
DEFAULT_SHARDS = 8
_TRIE_TYPE = dict(entities=marisa_trie.BytesTrie, aliases=marisa_trie.BytesTrie,
                  surface=marisa_trie.BytesTrie)


def shard_of(key, num_shards):
  return zlib.crc32(key.encode('utf-8')) % num_shards


def file_name(kind, shard, num_shards):
  return f'{kind}-{shard:05d}-of-{num_shards:05d}{SUFFIX}'


# ----------------------------------------------------------------------------- records


def entity_value(entity):
  return json.dumps([entity.label, entity.description, list(entity.aliases), entity.sitelinks],
                    ensure_ascii=False, separators=(',', ':')).encode('utf-8')


def decode_entity(qid, value):
  label, description, aliases, sitelinks = json.loads(value)
  return types.Entity(id=qid, label=label, description=description, aliases=tuple(aliases),
                      sitelinks=int(sitelinks))


def alias_value(entity_id, quality, sitelinks):
  return f'{entity_id}\t{quality!r}\t{int(sitelinks)}'.encode('utf-8')


def decode_alias(value):
  """-> (entity_id, quality, sitelinks)."""
  entity_id, quality, sitelinks = value.decode('utf-8').split('\t')
  return entity_id, float(quality), int(sitelinks)


def form_value(form, concept=False):
  """The surface-index value recording how `form` is written."""
  if concept:
    return FORM_CONCEPT
  if surface.is_case_sensitive(form):
    return FORM_STRICT + surface.case_key(form).encode('utf-8')
  return FORM_LOWER if surface.is_lower(form) else FORM_OTHER


def surface_items(entity):
  """[(surface key, form value)] of an entity's label and aliases, deduplicated."""
  items = set()
  concept = surface.is_lower(entity.label)
  for form in (entity.label,) + tuple(entity.aliases):
    value = form_value(form, concept)
    for key in (surface.token_key(form), surface.char_key(form)):
      if key:
        items.add((key, value))
  return sorted(items)


def surface_shard(key, num_shards):
  first = key[:2] if key.startswith(surface.CHAR_PREFIX) else key.split(SEP, 1)[0]
  return shard_of(first, num_shards)


def index_items(entity, alias_rows, num_shards):
  """(kind, shard, key, value) of one entity across the three kinds of trie."""
  yield 'entities', shard_of(entity.id, num_shards), entity.id, entity_value(entity)
  for row in alias_rows:
    yield ('aliases', shard_of(row['alias'], num_shards), row['alias'],
           alias_value(row['entity_id'], row['quality'], entity.sitelinks))
  for key, value in surface_items(entity):
    yield 'surface', surface_shard(key, num_shards), key, value


def build_trie(kind, items):
  """items: (key, value) pairs."""
  return _TRIE_TYPE[kind](items)


def save_trie(trie, path):
  """Saves to any Beam filesystem (marisa writes local files only)."""
  if '://' not in path:
    tmp = f'{path}.tmp-{os.getpid()}'
    trie.save(tmp)
    os.replace(tmp, path)
    return
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, 'trie')
    trie.save(local)
    with open(local, 'rb') as src, FileSystems.create(path) as dst:
      while chunk := src.read(1 << 24):
        dst.write(chunk)


# ----------------------------------------------------------------------------- opening

_LOCAL_LOCK = threading.Lock()


def local_copy(path, cache_dir=None, version=''):
  """`path` itself when local; else a copy in the user's private cache (user_cache.py), made
  once per content, so that every process of a worker VM maps the same file. The copy's
  name hashes the remote path, size, modification time and `version` (the KB passes a hash
  of its kb.json, written last by every build, for filesystems that report no time): a
  rebuilt KB at the same path is a new copy, never a stale one; and no other user can
  plant the file that gets mapped."""
  if '://' not in path:
    return path
  meta = FileSystems.match([path])[0].metadata_list
  if not meta:
    raise FileNotFoundError(f'{path}: KB index file not found.')
  key = user_cache.content_key(path, meta[0].size_in_bytes, meta[0].last_updated_in_seconds,
                               version)
  folder = cache_dir or user_cache.folder('kb')
  local = os.path.join(folder, f'{key[:24]}-{os.path.basename(path)}')
  with _LOCAL_LOCK:
    if not os.path.exists(local):
      def copy(dst):
        with FileSystems.open(path) as src:
          while chunk := src.read(1 << 24):
            dst.write(chunk)
      user_cache.write_atomic(local, copy)
  return local


class Index:
  """The three sharded tries of a KB: mapped from files (`open`) or built in memory."""

  def __init__(self, tries, num_shards):
    self._tries, self.num_shards = tries, num_shards   # {kind: [trie per shard]}

  @classmethod
  def open(cls, kb_dir, files, num_shards, version=''):
    """files: {kind: [file name per shard]} as kb.json lists them; version: local_copy's."""
    tries = {}
    for kind in KINDS:
      tries[kind] = [_TRIE_TYPE[kind]().mmap(local_copy(FileSystems.join(kb_dir, name),
                                                        version=version))
                     for name in files[kind]]
    return cls(tries, num_shards)

  @classmethod
  def from_items(cls, items, num_shards):
    """Built in memory from index_items' output (tests, small KBs)."""
    grouped = {(kind, s): [] for kind in KINDS for s in range(num_shards)}
    for kind, shard, key, value in items:
      grouped[kind, shard].append((key, value))
    return cls({kind: [build_trie(kind, grouped[kind, s]) for s in range(num_shards)]
                for kind in KINDS}, num_shards)

  def entity_value(self, qid):
    values = self._tries['entities'][shard_of(qid, self.num_shards)].get(qid)
    return values[0] if values else None

  def alias_values(self, alias):
    return self._tries['aliases'][shard_of(alias, self.num_shards)].get(alias) or []

  def surface_prefixes(self, joined):
    """{surface key: [form values]} of the keys that are prefixes of `joined` (a SEP-joined
    token run, or CHAR_PREFIX + characters), token-aligned for token keys."""
    trie = self._tries['surface'][surface_shard(joined, self.num_shards)]
    chars = joined.startswith(surface.CHAR_PREFIX)
    return {p: trie[p] for p in trie.prefixes(joined)
            if chars or len(p) == len(joined) or joined[len(p)] == SEP}

  def count(self, kind):
    return sum(len(t) for t in self._tries[kind])

  def entity_ids(self):
    return sorted(k for t in self._tries['entities'] for k in t.keys())
