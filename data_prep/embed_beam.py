r"""`python -m mofi_jax.embed` as a Beam pipeline, for collections that need a cluster.

  python -m data_prep.embed_beam --workdir W --images 'photos/**/*.jpg' --out E \
      [--shard_size 10000] [--batch_size 256] [--captions] [--overwrite] [Beam flags]
  python -m data_prep.embed_beam --hf_clip F --pairs 'laion/*.tar' --captions --out E \
      --runner=DataflowRunner --project=... --sdk_container_image=...

Same flags, same output and the same files as the local command (clip-retrieval's layout,
mofi_jax/embed_shards.py), so a folder can be started on one and finished on the other:

  Create(files) -> Count per file (workers) -> Plan shards (position ranges, as embed's)
    -> drop shards already done -> Reshuffle -> Read each shard's items
    -> RunInference(EmbedModelHandler) keyed by (shard, position)   # the model loads once per
    -> GroupByKey(shard) -> write the shard, its done marker last    # worker, as select's does

Image bytes never cross a shuffle: the inference step keeps only metadata and embeddings.
Counters `embed/embedded` and `embed/skipped_<reason>` show in the runner's UI while the job
runs. --out must be a file system every worker sees (NFS, Filestore, a gcsfuse mount): shards
are written with a rename. A TFDS split is one stream: embed it with the local command's
--process_id/--num_processes instead.
"""
import argparse
import itertools

import apache_beam as beam
from apache_beam.ml.inference import base as inference_base
from apache_beam.options.pipeline_options import PipelineOptions

from mofi_jax import cli_errors, embed, embed_shards, model_flags

PROG = 'data_prep.embed_beam'
_MODEL_FLAGS = ('workdir', 'hf_clip', 'step')


def parse_args(argv):
  """(embed's flags, the rest for Beam)."""
  args, beam_argv = embed.build_parser(PROG).parse_known_args(argv)
  args.beam_argv = beam_argv
  return args


def check_flags(args):
  embed.check_flags(args)
  if args.tfds:
    raise ValueError('--tfds: a TFDS split is one stream; embed it with python -m '
                     'mofi_jax.embed --process_id/--num_processes.')
  if args.process_id is not None:
    raise ValueError('--process_id/--num_processes: the runner shares the work; drop them.')


class EmbedModelHandler(inference_base.ModelHandler):
  """RunInference handler: embed_inputs.Item -> PredictionResult(item, embed.Embedded)."""

  def __init__(self, model, batch_size, captions):
    super().__init__(min_batch_size=1, max_batch_size=batch_size)
    self._model, self._batch_size, self._captions = dict(model), batch_size, captions

  def load_model(self):
    return model_flags.load_encoder(argparse.Namespace(**self._model))

  def run_inference(self, batch, model, inference_args=None):
    results = embed.embed_items(model, list(batch), self._batch_size, self._captions)
    return [inference_base.PredictionResult(item, r) for item, r in zip(batch, results)]

  def get_metrics_namespace(self):
    return 'embed'


def plan_shards(counts, shard_size):
  """[(unit index, items)] in any order -> [(shard, [(unit index, start, stop)])]: shard i
  holds input positions [i * shard_size, (i+1) * shard_size), as the local command's."""
  plan, position = {}, 0
  for unit, n in sorted(counts):
    start = 0
    while start < n:   # cut [position, position + n) at the shard boundaries
      shard = (position + start) // shard_size
      stop = min(n, (shard + 1) * shard_size - position)
      plan.setdefault(shard, []).append((unit, start, stop))
      start = stop
    position += n
  return sorted(plan.items())


class _ReadShardFn(beam.DoFn):
  """(shard, spans) -> ((shard, position), Item) of each item it holds."""

  def __init__(self, units, reader, shard_size):
    self._units, self._reader, self._shard_size = units, reader, shard_size

  def process(self, element):
    shard, spans = element
    position = shard * self._shard_size
    for unit, start, stop in spans:
      for item in itertools.islice(self._reader.items(self._units[unit]), start, stop):
        yield (shard, position), item
        position += 1


class _WriteShardFn(beam.DoFn):
  """(shard, [(position, Embedded)]) -> shard, its files written (done marker last)."""

  def __init__(self, out, dim, captions):
    self._out, self._dim, self._captions = out, dim, captions

  def process(self, element):
    shard, results = element
    embedded = [e for _, e in sorted(results, key=lambda r: r[0])]
    embed.write_embedded(self._out, shard, embedded, self._dim, self._captions)
    beam.metrics.Metrics.counter('embed', 'embedded').inc(sum(not e.reason for e in embedded))
    for e in embedded:
      if e.reason:
        beam.metrics.Metrics.counter('embed', f'skipped_{e.reason}').inc(e.count)
    yield shard


def _per_shard(keyed):
  (shard, position), result = keyed
  return shard, (position, result.inference)


def build(pipeline, inputs, args, out, dim):
  """The pipeline's steps on `pipeline`; returns the PCollection of shards written."""
  model = {k: getattr(args, k) for k in _MODEL_FLAGS}
  handler = inference_base.KeyedModelHandler(
      EmbedModelHandler(model, args.batch_size, args.captions))
  units, reader, size = inputs.units, inputs.reader, args.shard_size
  return (pipeline
          | 'Units' >> beam.Create(list(enumerate(units)))
          | 'SpreadUnits' >> beam.Reshuffle()
          | 'Count' >> beam.Map(lambda u: (u[0], reader.count(units[u[0]])))
          | 'AllCounts' >> beam.combiners.ToList()
          | 'Plan' >> beam.FlatMap(plan_shards, size)
          | 'NotDone' >> beam.Filter(lambda s: not embed_shards.is_done(out, s[0]))
          | 'SpreadShards' >> beam.Reshuffle()
          | 'Read' >> beam.ParDo(_ReadShardFn(units, reader, size))
          | 'Embed' >> inference_base.RunInference(handler)
          | 'ByShard' >> beam.Map(_per_shard)
          | 'Group' >> beam.GroupByKey()
          | 'Write' >> beam.ParDo(_WriteShardFn(out, dim, args.captions)))


def run(args):
  check_flags(args)
  out, inputs, _, info = embed.prepare(args)   # the model loads here for embed_info.json too
  options = PipelineOptions(args.beam_argv)
  with beam.Pipeline(options=options) as pipeline:
    build(pipeline, inputs, args, out, info['dim'])
  # The pipeline finished, so every shard the plan made is done.
  return embed.report(out, len(embed_shards.done_shards(out)))


def main(argv=None):
  return cli_errors.run_command(PROG, parse_args, run, argv)


if __name__ == '__main__':
  main()
