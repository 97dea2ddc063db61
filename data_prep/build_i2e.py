r"""Builds an I2E corpus from web image/alt-text pairs (Apache Beam; docs/i2e.md).

  python -m data_prep.build_i2e --pairs 'raw/*.tar' --kb /tmp/kb --clip /tmp/clip_run \
      --out /tmp/corpus [--config configs/i2e.py] [--config.global_passes.min_images=3]
  python -m data_prep.build_i2e --pairs 'raw/*.parquet' --out /tmp/pairs --pairs_only

--pairs: file pattern(s) (repeat the flag or separate with commas) of WebDataset tars,
Parquet or TFRecord files on any Beam filesystem. --kb: a folder written by
data_prep.build_kb. --clip: a contrastive/multitask training workdir or a Hugging Face
CLIP folder. --pairs_only: stop after cleaning and write a pairs corpus (no entities).
Any other flag goes to Beam (--runner, --direct_num_workers, Dataflow/Flink/Spark
options); the default is the local runner on both cores.

Reads like a table of contents: flags -> config -> checks -> pipeline -> summary.
"""
import argparse
import json
import os
import sys

from apache_beam.io.filesystems import FileSystems

from mofi_jax import cli_errors, config_files

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'i2e.py')
_OUR_ERRORS = ('OutputExistsError', 'NoOutputError', 'ReconcileError', 'CorpusError',
               'KBError', 'LoadError')


class UsageError(ValueError):
  pass


def parse_args(argv):
  """-> (args, ConfigDict, Beam flags)."""
  parser = argparse.ArgumentParser(prog='data_prep.build_i2e', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', action='append', required=True, help='file pattern(s)')
  parser.add_argument('--kb', default='', help='knowledge-base folder (data_prep.build_kb)')
  parser.add_argument('--clip', default='', help='training workdir or HF CLIP folder')
  parser.add_argument('--out', required=True, help='corpus folder to create')
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='configs/i2e.py-style file')
  parser.add_argument('--pairs_only', action='store_true', help='write a pairs corpus')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a non-empty --out once the new corpus is complete')
  args, rest = parser.parse_known_args(argv)
  args.pairs = [p for flag in args.pairs for p in flag.split(',') if p]
  overrides = [a for a in rest if a.startswith('--config.')]
  config = load_config(args.config, overrides)
  return args, config, [a for a in rest if not a.startswith('--config.')]


def load_config(spec, overrides=()):
  """get_config() of the file `spec`, with '--config.a.b=value' overrides applied."""
  return config_files.load(spec, [o[len('--config.'):] for o in overrides], flag='--config.')


def check_inputs(args):
  """Fails fast, naming the flag, before any worker starts."""
  from data_prep.i2e import commit  # pylint: disable=import-outside-toplevel
  commit.check_out_dir(args.out, args.overwrite, [('--kb', args.kb), ('--clip', args.clip)] +
                       [('--pairs', p) for p in args.pairs])
  for pattern in args.pairs:
    if not FileSystems.match([pattern])[0].metadata_list:
      raise UsageError(f'--pairs {pattern}: matches no file.')
  if args.pairs_only:
    return
  if not args.kb or not args.clip:
    raise UsageError('--kb and --clip are required (or --pairs_only for a pairs corpus).')
  from data_prep.i2e import kb, select  # pylint: disable=import-outside-toplevel
  kb.check_kb_dir(args.kb)
  select.resolve_clip(args.clip)


def _one_line(error):
  """The most useful line of a (possibly runner-wrapped) exception."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  ours = [l for l in lines if any(name in l for name in _OUR_ERRORS)]
  return (ours or lines or [type(error).__name__])[-1][:1000]


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, config, beam_args = parse_args(argv)
    check_inputs(args)
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
    from data_prep.i2e import pipeline, runs, write  # pylint: disable=import-outside-toplevel
    options = pipeline.pipeline_options(beam_args)
  except cli_errors.input_errors() as e:
    cli_errors.exit_with('data_prep.build_i2e', e)
  try:
    p = beam.Pipeline(options=options)
    pipeline.build_i2e(p, pairs=args.pairs, out_dir=args.out, config=config, kb_dir=args.kb,
                       clip=args.clip, pairs_only=args.pairs_only, overwrite=args.overwrite)
    result = runs.run_to_completion(p)
  except Exception as e:  # pylint: disable=broad-except  # Runners wrap errors variously.
    sys.exit(f'data_prep.build_i2e: error: {_one_line(e)}')
  with FileSystems.open(FileSystems.join(args.out, write.STATS_FILE)) as f:
    stats = json.loads(f.read())
  from data_prep.i2e import stats as stats_lib  # pylint: disable=import-outside-toplevel
  print(stats_lib.stage_table(stats))
  print(stats_lib.shuffle_line(result, stats['inputs']))
  print(f'{args.out}: {stats["written"]} of {stats["inputs"]} inputs written; '
        f'filtered {stats["filtered"]}; dead-lettered {stats["dead_letter"]}.')


if __name__ == '__main__':
  main()
