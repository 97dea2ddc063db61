"""The demo world's knowledge base and the Wikidata dump it is written as.

Drawable entities first (same index as in the world), then KB-only ones: places and
photographers. Ambiguous aliases, which the linker and CLIP must resolve, come two ways:
  - some drawable entities get a nickname, and a few nicknames are shared with a KB-only
    entity (regimes 'prior' and 'coherence': the text can tell them apart);
  - sense groups: 2 or 3 drawable entities of different shapes and colours share one name
    as an alias (regime 'senses'), like Paris the city and Paris of Troy. All senses are
    drawn; only the image can tell which one an alt-text means.
"""
import dataclasses
import gzip
import json
import os

import numpy as np

from data_prep.demo_world import world as world_lib

PLACE_KINDS = ('Harbour', 'Market', 'Museum', 'Park', 'Station', 'Zoo', 'Festival')
NICKNAME_FRAC = 0.5   # drawable entities with a nickname alias
SENSE_FRAC = 0.4      # drawable entities (without a nickname) in a sense group
_LANGS = ('en de fr es it nl pl pt ru ja zh sv uk ca no fi cs hu ko fa id tr ar he ro da sr '
          'bg eu vi ms eo lt sk sl et hr gl el hi').split()
SITES = tuple(f'{lang}{project}' for project in ('wiki', 'wikiquote', 'wikivoyage', 'wikinews')
              for lang in _LANGS)


@dataclasses.dataclass
class KBEntity:
  qid: str
  label: str
  description: str
  aliases: list
  sitelinks: int
  kind: str              # 'drawable' | 'place' | 'person'


def make_kb(rng, world, labels):
  """(list of KBEntity, {drawable index: 'prior' | 'coherence' | 'senses'}): the regime of
  each drawable entity whose alias (aliases[0]) is ambiguous."""
  c = len(world.names)
  n_places = n_people = max(2, c // 10)
  n_nick, n_ambiguous = int(round(NICKNAME_FRAC * c)), max(1, c // 20)
  groups = _sense_group_sizes(min(int(round(SENSE_FRAC * c)), c - n_nick))
  taken = {n.lower() for n in world.names} | _vocabulary()
  words = [w for w in world_lib.make_names(rng, 2 * c + 6 * n_places + 10)
           if w.lower() not in taken]
  need = n_nick + 2 * n_places + 2 * n_people + len(groups)
  if len(words) < need:
    raise RuntimeError(f'demo_world.web_kb: {len(words)} fresh names for {need} KB words.')
  nicks, senses, words = words[:n_nick], words[n_nick:n_nick + len(groups)], words[
      n_nick + len(groups):]
  counts = np.bincount(np.concatenate(labels), minlength=c)
  links = np.clip(np.round(counts * rng.uniform(0.5, 2.0, c)), 1, len(SITES)).astype(int)
  qids = _fresh_qids(rng, set(world.qids), 2 * n_places + n_people)
  with_nick = rng.choice(c, n_nick, replace=False)
  kb = [KBEntity(world.qids[i], world.names[i], world.descriptions[i], [], int(links[i]),
                 'drawable') for i in range(c)]
  for i, nick in zip(with_nick, nicks):
    kb[i].aliases.append(nick)
  for k in range(n_places):
    kind = PLACE_KINDS[rng.integers(len(PLACE_KINDS))]
    kb.append(KBEntity(qids[k], f'{words[2 * k]} {kind}', f'a {kind.lower()} in '
                       f'{words[2 * k + 1]}', [], int(rng.integers(1, len(SITES))), 'place'))
  words = words[2 * n_places:]
  for k in range(n_people):
    kb.append(KBEntity(qids[n_places + k], f'{words[2 * k]} {words[2 * k + 1]}',
                       'a photographer', [], int(rng.integers(1, 40)), 'person'))
  regimes = _share_nicknames(rng, kb, with_nick[:n_ambiguous], c)
  pool = [int(i) for i in rng.permutation(np.setdiff1d(np.arange(c), with_nick))]
  for size, name in zip(groups, senses):
    for i in _sense_group(pool, size, world.combos):
      kb[i].aliases.append(name)
      regimes[i] = 'senses'
  return kb, regimes


def _sense_group(pool, size, combos):
  """Takes up to `size` entities from `pool` that differ in shape and in colour: the senses of
  a real shared name look different too (Paris the city, Paris of Troy)."""
  group = []
  for i in list(pool):
    if len(group) == size:
      break
    if all(combos[i][0] != combos[j][0] and combos[i][1] != combos[j][1] for j in group):
      group.append(i)
      pool.remove(i)
  return group


def _sense_group_sizes(members):
  """Sizes of groups 2, 2, 3, 2, 2, 3, ... covering at most `members` entities."""
  sizes = []
  while True:
    size = 3 if len(sizes) % 3 == 2 else 2
    if sum(sizes) + size > members:
      return sizes if sum(sizes) + 2 > members else sizes + [2]
    sizes.append(size)


def _share_nicknames(rng, kb, drawables, c):
  """Gives each of `drawables`' nickname to a distinct KB-only entity too; sets the prior."""
  others = rng.choice(np.arange(c, len(kb)), len(drawables), replace=False)
  regimes = {}
  for k, (a, p) in enumerate(zip(drawables, others)):
    kb[p].aliases.append(kb[a].aliases[0])
    if k % 2 == 0:  # The prior alone resolves it.
      regimes[int(a)] = 'prior'
      kb[a].sitelinks = max(kb[a].sitelinks, 8)
      kb[p].sitelinks = kb[a].sitelinks // 4
    else:  # The KB-only one is a bit more popular: only coherence can pick the drawable one.
      regimes[int(a)] = 'coherence'
      kb[p].sitelinks = min(len(SITES), int(kb[a].sitelinks * 1.25) + 1)
  return regimes


def _vocabulary():
  """Words the alt-texts use around names: no KB name may equal one of them."""
  words = {w for pool in world_lib.WORDS.values() for w in pool}
  words |= set(world_lib.SHAPES) | set(world_lib.COLORS) | {k.lower() for k in PLACE_KINDS}
  return words


def _fresh_qids(rng, used, n):
  out = []
  while len(out) < n:
    qid = f'Q{1000 + int(rng.integers(10_000_000))}'
    if qid not in used:
      used.add(qid)
      out.append(qid)
  return out


def write_dump(rng, path, kb):
  """JSON array, one entity per line, as `latest-all.json`; plus entries readers must skip,
  and at the end (drawn without `rng`, so every other byte of the world stays the same) the
  non-visual items that a type filter must drop."""
  records = [_item(e) for e in kb] + _skipped_entries()
  order = rng.permutation(len(records))
  lines = [json.dumps(records[i], ensure_ascii=False) for i in order]
  lines += [json.dumps(r, ensure_ascii=False) for r in non_visual_items(kb)]
  os.makedirs(os.path.dirname(path))
  with open(path, 'wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', filename='',
                                              mtime=0) as f:
    f.write(('[\n' + ',\n'.join(lines) + '\n]\n').encode('utf-8'))


def _text(value, lang='en'):
  return {'language': lang, 'value': value}


# Wikidata's classes of items that are never photographed, as the dump marks them (P31), with
# the label each gets from a drawable entity's name: a type filter must drop them, or the
# disambiguation page 'Lequyl', with its many sitelinks, would out-rank the entity 'Lequyl'.
NON_VISUAL = (('Q4167410', '{}', 'Wikimedia disambiguation page', 40),
              ('Q4167836', 'Category:{}', 'Wikimedia category', 2),
              ('Q13442814', '{} and its kin', 'scholarly article', 0),
              ('Q11266439', 'Template:{}', 'Wikimedia template', 1),
              ('Q13406463', 'list of {} sightings', 'Wikimedia list article', 3))
NON_VISUAL_EVERY = 10   # every 10th drawable entity gets one of each


def non_visual_items(kb):
  """Dump records of the non-visual items (Q-ids below Q1000 never collide with entities)."""
  drawable = [e for e in kb if e.kind == 'drawable'][::NON_VISUAL_EVERY]
  out = []
  for i, e in enumerate(drawable[:100]):
    for k, (klass, label, description, sitelinks) in enumerate(NON_VISUAL):
      qid = f'Q{400 + len(NON_VISUAL) * i + k}'
      out.append(_record(qid, label.format(e.label), description, [], sitelinks, klass))
  return out


def _item(e):
  # Class ids below 1000: entity ids are >= Q1000, so they never collide.
  klass = {'drawable': 'Q100', 'place': 'Q200', 'person': 'Q5'}[e.kind]
  return _record(e.qid, e.label, e.description, e.aliases, e.sitelinks, klass)


def _record(qid, label, description, aliases, sitelinks, klass):
  claim = {'mainsnak': {'snaktype': 'value', 'property': 'P31', 'datatype': 'wikibase-item',
                        'datavalue': {'type': 'wikibase-entityid', 'value': {
                            'entity-type': 'item', 'numeric-id': int(klass[1:]), 'id': klass}}},
           'type': 'statement', 'id': f'{qid}$P31', 'rank': 'normal'}
  return {'type': 'item', 'id': qid, 'title': qid, 'ns': 0,
          'labels': {'en': _text(label), 'de': _text(label, 'de')},
          'descriptions': {'en': _text(description)},
          'aliases': {'en': [_text(a) for a in aliases]} if aliases else {},
          'claims': {'P31': [claim]},
          'sitelinks': {s: {'site': s, 'title': label, 'badges': []}
                        for s in SITES[:sitelinks]},
          'modified': '2024-01-01T00:00:00Z'}


def _skipped_entries():
  """A property, a lexeme and an item with no English label: not entities of an 'en' KB."""
  return [
      {'type': 'property', 'id': 'P31', 'datatype': 'wikibase-item',
       'labels': {'en': _text('instance of')}, 'descriptions': {}, 'aliases': {}, 'claims': {}},
      {'type': 'lexeme', 'id': 'L7', 'lemmas': {'en': _text('photo')}, 'lexicalCategory': 'Q1084',
       'language': 'Q1860', 'claims': {}, 'forms': [], 'senses': []},
      {'type': 'item', 'id': 'Q999', 'labels': {'de': _text('Nur Deutsch', 'de')},
       'descriptions': {}, 'aliases': {}, 'claims': {}, 'sitelinks': {}},
  ]
