"""The I2E pipeline: how the stages compose (data_prep/build_i2e.py is its command line).

  read -> dedup -> clean -> mentions -> link -> select -> global -> write   (I2E corpus)
  read -> dedup -> clean -> write                                  (--pairs_only: pairs)

read indexes the files (small records, no image bytes), dedup decides on those records and
reads the survivors again (dedup.py), so image bytes cross one shuffle, at the write.

Every stage returns {'main', 'filtered', 'dead_letter'}; 'main' feeds the next stage,
the other two are tallied per stage (stats.StageTallies) and the dead letters written
beside the corpus, so that inputs = written + filtered + dead-lettered can be checked.
"""
import functools
import json

import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options

from data_prep.i2e import clean as clean_lib
from data_prep.i2e import dedup as dedup_lib
from data_prep.i2e import global_passes
from data_prep.i2e import read as read_lib
from data_prep.i2e import stats as stats_lib
from data_prep.i2e import types
from data_prep.i2e import write as write_lib

# The local default uses both cores; any flag given on the command line wins.
LOCAL_DEFAULTS = dict(direct_num_workers=2, direct_running_mode='multi_processing')


def pipeline_options(beam_args):
  """PipelineOptions from the Beam flags; DirectRunner defaults to LOCAL_DEFAULTS."""
  options = beam_options.PipelineOptions(beam_args)
  runner = options.view_as(beam_options.StandardOptions).runner
  if runner in (None, 'DirectRunner', 'direct'):
    direct = options.view_as(beam_options.DirectOptions)
    given = ' '.join(beam_args)
    for name, value in LOCAL_DEFAULTS.items():
      if f'--{name}' not in given:
        setattr(direct, name, value)
  return options


def _as_pair_only(pair):
  return types.SelectedPair(pair=pair, entity_ids=(), scores=())


def _entity_stages(pairs, kb_dir, clip, config, clip_loader):
  """Clean pairs -> [(name, stage result)] of mentions, link, select and global passes."""
  # Imported here: a pairs corpus needs neither spaCy nor a CLIP model.
  from data_prep.i2e import link, mentions, select  # pylint: disable=import-outside-toplevel
  found = pairs | 'Mentions' >> mentions.FindMentions(kb_dir, **config['mentions'])
  linked = found['main'] | 'Link' >> link.LinkEntities(kb_dir, **config['link'])
  selected = linked['main'] | 'Select' >> select.SelectWithClip(
      clip, kb_dir, loader=clip_loader, **config['select'])
  passes = selected['main'] | 'Global' >> global_passes.GlobalPasses(
      **config['global_passes'])
  return [('mentions', found), ('link', linked), ('select', selected), ('global', passes)]


def plain_config(config):
  """ConfigDict or dict -> plain JSON-able dict of dicts (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config))


def build_i2e(p, *, pairs, out_dir, config, kb_dir='', clip='', pairs_only=False,
              overwrite=False, clip_loader=None):
  """Adds the whole pipeline to `p`; returns the one-element PCollection of stats.json.

  pairs: file patterns (read.py); config: configs/i2e.py's ConfigDict; clip: a training
  workdir or HF CLIP folder (select.py); clip_loader: optional `() -> Encoder` instead.
  """
  config = plain_config(config)
  inputs = [('--kb', kb_dir), ('--clip', clip)] + [('--pairs', p) for p in pairs]
  write_lib.check_out_dir(out_dir, overwrite, inputs)  # Before any work: never replace silently.
  if not pairs_only and not (kb_dir and (clip or clip_loader)):
    raise ValueError('build_i2e: an I2E corpus needs --kb and --clip (or --pairs_only).')
  reader = read_lib.ReadPairs(pairs, **config['read'], text_check=functools.partial(
      clean_lib.text_passes, min_chars=config['clean']['min_chars'],
      max_chars=config['clean']['max_chars']))
  read = p | 'Read' >> reader
  deduped = read['main'] | 'Dedup' >> dedup_lib.DedupPairs(reader.read_fn, **config['dedup'])
  stages = [('read', read), ('dedup', deduped),
            ('clean', deduped['main'] | 'Clean' >> clean_lib.CleanPairs(**config['clean']))]
  extra = {}
  if pairs_only:
    final = stages[-1][1]['main'] | 'AsPairs' >> beam.Map(_as_pair_only)
  else:
    stages += _entity_stages(stages[-1][1]['main'], kb_dir, clip, config, clip_loader)
    passes = stages[-1][1]
    final = passes['main']
    extra = dict(classes=passes['classes'], entity_counts=passes['entity_counts'])
  tallies = [result | f'Tally_{name}' >> stats_lib.StageTallies(name)
             for name, result in stages]
  dead = [result['dead_letter'] for _, result in stages]
  inputs = dict(main=final, tallies=tallies | 'AllTallies' >> beam.Flatten(),
                dead_letter=dead | 'AllDeadLetters' >> beam.Flatten(), **extra)
  return inputs | 'Write' >> write_lib.WriteCorpus(
      out_dir, kb_dir, seed=config['seed'], stage_names=[name for name, _ in stages],
      kind='pairs' if pairs_only else 'i2e', overwrite=overwrite,
      meta=dict(i2e_config=config, pairs=list(pairs)), **config['write'])
