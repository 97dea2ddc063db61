r"""Writes kb_dump.json and alt_texts.jsonl of this folder from the hand-written sources.

  python benchmarks/data/i2e_web_text/make_data.py

entities.txt: one entity a line, `qid | P31 classes | sitelinks | labels | aliases | description`
(README.md). texts_*.txt: one alt-text a line, `lang|kind|text`, the gold mentions marked in the
text as [[surface|Qid]]; the marks are removed and their character offsets into the raw text
(HTML entities and tags left as written) become `gold`. Deterministic: rerunning rewrites the
same bytes.
"""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
LANGUAGES = ('en', 'de', 'fr', 'es', 'it', 'ja')
LATIN_DEFAULT = ('de', 'fr', 'es', 'it')   # labels default to the English one
KINDS = ('stock', 'product', 'sentence', 'filename', 'empty', 'no_entity')
# Sitelink keys: real wiki codes x project families, enough for 300 distinct sites.
_WIKIS = ('en de fr es it ja nl pl pt ru sv uk zh ar ca cs da fi he hu id ko no ro sr tr vi fa '
          'el bg eu gl hr hy ka kk lt lv ms sk sl ta th ur uz be bn et eo hi is la mk mn '
          'sq sw tl cy ga af az').split()
_FAMILIES = ('wiki', 'wikiquote', 'wikivoyage', 'wikisource', 'wikinews')
_MARK = re.compile(r'\[\[([^|\]]*)\|(Q[0-9]+)\]\]')


def _pairs(field):
  """'en=a/b;de=c' -> {'en': ['a', 'b'], 'de': ['c']}."""
  out = {}
  for part in filter(None, (p.strip() for p in field.split(';'))):
    lang, values = part.split('=', 1)
    out.setdefault(lang.strip(), []).extend(v.strip() for v in values.split('/') if v.strip())
  return out


def read_entities(path=os.path.join(HERE, 'entities.txt')):
  entities = []
  for line in open(path, encoding='utf-8'):
    if not line.strip() or line.startswith('#'):
      continue
    qid, classes, sitelinks, labels, aliases, description = [f.strip()
                                                             for f in line.split('|', 5)]
    labels = {k: v[0] for k, v in _pairs(labels).items()}
    for lang in LATIN_DEFAULT:
      labels.setdefault(lang, labels['en'])
    entities.append(dict(id=qid, classes=[c for c in classes.split(',') if c],
                         sitelinks=int(sitelinks), labels=labels, aliases=_pairs(aliases),
                         description=description))
  return entities


def wikidata_item(e, pageid):
  """An entity in the dump's JSON shape (one line of latest-all.json)."""
  def mono(lang, value):
    return {'language': lang, 'value': value}
  claims = {'P31': [{
      'mainsnak': {'snaktype': 'value', 'property': 'P31', 'datatype': 'wikibase-item',
                   'datavalue': {'type': 'wikibase-entityid', 'value': {
                       'entity-type': 'item', 'numeric-id': int(c[1:]), 'id': c}}},
      'type': 'statement', 'id': f'{e["id"]}$p31-{i}', 'rank': 'normal'}
      for i, c in enumerate(e['classes'])]} if e['classes'] else {}
  sites = [w + f for f in _FAMILIES for w in _WIKIS][:e['sitelinks']]
  return {
      'type': 'item', 'id': e['id'], 'pageid': pageid, 'ns': 0, 'title': e['id'],
      'lastrevid': 2000000000 + pageid, 'modified': '2024-05-01T00:00:00Z',
      'labels': {k: mono(k, v) for k, v in sorted(e['labels'].items())},
      'descriptions': {'en': mono('en', e['description'])} if e['description'] else {},
      'aliases': {k: [mono(k, v) for v in vs] for k, vs in sorted(e['aliases'].items())},
      'claims': claims,
      'sitelinks': {s: {'site': s, 'title': e['labels']['en'], 'badges': []} for s in sites},
  }


def parse_marked(text):
  """'a [[b|Q1]] c' -> ('a b c', [{'start': 2, 'end': 3, 'text': 'b', 'entity_id': 'Q1'}])."""
  out, gold, pos = [], [], 0
  for m in _MARK.finditer(text):
    out.append(text[pos:m.start()])
    start = sum(map(len, out))
    out.append(m.group(1))
    gold.append(dict(start=start, end=start + len(m.group(1)), text=m.group(1),
                     entity_id=m.group(2)))
    pos = m.end()
  out.append(text[pos:])
  plain = ''.join(out)
  if '[[' in plain or ']]' in plain:
    raise ValueError(f'unparsed mark in {text!r}')
  return plain, gold


def read_texts():
  rows, counts = [], {}
  for name in ('texts_en.txt', 'texts_other.txt'):
    for line in open(os.path.join(HERE, name), encoding='utf-8'):
      line = line.rstrip('\n')
      if not line.strip() or line.startswith('#'):
        continue
      lang, kind, marked = line.split('|', 2)
      assert lang in LANGUAGES and kind in KINDS, line
      text, gold = parse_marked(marked)
      counts[lang] = counts.get(lang, 0) + 1
      rows.append(dict(id=f'{lang}-{counts[lang]:03d}', lang=lang, kind=kind, text=text,
                       gold=gold))
  return rows


def main():
  entities = read_entities()
  ids = [e['id'] for e in entities]
  assert len(ids) == len(set(ids)), 'duplicate Q-id'
  with open(os.path.join(HERE, 'kb_dump.json'), 'w', encoding='utf-8') as f:
    f.write('[\n')
    lines = [json.dumps(wikidata_item(e, i + 1), ensure_ascii=False, separators=(',', ':'))
             for i, e in enumerate(entities)]
    f.write(',\n'.join(lines) + '\n]\n')
  rows = read_texts()
  known = set(ids)
  for r in rows:
    for g in r['gold']:
      assert r['text'][g['start']:g['end']] == g['text'] and g['entity_id'] in known, (r, g)
  with open(os.path.join(HERE, 'alt_texts.jsonl'), 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  print(f'{len(entities)} entities, {len(rows)} alt-texts, '
        f'{sum(len(r["gold"]) for r in rows)} gold mentions')


if __name__ == '__main__':
  main()
