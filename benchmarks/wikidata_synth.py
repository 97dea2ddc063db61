"""A Wikidata-shaped dump of N items, and alt-texts that mention them (benchmarks/i2e_scale.py).

Items carry what build_kb reads and what makes the real dump hard: labels in several
languages (sometimes only 'mul'), 0-3 English aliases, descriptions, Zipf-distributed
sitelinks, P31 claims (about 12% of non-visual kinds that the type filter drops) and a few
padding claims. Half of the disambiguation pages and genes are typed, as in the real dump,
by a subclass (CLASSES, three levels under the root; the gene classes form a P279 cycle),
which only build_kb's P279 closure drops; an item with no alias writes `"aliases": []`
every fifth time, as dumps before 2019 did. Names are drawn from a limited pool of words, so labels and aliases
collide the way 'Paris' and 'John Smith' do: the alias index has ambiguous keys.

Written as line-aligned gzip chunks (what data_prep.split_dump makes of the official
dump), in parallel over `workers` processes; deterministic in (n, seed).
"""
import gzip
import json
import multiprocessing
import os

import numpy as np

# (P31 class, share of items, description template, visual?)
KINDS = (('Q5', 0.34, 'person from {place}', True), ('Q515', 0.12, 'city in {place}', True),
         ('Q11424', 0.08, 'film by {person}', True), ('Q16521', 0.14, 'species of {word}', True),
         ('Q41176', 0.08, 'building in {place}', True), ('Q4830453', 0.12, 'company in {place}',
                                                          True),
         ('Q4167410', 0.04, 'Wikimedia disambiguation page', False),
         ('Q13442814', 0.05, 'scholarly article', False), ('Q4167836', 0.02,
                                                           'Wikimedia category', False),
         ('Q7187', 0.01, 'gene of {word}', False))
# Class items (Q-id, label, P279 parents), written first: a chain three levels under
# 'disambiguation page' and two gene classes that are each other's parent (a cycle).
CLASSES = (('Q900000001', 'name list page', ('Q4167410',)),
           ('Q900000002', 'surname list page', ('Q900000001',)),
           ('Q900000003', 'Welsh surname list page', ('Q900000002',)),
           ('Q900000011', 'gene family', ('Q7187', 'Q900000012')),
           ('Q900000012', 'gene subfamily', ('Q900000011',)))
SUBCLASS_OF = {'Q4167410': 'Q900000003', 'Q7187': 'Q900000012'}
LANGS = ('de', 'fr', 'es', 'it', 'nl', 'pl', 'ja')
COMMON = ('photo', 'of', 'the', 'at', 'in', 'my', 'new', 'old', 'best', 'view', 'with', 'and',
          'sunset', 'apple', 'beach', 'wallpaper', 'hd', 'free', 'summer', 'near', 'by')
_SYL = [a + b for a in ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v', 'z',
                        'br', 'dr', 'kr', 'st', 'tr', 'sh')
        for b in ('a', 'e', 'i', 'o', 'u', 'ai', 'ou', 'ea')]


def word_pool(n, seed):
  rng = np.random.default_rng(seed)
  words = set()
  while len(words) < n:
    k = rng.integers(2, 4)
    words.add(''.join(_SYL[i] for i in rng.integers(len(_SYL), size=k)).capitalize())
  return sorted(words)


def _item(i, rng, words):
  kind = rng.choice(len(KINDS), p=[k[1] for k in KINDS])
  klass, _, template, _ = KINDS[kind]
  # A popular head (2% of draws from 1,000 words) over a uniform tail: most aliases name a
  # few items, some name thousands at 1M items, like 'John Smith' or 'Paris'.
  w = lambda: words[int(rng.integers(1000 if rng.random() < 0.02 else len(words)))]
  label = f'{w()} {w()}' if rng.random() < 0.7 else w()
  description = template.format(place=w(), person=f'{w()} {w()}', word=w())
  aliases = []
  if ' ' in label and rng.random() < 0.5:
    aliases.append(label.split(' ')[-1])   # a surname or short name: ambiguous by design
  aliases += [f'{w()} {w()}' for _ in range(int(rng.integers(0, 3)))]
  qid = f'Q{1000 + i}'
  if klass in SUBCLASS_OF and i % 2:   # no draw: the other items stay as they were
    klass = SUBCLASS_OF[klass]
  labels = {} if rng.random() < 0.03 else {'en': {'language': 'en', 'value': label}}
  if not labels or rng.random() < 0.2:
    labels['mul'] = {'language': 'mul', 'value': label}
  for lang in rng.choice(LANGS, size=int(rng.integers(0, 4)), replace=False):
    labels[lang] = {'language': lang, 'value': label}
  sitelinks = min(int(rng.zipf(1.7)) - 1, 300)
  claim = lambda prop, value: _claim(qid, prop, value)
  return {'type': 'item', 'id': qid, 'labels': labels,
          'descriptions': {'en': {'language': 'en', 'value': description}},
          'aliases': ([] if not aliases and i % 5 == 0 else
                      {'en': [{'language': 'en', 'value': a} for a in aliases]}),
          'claims': {'P31': [claim('P31', klass)],
                     'P17': [claim('P17', f'Q{int(rng.integers(1, 200))}')],
                     'P373': [claim('P373', label)]},
          'sitelinks': {f'site{j}wiki': {'site': f'site{j}wiki', 'title': label, 'badges': []}
                        for j in range(sitelinks)}}


def _claim(qid, prop, value):
  return {'mainsnak': {'snaktype': 'value', 'property': prop,
                       'datavalue': {'value': {'id': value}, 'type': 'wikibase-entityid'}},
          'type': 'statement', 'rank': 'normal', 'id': f'{qid}${prop}'}


def class_items():
  return [{'type': 'item', 'id': qid, 'labels': {'en': {'language': 'en', 'value': label}},
           'descriptions': {}, 'aliases': {}, 'sitelinks': {},
           'claims': {'P279': [_claim(qid, 'P279', p) for p in parents]}}
          for qid, label, parents in CLASSES]


_WORDS = {}


def pool_for(n, seed):
  key = (max(2000, n // 5), seed)
  if key not in _WORDS:
    _WORDS[key] = word_pool(*key)
  return _WORDS[key]


def _write_chunk(args):
  path, start, stop, n, seed = args
  words = pool_for(n, seed)
  rng = np.random.default_rng([seed, start])
  with gzip.open(path, 'wb', compresslevel=1) as f:
    if start == 0:
      f.write(b'[\n')
      for item in class_items():
        f.write(json.dumps(item).encode('utf-8') + b',\n')
    for i in range(start, stop):
      line = json.dumps(_item(i, rng, words), ensure_ascii=False)
      f.write(line.encode('utf-8') + (b'\n' if i == n - 1 else b',\n'))
    if stop == n:
      f.write(b']\n')
  return os.path.getsize(path)


def write_dump(folder, n, seed=0, chunk_items=50_000, workers=2):
  """Writes chunk-NNNNN.json.gz files of `n` items into `folder`; returns their glob."""
  os.makedirs(folder, exist_ok=True)
  jobs = [(os.path.join(folder, f'chunk-{k:05d}.json.gz'), s, min(s + chunk_items, n), n, seed)
          for k, s in enumerate(range(0, n, chunk_items))]
  with multiprocessing.get_context('spawn').Pool(workers) as pool:
    sizes = pool.map(_write_chunk, jobs)
  return os.path.join(folder, 'chunk-*.json.gz'), sum(sizes)


def alt_texts(kb, n, seed=0, words=None):
  """`n` alt-texts naming 1-3 KB entities (by label or alias, popular ones more often) among
  common words, some of which are also names."""
  rng = np.random.default_rng([seed, 7])
  ids = kb.ids()
  texts = []
  for _ in range(n):
    parts = [COMMON[i] for i in rng.integers(len(COMMON), size=int(rng.integers(2, 6)))]
    for _ in range(int(rng.integers(1, 4))):
      e = kb.entity(ids[int(rng.zipf(1.2)) % len(ids)])
      forms = (e.label,) + e.aliases
      parts.insert(int(rng.integers(len(parts) + 1)), forms[int(rng.integers(len(forms)))])
    if words is not None and rng.random() < 0.3:
      parts.append(words[int(rng.integers(len(words)))].lower())
    texts.append(' '.join(parts))
  return texts
