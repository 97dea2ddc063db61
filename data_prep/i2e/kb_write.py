"""Writing a knowledge-base folder on Beam: Parquet tables, the mapped index, kb.json last.

The tables (kb.py's ENTITY_SCHEMA, ALIAS_SCHEMA) are the portable record; the index
(kb_index.py) is what workers open. Each index shard is built by one worker from the
(key, value) pairs of its shard alone, so no machine holds the whole KB; a shard that
receives no key is written empty, so that every listed file exists. An alias's candidates
are ranked and truncated by a combiner per alias (kb_index.merge_candidates), which holds
max_candidates_per_alias of them (and a batch of new ones) per key and worker.
"""
import dataclasses
import json
import posixpath

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import kb_index

_COUNTED = ('entities', 'aliases', 'alias_keys', 'untyped')
_BATCH = 256   # _TopCandidates' inputs between merges


def _entity_candidates(entity):
  return kb_index.entity_candidates(entity, kb_lib.alias_rows(entity))


class _TopCandidates(beam.CombineFn):
  """AliasCandidates of one alias -> their merge_candidates (the best, and the remainder).
  The accumulator is a list of parts, merged every _BATCH inputs: merging at each input would
  copy the kept list each time (quadratic in an alias's items when every one is kept)."""

  def __init__(self, max_candidates):
    super().__init__()
    self._max = max_candidates

  def create_accumulator(self):
    return []

  def add_input(self, mutable_accumulator, element):
    mutable_accumulator.append(element)
    if len(mutable_accumulator) >= _BATCH:
      mutable_accumulator[:] = [kb_index.merge_candidates(mutable_accumulator, self._max)]
    return mutable_accumulator

  def merge_accumulators(self, accumulators):
    return [kb_index.merge_candidates([p for acc in accumulators for p in acc], self._max)]

  def extract_output(self, accumulator):
    return kb_index.merge_candidates(accumulator, self._max)


def _write_shard(item, out_dir, num_shards):
  (kind, shard), entries = item
  # Streamed into marisa's builder, which keeps the keys in C++ (no Python list of them).
  trie = kb_index.build_trie(kind, entries)
  kb_index.save_trie(trie, FileSystems.join(out_dir, kb_index.file_name(kind, shard, num_shards)))
  yield kind, shard


def _write_kb_json(_, out_dir, meta, counts, entity_files, alias_files, written_shards,
                   num_shards, max_candidates, pipeline_meta):
  counts = dict(counts)
  meta = dict(meta, **pipeline_meta)
  written = set(written_shards)
  for kind in kb_index.KINDS:     # shards that received no key: empty, but present
    for shard in range(num_shards):
      if (kind, shard) not in written:
        kb_index.save_trie(kb_index.build_trie(kind, []), FileSystems.join(
            out_dir, kb_index.file_name(kind, shard, num_shards)))
  index_files = {kind: [kb_index.file_name(kind, s, num_shards) for s in range(num_shards)]
                 for kind in kb_index.KINDS}
  meta = dict(meta, format_version=kb_lib.FORMAT_VERSION,
              **{f'num_{k}': counts.pop(k, 0) for k in _COUNTED},
              skipped={k.split('/', 1)[1]: v for k, v in sorted(counts.items())
                       if k.startswith('skipped/')},
              dead_letter={k.split('/', 1)[1]: v for k, v in sorted(counts.items())
                           if k.startswith('dead_letter/')},
              entity_files=sorted(posixpath.basename(f) for f in entity_files),
              alias_files=sorted(posixpath.basename(f) for f in alias_files),
              **kb_lib.index_meta(index_files, num_shards, max_candidates))
  with FileSystems.create(FileSystems.join(out_dir, kb_lib.KB_FILE)) as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True).encode('utf-8'))
  yield meta


class WriteKnowledgeBase(beam.PTransform):
  """{'main': Entity, 'dead_letter', 'filtered', 'untyped'} -> KB_DIR files; kb.json last.

  An optional 'meta', a one-element PCollection of a dict, adds what the pipeline itself
  computed (the P279 closure's summary) to kb.json. Returns a one-element PCollection
  holding kb.json's contents.
  """

  def __init__(self, out_dir, meta, num_shards=0, index_shards=kb_index.DEFAULT_SHARDS,
               max_candidates_per_alias=kb_index.DEFAULT_MAX_CANDIDATES):
    super().__init__()
    self._out, self._meta, self._shards = out_dir, dict(meta), num_shards
    self._index_shards = index_shards
    self._max_candidates = kb_index.check_max_candidates(max_candidates_per_alias)

  def expand(self, stages):
    p, join, entities = stages['main'].pipeline, FileSystems.join, stages['main']
    entity_files = (entities | 'EntityRows' >> beam.Map(kb_lib.entity_row)
                    | 'WriteEntities' >> beam.io.WriteToParquet(
                        join(self._out, kb_lib.ENTITY_PREFIX), kb_lib.ENTITY_SCHEMA,
                        file_name_suffix='.parquet', num_shards=self._shards))
    aliases = entities | 'AliasRows' >> beam.FlatMap(kb_lib.alias_rows)
    alias_files = aliases | 'WriteAliases' >> beam.io.WriteToParquet(
        join(self._out, kb_lib.ALIAS_PREFIX), kb_lib.ALIAS_SCHEMA,
        file_name_suffix='.parquet', num_shards=self._shards)
    alias_index = (entities
                   | 'AliasCandidates' >> beam.FlatMap(_entity_candidates)
                   | 'TopCandidates' >> beam.CombinePerKey(_TopCandidates(self._max_candidates)))
    shards = ((entities | 'IndexItems' >> beam.FlatMap(kb_index.entity_items, self._index_shards),
               alias_index | 'AliasItems' >> beam.Map(
                   lambda kv, n: kb_index.alias_item(*kv, n), self._index_shards))
              | 'AllIndexItems' >> beam.Flatten()
              | 'ByShard' >> beam.Map(lambda it: ((it[0], it[1]), (it[2], it[3])))
              | 'GroupShards' >> beam.GroupByKey()
              | 'WriteShards' >> beam.FlatMap(_write_shard, self._out, self._index_shards))
    _ = (stages['dead_letter']
         | 'DeadJson' >> beam.Map(lambda d: json.dumps(dataclasses.asdict(d), sort_keys=True))
         | 'WriteDead' >> beam.io.WriteToText(join(self._out, kb_lib.DEAD_LETTER_FILE),
                                              shard_name_template='', num_shards=1))
    tallies = (
        (entities | 'TallyEntities' >> beam.Map(lambda _: 'entities'),
         aliases | 'TallyAliases' >> beam.Map(lambda _: 'aliases'),
         alias_index | 'TallyAliasKeys' >> beam.Map(lambda _: 'alias_keys'),
         stages['untyped'] | 'TallyUntyped' >> beam.Map(lambda _: 'untyped'),
         stages['filtered'] | 'TallySkipped' >> beam.Map(lambda f: f'skipped/{f.reason}'),
         stages['dead_letter'] | 'TallyDead' >> beam.Map(
             lambda d: f'dead_letter/{d.reason}'))
        | 'AllTallies' >> beam.Flatten()
        | 'Count' >> beam.combiners.Count.PerElement()
        | 'ToDict' >> beam.combiners.ToDict())
    pipeline_meta = stages.get('meta')
    if pipeline_meta is None:
      pipeline_meta = p | 'NoPipelineMeta' >> beam.Create([{}])
    return (p | 'Once' >> beam.Create([None])
            | 'WriteKbJson' >> beam.FlatMap(
                _write_kb_json, self._out, self._meta, beam.pvalue.AsSingleton(tallies),
                beam.pvalue.AsList(entity_files), beam.pvalue.AsList(alias_files),
                beam.pvalue.AsList(shards), self._index_shards, self._max_candidates,
                beam.pvalue.AsSingleton(pipeline_meta)))
