"""Reading a Wikidata dump on Beam into a knowledge-base folder (the format of kb.py).

  python -m data_prep.build_kb --wikidata latest-all.json.bz2 --out KB_DIR [--language en]

Input: the official dump layout (`latest-all.json`, `.json.bz2` or `.json.gz`): a JSON array with
one entity per line (`[`, then `{...},` lines, the last without the comma, then `]`). Beam's text
reader decompresses by extension. A compressed dump cannot be split between workers, so lines are
reshuffled before the JSON parsing, which is the expensive part.

Skipped and counted: non-item entities (properties, lexemes), items with no label in the
language and, with --min_sitelinks, obscure items (the full dump holds ~100M items, and the alias
matcher and linker keep the KB in memory on every worker). Malformed lines are dead-lettered and
counted: every entity line of the dump ends in exactly one of entities / skipped / dead_letter.
The 'mul' (multilingual) labels and aliases that Wikidata introduced in 2024 are a fallback, since
many items now carry their name only there.
"""
import dataclasses
import json
import posixpath
import re

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import types
from data_prep.i2e.kb import (ALIAS_PREFIX, ALIAS_SCHEMA, DEAD_LETTER_FILE, ENTITY_PREFIX,
                              ENTITY_SCHEMA, FORMAT_VERSION, KB_FILE, alias_rows, entity_row)

STAGE = 'kb'
FALLBACK_LANGUAGES = ('mul',)
SKIP_REASONS = ('not_item', 'no_label', 'few_sitelinks')
_WS = re.compile(r'\s+')
_QID = re.compile(r'Q[1-9][0-9]*\Z')


# ----------------------------------------------------------------------------- parsing one line


class _Bad(Exception):
  def __init__(self, reason, detail, key=''):
    super().__init__(detail)
    self.reason, self.detail, self.key = reason, detail, key


def _texts(field, languages, name, key):
  """[value, ...] of a labels/descriptions/aliases field, in language order."""
  if field is None:
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


def parse_line(line, language='en', fallback_languages=FALLBACK_LANGUAGES, min_sitelinks=0):
  """One dump line (bytes) -> Entity, or None for the array brackets and blank lines.

  Raises _Bad(reason, detail, key) for lines that are not an item with a label: reasons
  'not_utf8', 'malformed_json', 'not_an_object', 'missing_field', 'bad_id', 'bad_field'
  (dead letters) and 'not_item', 'no_label', 'few_sitelinks' (skipped, SKIP_REASONS).
  """
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
  qid = obj['id']
  if obj['type'] != 'item':
    raise _Bad('not_item', f'type {obj["type"]!r}', qid)
  if not _QID.match(qid):
    raise _Bad('bad_id', f'item id {qid!r} is not a Q-number', qid)
  languages = (language,) + tuple(l for l in fallback_languages if l != language)
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
  return types.Entity(id=qid, label=labels[0], description=descriptions[0] if descriptions else '',
                      aliases=tuple(aliases), sitelinks=len(sitelinks))


# ----------------------------------------------------------------------------- Beam stages


class _ParseFn(beam.DoFn):
  def __init__(self, language, fallback_languages, min_sitelinks):
    self._args = (language, tuple(fallback_languages), min_sitelinks)

  def process(self, element):
    source, line = element
    try:
      entity = parse_line(line, *self._args)
    except _Bad as bad:
      if bad.reason in SKIP_REASONS:
        yield beam.pvalue.TaggedOutput(types.FILTERED, types.Filtered(STAGE, bad.reason, bad.key))
      else:
        yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
            STAGE, bad.reason, bad.key, source, bad.detail[:300]))
      return
    if entity is not None:
      yield entity


def _resolve_duplicates(item):
  """(qid, [Entity, ...]) -> the copy with most sitelinks (then the largest row); others dead."""
  qid, copies = item
  copies = sorted(copies, key=lambda e: (e.sitelinks, json.dumps(entity_row(e), sort_keys=True)),
                  reverse=True)
  yield copies[0]
  for _ in copies[1:]:
    yield beam.pvalue.TaggedOutput(types.DEAD_LETTER, types.DeadLetter(
        STAGE, 'duplicate_id', qid, '', f'{len(copies)} lines for {qid}; kept the one with '
        'most sitelinks'))


class ParseWikidata(beam.PTransform):
  """(source, line bytes) -> {'main': Entity, 'dead_letter': DeadLetter, 'filtered': Filtered}.

  Each Q-id leaves once: duplicate lines of one id are dead-lettered ('duplicate_id').
  """

  def __init__(self, language='en', fallback_languages=FALLBACK_LANGUAGES, min_sitelinks=0):
    super().__init__()
    self._args = (language, fallback_languages, min_sitelinks)

  def expand(self, lines):
    parsed = (lines | 'Parse' >> beam.ParDo(_ParseFn(*self._args))
              .with_outputs(types.DEAD_LETTER, types.FILTERED, main='main'))
    unique = (parsed.main
              | 'ById' >> beam.Map(lambda e: (e.id, e))
              | 'GroupById' >> beam.GroupByKey()
              | 'OnePerId' >> beam.FlatMap(_resolve_duplicates)
              .with_outputs(types.DEAD_LETTER, main='main'))
    dead = ((parsed[types.DEAD_LETTER], unique[types.DEAD_LETTER])
            | 'AllDead' >> beam.Flatten())
    return {'main': unique.main, 'dead_letter': dead, 'filtered': parsed[types.FILTERED]}


def _write_kb_json(_, out_dir, meta, counts, entity_files, alias_files):
  counts = dict(counts)
  meta = dict(meta, format_version=FORMAT_VERSION,
              num_entities=counts.pop('entities', 0), num_aliases=counts.pop('aliases', 0),
              skipped={k.split('/', 1)[1]: v for k, v in sorted(counts.items())
                       if k.startswith('skipped/')},
              dead_letter={k.split('/', 1)[1]: v for k, v in sorted(counts.items())
                           if k.startswith('dead_letter/')},
              entity_files=sorted(posixpath.basename(f) for f in entity_files),
              alias_files=sorted(posixpath.basename(f) for f in alias_files))
  with FileSystems.create(FileSystems.join(out_dir, KB_FILE)) as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True).encode('utf-8'))
  yield meta


class WriteKnowledgeBase(beam.PTransform):
  """{'main': Entity, 'dead_letter', 'filtered'} -> KB_DIR files; kb.json written after the rest.

  Returns a one-element PCollection holding kb.json's contents.
  """

  def __init__(self, out_dir, meta, num_shards=0):
    super().__init__()
    self._out, self._meta, self._shards = out_dir, dict(meta), num_shards

  def expand(self, stages):
    p = stages['main'].pipeline
    join = FileSystems.join
    entity_files = (stages['main'] | 'EntityRows' >> beam.Map(entity_row)
                    | 'WriteEntities' >> beam.io.WriteToParquet(
                        join(self._out, ENTITY_PREFIX), ENTITY_SCHEMA,
                        file_name_suffix='.parquet', num_shards=self._shards))
    aliases = stages['main'] | 'AliasRows' >> beam.FlatMap(alias_rows)
    alias_files = aliases | 'WriteAliases' >> beam.io.WriteToParquet(
        join(self._out, ALIAS_PREFIX), ALIAS_SCHEMA, file_name_suffix='.parquet',
        num_shards=self._shards)
    _ = (stages['dead_letter']
         | 'DeadJson' >> beam.Map(lambda d: json.dumps(dataclasses.asdict(d), sort_keys=True))
         | 'WriteDead' >> beam.io.WriteToText(join(self._out, DEAD_LETTER_FILE),
                                              shard_name_template='', num_shards=1))
    tallies = (
        (stages['main'] | 'TallyEntities' >> beam.Map(lambda _: 'entities'),
         aliases | 'TallyAliases' >> beam.Map(lambda _: 'aliases'),
         stages['filtered'] | 'TallySkipped' >> beam.Map(lambda f: f'skipped/{f.reason}'),
         stages['dead_letter'] | 'TallyDead' >> beam.Map(
             lambda d: f'dead_letter/{d.reason}'))
        | 'AllTallies' >> beam.Flatten()
        | 'Count' >> beam.combiners.Count.PerElement()
        | 'ToDict' >> beam.combiners.ToDict())
    return (p | 'Once' >> beam.Create([None])
            | 'WriteKbJson' >> beam.FlatMap(
                _write_kb_json, self._out, self._meta, beam.pvalue.AsSingleton(tallies),
                beam.pvalue.AsList(entity_files), beam.pvalue.AsList(alias_files)))


def build_pipeline(p, dump_pattern, out_dir, language='en', num_shards=0,
                   fallback_languages=FALLBACK_LANGUAGES, min_sitelinks=0):
  """Adds the KB build to pipeline `p`; returns the PCollection holding kb.json's contents."""
  from apache_beam import coders  # pylint: disable=import-outside-toplevel
  lines = (p | 'ReadDump' >> beam.io.ReadFromTextWithFilename(dump_pattern,
                                                               coder=coders.BytesCoder())
           | 'Spread' >> beam.Reshuffle())
  stages = lines | 'ParseWikidata' >> ParseWikidata(language, fallback_languages, min_sitelinks)
  meta = dict(language=language, fallback_languages=list(fallback_languages),
              min_sitelinks=min_sitelinks, source=dump_pattern)
  return stages | 'WriteKB' >> WriteKnowledgeBase(out_dir, meta, num_shards)
