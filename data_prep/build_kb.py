"""Builds the I2E knowledge base from a Wikidata JSON dump, on Apache Beam.

  python -m data_prep.build_kb --wikidata latest-all.json.bz2 --out /data/kb [--languages en,de]
  python -m data_prep.split_dump --dump latest-all.json.bz2 --out /data/dump_chunks
  python -m data_prep.build_kb --wikidata '/data/dump_chunks/*.json.gz' --out /data/kb
  python -m data_prep.build_kb --wikidata 'gs://b/dump_chunks/*.json.gz' --out gs://b/kb \
      --runner DataflowRunner --project P --region R --temp_location gs://b/tmp

--wikidata takes files or globs (repeat the flag or separate with commas). One compressed
file is read by one worker, so split the official single-file dump into line-aligned chunks
first (data_prep/split_dump.py) and give their glob. Items whose P31 (instance of) is a
non-visual kind (--exclude_types, default wikidata.DEFAULT_EXCLUDED_TYPES: disambiguation
pages, categories, templates, scholarly articles, genes, given names, ...) or a subclass of
one (P279, closed in a first pass over the dump; --no-subclass_closure checks P31 alone) are
skipped and counted per kind in kb.json. --languages en,de,... keeps labels and aliases in
each; the label and description are the first language's that has one.

Flags this module does not know go to Beam's PipelineOptions. Without --runner: the local
DirectRunner on both cores (multi-processing). The KB is built in a staging folder beside --out and
moved into place when the pipeline has finished, so a failed build never touches an existing KB;
an existing non-empty --out is replaced only with --overwrite. Parsing: data_prep/i2e/wikidata.py;
layout: data_prep/i2e/kb.py.
"""
import argparse
import json
import re
import sys
import uuid

from apache_beam.io.filesystems import FileSystems

from mofi_jax import safe_outputs

TOOL = 'data_prep.build_kb'

LOCAL_DEFAULTS = ['--runner=DirectRunner', '--direct_num_workers=2',
                  '--direct_running_mode=multi_processing']


class UsageError(ValueError):
  pass


class _Parser(argparse.ArgumentParser):
  def error(self, message):   # one line, not argparse's usage block
    raise UsageError(message)


def parse_args(argv):
  from data_prep.i2e import kb_index  # pylint: disable=import-outside-toplevel
  parser = _Parser(prog='python -m data_prep.build_kb', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--wikidata', required=True, action='append',
                      help='dump file(s) or glob(s) (.json, .json.bz2, .json.gz), any Beam '
                      'filesystem; repeat the flag or separate with commas')
  parser.add_argument('--out', required=True, help='KB folder to create')
  parser.add_argument('--languages', '--language', dest='languages', default='en',
                      help="label/description/alias languages in order, e.g. 'en,de,fr,ja': the "
                      "label and description are the first language's that has one, the other "
                      "labels and every alias are aliases ('mul' is read last)")
  parser.add_argument('--num_shards', type=int, default=0,
                      help='Parquet shards per table (0: the runner decides)')
  parser.add_argument('--min_sitelinks', type=int, default=0,
                      help='skip items with fewer sitelinks (the KB is held in memory by workers)')
  parser.add_argument('--exclude_types', default=None,
                      help="QID=reason,... of P31 classes to skip (default: wikidata."
                      "DEFAULT_EXCLUDED_TYPES); '' keeps every type")
  parser.add_argument('--subclass_closure', action=argparse.BooleanOptionalAction, default=True,
                      help='also skip items whose P31 class is a P279 (subclass of) descendant '
                      'of an excluded type, found in a first pass over the dump (default: on)')
  parser.add_argument('--index_shards', type=int, default=8,
                      help='shards of each memory-mapped index trie (one worker builds each)')
  parser.add_argument('--max_candidates_per_alias', type=int,
                      default=kb_index.DEFAULT_MAX_CANDIDATES,
                      help="the alias index keeps each alias's this many candidates with the "
                      "most sitelinks, and the count and summed sitelinks of the others for the "
                      "linker's prior ('John Smith' names thousands of items); 0 keeps all")
  parser.add_argument('--overwrite', action='store_true', help='replace an existing KB in --out')
  args, beam_args = parser.parse_known_args(argv)
  args.wikidata = [p for flag in args.wikidata for p in flag.split(',') if p]
  args.exclude_types = parse_types(args.exclude_types)
  if args.index_shards < 1:
    raise UsageError(f'--index_shards must be >= 1, got {args.index_shards}')
  try:
    kb_index.check_max_candidates(args.max_candidates_per_alias)
  except ValueError as e:
    raise UsageError(str(e)) from e
  args.languages = parse_languages(args.languages)
  if args.num_shards < 0 or args.min_sitelinks < 0:
    raise UsageError(f'--num_shards and --min_sitelinks must be >= 0, got {args.num_shards} and '
                     f'{args.min_sitelinks}')
  if not any(a == '--runner' or a.startswith('--runner=') for a in beam_args):
    beam_args = LOCAL_DEFAULTS + beam_args
  return args, beam_args


def parse_languages(text):
  """'en,de' -> ('en', 'de'); each a Wikidata language code, none twice."""
  languages = tuple(l.strip() for l in text.split(','))
  for lang in languages:
    if not re.fullmatch(r'[a-z]{2,3}(-[a-z0-9]+)*', lang):
      raise UsageError(f'--languages: {lang!r} is not a Wikidata language code (e.g. en, de, '
                       'pt-br)')
  if len(set(languages)) != len(languages):
    raise UsageError(f'--languages {text!r} names a language twice')
  return languages


def parse_types(text):
  """'Q1=reason,Q2=other' -> {Q-id: reason}; None -> None (the default list)."""
  if text is None:
    return None
  out = {}
  for item in filter(None, text.split(',')):
    qid, sep, reason = item.partition('=')
    if not sep or not re.fullmatch(r'Q[1-9][0-9]*', qid) or not re.fullmatch(r'\w+', reason):
      raise UsageError(f'--exclude_types {item!r}: expected QID=reason, e.g. '
                       'Q4167410=disambiguation_page')
    out[qid] = reason
  return out


def _files_under(folder):
  return [m.path for m in FileSystems.match([FileSystems.join(folder, '*')])[0].metadata_list]


def _older_kb(folder):
  return FileSystems.exists(FileSystems.join(folder, 'kb.json'))


def check_paths(args):
  for pattern in args.wikidata:
    if not FileSystems.match([pattern])[0].metadata_list:
      raise UsageError(f'--wikidata {pattern}: no such file')
  try:   # --overwrite replaces only an earlier KB (mofi_jax/safe_outputs.py)
    safe_outputs.check_output(args.out, TOOL, args.overwrite, legacy=_older_kb,
                              inputs=[('--wikidata', p) for p in args.wikidata])
  except safe_outputs.OutputFolderError as e:
    raise UsageError(str(e)) from e


def move_into_place(staging, out):
  """Replaces `out`'s files by the staging folder's; kb.json, the completeness marker, last.
  Our marker goes in first, so that a move cut short leaves a folder a rerun may replace."""
  if not FileSystems.exists(out):
    FileSystems.mkdirs(out)
  safe_outputs.write_marker(out, TOOL)
  old = [p for p in _files_under(out) if not p.endswith('/' + safe_outputs.MARKER)]
  if old:
    FileSystems.delete(old)
  new = sorted(_files_under(staging), key=lambda p: p.endswith('/kb.json'))
  dests = [FileSystems.join(out, p.rsplit('/', 1)[-1]) for p in new]
  for src, dst in zip(new, dests):   # one by one: kb.json must land after the tables
    FileSystems.rename([src], [dst])
  _delete_folder(staging)


def _delete_folder(folder):
  """Deletes a flat folder's files, then the folder where the filesystem has folders."""
  files = _files_under(folder)
  if files:
    FileSystems.delete(files)
  if FileSystems.exists(folder):
    FileSystems.delete([folder])


def run(args, beam_args):
  # pylint: disable=import-outside-toplevel
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from data_prep.i2e import kb, kb_build, runs
  staging = f'{args.out.rstrip("/")}.staging-{uuid.uuid4().hex[:8]}'
  # Earlier builds' leftovers (a crash) are removed; ours only, never through a link.
  safe_outputs.remove_stale(f'{args.out.rstrip("/")}.staging-*', TOOL)
  safe_outputs.make_staging(staging, TOOL)
  try:
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    kb_build.build_pipeline(p, args.wikidata, staging, args.languages, args.num_shards,
                            min_sitelinks=args.min_sitelinks,
                            excluded_types=args.exclude_types,
                            subclass_closure=args.subclass_closure,
                            index_shards=args.index_shards,
                            max_candidates_per_alias=args.max_candidates_per_alias)
    runs.run_to_completion(p)
    with FileSystems.open(FileSystems.join(staging, kb.KB_FILE)) as f:
      meta = json.loads(f.read().decode('utf-8'))
    move_into_place(staging, args.out)
  except BaseException:
    _delete_folder(staging)
    raise
  return meta


def main(argv=None):
  try:
    args, beam_args = parse_args(sys.argv[1:] if argv is None else argv)
    check_paths(args)
    meta = run(args, beam_args)
  except (UsageError, IOError) as e:
    print(f'build_kb: error: {e}', file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except
    msg = ' '.join(str(e).split())[:400]
    print(f'build_kb: error: the pipeline failed: {type(e).__name__}: {msg}', file=sys.stderr)
    return 1
  print(f'build_kb: {meta["num_entities"]} entities, {meta["num_aliases"]} aliases -> {args.out} '
        f'(skipped {meta["skipped"]}, dead-lettered {meta["dead_letter"]})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
