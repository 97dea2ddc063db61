"""The knowledge base as memory-mapped tries: opened by every worker process, never loaded.

Three kinds of marisa-trie file, each cut into `index_shards` shards:

  entities-SSSSS-of-NNNNN.marisa  BytesTrie  Q-id -> JSON [label, description, aliases, sitelinks]
  aliases-SSSSS-of-NNNNN.marisa   BytesTrie  normalised alias -> one value (the alias index):
                                             b'dropped<TAB>dropped mass' then, a line each, the
                                             kept candidates b'Q-id<TAB>quality<TAB>sitelinks'
                                             (alias_value; AliasCandidates)
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

The alias index is ranked and truncated at build time: an alias's candidates are kept most
sitelinks first (ties: the smaller Q-number), at most `max_candidates_per_alias` of them
(build_kb's flag; 0 keeps all), and the ones dropped leave their count and their summed
(sitelinks + 1), so that the linker's prior keeps its exact denominator ('John Smith' names
thousands of items; a lookup decodes the kept ones only).

Shards: entities and aliases by the CRC32 of their key, token keys by the CRC32 of their
first token and character keys by their first character, so that every key a prefix walk
can reach from one start is in one shard.
Each shard is built by one worker from its own keys, so no machine ever holds the whole KB.
"""
import collections
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
DEFAULT_MAX_CANDIDATES = 64
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


def qid_number(qid):
  return int(qid[1:]) if qid[1:].isdigit() else float('inf')


# One alias's candidates: `kept` (entity_id, quality, sitelinks) most sitelinks first (ties: the
# smaller Q-number), at most max_candidates_per_alias of them; `dropped` the number of the
# others and `dropped_mass` their summed (sitelinks + 1), the rest of the prior's denominator.
AliasCandidates = collections.namedtuple('AliasCandidates', 'kept dropped dropped_mass')
NO_CANDIDATES = AliasCandidates((), 0, 0)


def check_max_candidates(max_candidates):
  if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) or max_candidates < 0:
    raise ValueError(f'--max_candidates_per_alias must be an integer >= 0 (0 keeps every '
                     f'candidate), got {max_candidates!r}')
  return max_candidates


def _rank(candidate):
  entity_id, _, sitelinks = candidate
  return -sitelinks, qid_number(entity_id), entity_id


def merge_candidates(parts, max_candidates):
  """AliasCandidates of one alias from several (one per entity, or partial merges, in any
  order): the best `max_candidates` kept (0: all), the others counted into the remainder.
  The one ranking and truncation of the alias index; the result is independent of the order
  and grouping of `parts` (a Beam combiner merges them as it likes)."""
  kept, dropped, mass = [], 0, 0
  for part in parts:
    kept.extend(part.kept)
    dropped += part.dropped
    mass += part.dropped_mass
  kept.sort(key=_rank)
  if max_candidates and len(kept) > max_candidates:
    cut, kept = kept[max_candidates:], kept[:max_candidates]
    dropped += len(cut)
    mass += sum(sitelinks + 1 for _, _, sitelinks in cut)
  return AliasCandidates(tuple(kept), dropped, mass)


def entity_candidates(entity, alias_rows):
  """(alias, AliasCandidates of this entity alone) for each of its alias-index rows."""
  for row in alias_rows:
    yield row['alias'], AliasCandidates(
        ((row['entity_id'], row['quality'], int(entity.sitelinks)),), 0, 0)


def alias_value(candidates):
  """AliasCandidates -> the alias index's value (module docstring)."""
  lines = [f'{candidates.dropped}\t{candidates.dropped_mass}'] + [
      f'{entity_id}\t{quality!r}\t{int(sitelinks)}'
      for entity_id, quality, sitelinks in candidates.kept]
  return '\n'.join(lines).encode('utf-8')


def decode_alias(value):
  """The alias index's value -> AliasCandidates, kept in stored (ranked) order."""
  head, *lines = value.decode('utf-8').split('\n')
  dropped, mass = head.split('\t')
  kept = []
  for line in lines:
    entity_id, quality, sitelinks = line.split('\t')
    kept.append((entity_id, float(quality), int(sitelinks)))
  return AliasCandidates(tuple(kept), int(dropped), int(mass))


def alias_item(alias, candidates, num_shards):
  """(kind, shard, key, value) of one alias in the alias index."""
  return 'aliases', shard_of(alias, num_shards), alias, alias_value(candidates)


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


def entity_items(entity, num_shards):
  """(kind, shard, key, value) of one entity in the entities and surface tries (the alias
  index needs every entity of an alias first: merge_candidates)."""
  yield 'entities', shard_of(entity.id, num_shards), entity.id, entity_value(entity)
  for key, value in surface_items(entity):
    yield 'surface', surface_shard(key, num_shards), key, value


def index_items(entities_with_rows, num_shards, max_candidates):
  """(kind, shard, key, value) of every trie of a KB held in memory; entities_with_rows:
  (entity, its alias rows). The Beam writer (kb_write.py) does the same per alias with a
  combiner over merge_candidates."""
  by_alias = collections.defaultdict(list)
  for entity, alias_rows in entities_with_rows:
    yield from entity_items(entity, num_shards)
    for alias, candidates in entity_candidates(entity, alias_rows):
      by_alias[alias].append(candidates)
  for alias, parts in by_alias.items():
    yield alias_item(alias, merge_candidates(parts, max_candidates), num_shards)


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

  def candidates(self, alias):
    """AliasCandidates of a normalised alias (NO_CANDIDATES if absent)."""
    values = self._tries['aliases'][shard_of(alias, self.num_shards)].get(alias)
    return decode_alias(values[0]) if values else NO_CANDIDATES

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
