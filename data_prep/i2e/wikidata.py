"""Reading a Wikidata dump on Beam into a knowledge-base folder (the format of kb.py).

  python -m data_prep.build_kb --wikidata latest-all.json.bz2 --out KB_DIR [--languages en,de]

Input: the official dump layout (`latest-all.json`, `.json.bz2` or `.json.gz`): a JSON array with
one entity per line (`[`, then `{...},` lines, the last without the comma, then `]`), as one file
or as line-aligned chunks of it (data_prep/split_dump.py), given as a list of files or globs.
Beam's text reader decompresses by extension; each file is read by one worker. A single file's
lines are reshuffled before the JSON parsing (the expensive part); chunks are parsed where read.

Skipped and counted: non-item entities (properties, lexemes), items with no label in any
of the languages, items whose P31 (instance of) is a non-visual kind (`DEFAULT_EXCLUDED_TYPES`:
disambiguation pages, categories, scholarly articles, genes, ...; counted per kind as
'type:<kind>') and, with --min_sitelinks, obscure items. Items without P31 are kept and
counted ('untyped'). Malformed lines are dead-lettered and counted: every entity line of the
dump ends in exactly one of entities / skipped / dead_letter, and each outcome also goes to a
live Beam counter kb/<reason>. The 'mul' (multilingual) labels and aliases that Wikidata
introduced in 2024 are a fallback, since many items now carry their name only there.
The stage list of the build is kb_build.py; the KB folder itself is written by kb_write.py
(tables, mapped index, kb.json last).
"""
import json
import re

import apache_beam as beam
from data_prep.i2e import types
from data_prep.i2e.kb import entity_row

STAGE = 'kb'
FALLBACK_LANGUAGES = ('mul',)
SKIP_REASONS = ('not_item', 'no_label', 'few_sitelinks')
UNTYPED = 'untyped'
_WS = re.compile(r'\s+')
_QID = re.compile(r'Q[1-9][0-9]*\Z')


# ----------------------------------------------------------------------------- parsing one line


def is_qid(text):
  return isinstance(text, str) and _QID.match(text) is not None


class _Bad(Exception):
  def __init__(self, reason, detail, key=''):
    super().__init__(detail)
    self.reason, self.detail, self.key = reason, detail, key


def _texts(field, languages, name, key):
  """[value, ...] of a labels/descriptions/aliases field, in language order.

  Dumps before 2019 write an empty object as `[]` (PHP's empty array): read as no entries."""
  if field is None or field == []:
    return []
  if not isinstance(field, dict):
    raise _Bad('bad_field', f'{name} is a {type(field).__name__}, expected an object', key)
  out = []
  for lang in languages:
    entries = field.get(lang)
    if entries is None:
      continue
    for entry in entries if isinstance(entries, list) else [entries]:
      value = entry.get('value') if isinstance(entry, dict) else None
      if not isinstance(value, str):
        raise _Bad('bad_field', f'{name}.{lang} has no string "value"', key)
      if value.strip():
        out.append(_WS.sub(' ', value).strip())
  return out


# Kinds of item that are never the subject of a photograph: Wikimedia's own pages, scholarly
# works, and the gene, protein, chemical and name items bots created by the million. Items
# with any of these P31 (instance of) values are skipped as 'type:<reason>'. Given names are
# mostly typed by their gender class (male/female/unisex given name), and names' own
# disambiguation pages by 'human name disambiguation page': each is listed, so that the
# direct check catches them and each gets its own count.
DEFAULT_EXCLUDED_TYPES = {
    'Q4167410': 'disambiguation_page', 'Q22808320': 'human_name_disambiguation_page',
    'Q4167836': 'category', 'Q11266439': 'template',
    'Q13406463': 'list_article', 'Q15184295': 'module', 'Q14204246': 'project_page',
    'Q17362920': 'duplicated_page', 'Q21528878': 'redirect_page',
    'Q17633526': 'wikinews_article', 'Q13442814': 'scholarly_article', 'Q1266946': 'thesis',
    'Q7187': 'gene', 'Q277338': 'pseudogene', 'Q8054': 'protein',
    'Q11173': 'chemical_compound', 'Q101352': 'family_name', 'Q202444': 'given_name',
    'Q12308941': 'male_given_name', 'Q11879590': 'female_given_name',
    'Q3409032': 'unisex_given_name'}


def instance_of(claims, qid):
  """The P31 (instance of) item ids of an item's claims, deprecated statements left out."""
  return item_claims(claims, 'P31', qid)


def item_claims(claims, prop, qid):
  """The item ids that an item's `prop` statements name, deprecated statements left out."""
  if claims is None or claims == []:    # the dump writes an empty object as [] for some items
    return ()
  if not isinstance(claims, dict):
    raise _Bad('bad_claim', f'claims is a {type(claims).__name__}, expected an object', qid)
  statements = claims.get(prop) or []
  if not isinstance(statements, list):
    raise _Bad('bad_claim', f'claims.{prop} is not a list', qid)
  out = []
  for st in statements:
    snak = st.get('mainsnak') if isinstance(st, dict) else None
    if not isinstance(snak, dict):
      raise _Bad('bad_claim', f'a {prop} statement has no mainsnak object', qid)
    if st.get('rank') == 'deprecated' or snak.get('snaktype') != 'value':
      continue   # 'novalue' / 'somevalue' snaks name no class
    value = (snak.get('datavalue') or {}).get('value')
    if not isinstance(value, dict) or not isinstance(value.get('id'), str):
      raise _Bad('bad_claim', f'a {prop} value has no item "id"', qid)
    out.append(value['id'])
  return tuple(out)


def language_order(languages, fallback_languages=FALLBACK_LANGUAGES):
  """'en' or ('en', 'de', ...) -> the languages to read, in order, the fallbacks last."""
  languages = (languages,) if isinstance(languages, str) else tuple(languages)
  return languages + tuple(l for l in fallback_languages if l not in languages)


def parse_item(line, languages=('en',), fallback_languages=FALLBACK_LANGUAGES, min_sitelinks=0,
               excluded_types=None):
  """One dump line (bytes) -> (Entity, P31 ids), or None for the array brackets and blanks.

  `languages` (one code or a sequence, then `fallback_languages`) in order: the label is the
  first language's that has one, the description likewise; the other languages' labels and
  every language's aliases become aliases, deduplicated in that order. Entity keeps one label
  and one description, so a KB of several languages has the format of a KB of one.

  Raises _Bad(reason, detail, key) for lines that are not a wanted item with a label:
  reasons 'not_utf8', 'malformed_json', 'not_an_object', 'missing_field', 'bad_id',
  'bad_field', 'bad_claim' (dead letters) and 'not_item', 'no_label', 'few_sitelinks',
  'type:<reason>' of `excluded_types` {class Q-id: reason} (skipped, `is_skip`); any mapping
  with .get will do, such as the P279 closure of the roots (wikidata_classes.ClassKinds).
  """
  obj = _decode(line)
  if obj is None:
    return None
  qid = obj['id']
  if obj['type'] != 'item':
    raise _Bad('not_item', f'type {obj["type"]!r}', qid)
  if not is_qid(qid):
    raise _Bad('bad_id', f'item id {qid!r} is not a Q-number', qid)
  classes = instance_of(obj.get('claims'), qid)
  kinds = (excluded_types or {}).get   # a dict, or wikidata_classes.ClassKinds (P279-closed)
  excluded = sorted({kinds(c) for c in classes} - {None})
  if excluded:
    raise _Bad(f'type:{excluded[0]}', f'instance of {list(classes)}', qid)
  languages = language_order(languages, fallback_languages)
  labels = _texts(obj.get('labels'), languages, 'labels', qid)
  if not labels:
    raise _Bad('no_label', f'no label in {"/".join(languages)}', qid)
  descriptions = _texts(obj.get('descriptions'), languages, 'descriptions', qid)
  aliases = []
  for alias in labels[1:] + _texts(obj.get('aliases'), languages, 'aliases', qid):
    if alias != labels[0] and alias not in aliases:
      aliases.append(alias)
  sitelinks = obj.get('sitelinks') or {}
  if not isinstance(sitelinks, dict):
    raise _Bad('bad_field', 'sitelinks is not an object', qid)
  if len(sitelinks) < min_sitelinks:
    raise _Bad('few_sitelinks', f'{len(sitelinks)} sitelinks < {min_sitelinks}', qid)
  entity = types.Entity(id=qid, label=labels[0],
                        description=descriptions[0] if descriptions else '',
                        aliases=tuple(aliases), sitelinks=len(sitelinks))
  return entity, classes


def parse_line(line, *args, **kwargs):
  """parse_item without the classes: Entity or None."""
  parsed = parse_item(line, *args, **kwargs)
  return parsed and parsed[0]


def is_skip(reason):
  return reason in SKIP_REASONS or reason.startswith('type:')


def _decode(line):
  """A dump line -> its entity object (None for brackets and blanks), or _Bad."""
  line = line.strip()
  if line in (b'', b'[', b']'):
    return None
  if line.endswith(b','):
    line = line[:-1]
  try:
    text = line.decode('utf-8')
  except UnicodeDecodeError as e:
    raise _Bad('not_utf8', str(e)) from None
  try:
    obj = json.loads(text)
  except ValueError as e:
    raise _Bad('malformed_json', f'{e}; line starts {text[:80]!r}') from None
  if not isinstance(obj, dict):
    raise _Bad('not_an_object', f'a JSON {type(obj).__name__}, expected an entity object')
  for field in ('id', 'type'):
    if not isinstance(obj.get(field), str):
      raise _Bad('missing_field', f'no string "{field}"', str(obj.get('id', '')))
  return obj


# ----------------------------------------------------------------------------- Beam stages


class _ParseFn(beam.DoFn):
  """Live counters per outcome (Dataflow shows them while the job runs); kb.json is the
  exact end-of-run record. `classes`, where given, is the P279-closed side input that
  replaces the direct excluded_types."""

  def __init__(self, languages, fallback_languages, min_sitelinks, excluded_types):
    self._args = (language_order(languages, ()), tuple(fallback_languages), min_sitelinks)
    self._excluded = dict(excluded_types)

  def process(self, element, classes=None):
    source, line = element
    try:
      parsed = parse_item(line, *self._args,
                          excluded_types=self._excluded if classes is None else classes)
    except _Bad as bad:
      _count(bad.reason)
      if is_skip(bad.reason):
        yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, bad.reason, bad.key))
      else:
        yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
            STAGE, bad.reason, bad.key, source, bad.detail[:300]))
      return
    if parsed is not None:
      entity, classes = parsed
      _count('entity')
      if not classes:
        yield beam.pvalue.TaggedOutput(UNTYPED, entity.id)
      yield entity


def _count(name):
  beam.metrics.Metrics.counter(STAGE, name).inc()


def _resolve_duplicates(item):
  """(qid, [Entity, ...]) -> the copy with most sitelinks (then the largest row); others dead."""
  qid, copies = item
  copies = sorted(copies, key=lambda e: (e.sitelinks, json.dumps(entity_row(e), sort_keys=True)),
                  reverse=True)
  yield copies[0]
  for _ in copies[1:]:
    _count('duplicate_id')
    yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
        STAGE, 'duplicate_id', qid, '', f'{len(copies)} lines for {qid}; kept the one with '
        'most sitelinks'))


class ParseWikidata(beam.PTransform):
  """(source, line bytes) -> {'main': Entity, 'dead_letter': DeadLetter, 'filtered': Filtered,
  'untyped': Q-ids of kept items with no P31}.

  Each Q-id leaves once: duplicate lines of one id are dead-lettered ('duplicate_id').
  `classes`: a one-element PCollection of wikidata_classes.ClassKinds (the excluded types
  closed over P279), checked instead of `excluded_types` itself.
  """

  def __init__(self, languages=('en',), fallback_languages=FALLBACK_LANGUAGES, min_sitelinks=0,
               excluded_types=None, classes=None):
    super().__init__()
    excluded = DEFAULT_EXCLUDED_TYPES if excluded_types is None else excluded_types
    self._args = (languages, fallback_languages, min_sitelinks, excluded)
    self._classes = classes

  def expand(self, lines):
    side = {} if self._classes is None else {'classes': beam.pvalue.AsSingleton(self._classes)}
    parsed = (lines | 'Parse' >> beam.ParDo(_ParseFn(*self._args), **side)
              .with_outputs(types.DEAD_LETTER, types.FILTERED, UNTYPED, main='main'))
    unique = (parsed.main
              | 'ById' >> beam.Map(lambda e: (e.id, e))
              | 'GroupById' >> beam.GroupByKey()
              | 'OnePerId' >> beam.FlatMap(_resolve_duplicates)
              .with_outputs(types.DEAD_LETTER, main='main'))
    dead = ((parsed[types.DEAD_LETTER], unique[types.DEAD_LETTER])
            | 'AllDead' >> beam.Flatten())
    untyped = parsed[UNTYPED] | 'UntypedOnce' >> beam.Distinct()
    return {'main': unique.main, 'dead_letter': dead, 'filtered': parsed[types.FILTERED],
            'untyped': untyped}
