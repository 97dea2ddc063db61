"""Builds the demo corpus of the demo world (data_prep/demo_world/) and prints a summary.

  python -m data_prep.make_demo_corpus --out /tmp/mofi_demo/corpus [--num_entities 300 ...]

By default the corpus is built the real way (--builder i2e, demo_world/i2e_build.py): raw
web pairs and a Wikidata dump go through the Beam I2E pipeline, whose CLIP selection uses
a bootstrap CLIP trained first on the raw pairs; the summary reports the selection's
precision and recall against the generator's ground truth. --builder direct writes the
labelled corpus directly (seconds; what the unit tests use).

Every field of `demo_world.default_config()` is a flag. Re-running with the same flags is
a no-op; different flags on an existing demo corpus need --overwrite.
"""
import argparse
import json
import os
import sys
import time

from absl import logging

from data_prep import demo_world
from data_prep.demo_world import web
from mofi_jax import cli_errors
from mofi_jax.data import schema


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='corpus folder to create')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing demo corpus made with another config')
  web.add_config_flags(parser)
  parser.set_defaults(builder='i2e')
  args = parser.parse_args(argv)
  cfg = {k: getattr(args, k) for k in demo_world.default_config()}
  return args.out, cfg, args.overwrite


def summary(corpus_dir):
  meta, table = schema.validate_corpus(corpus_dir)
  lines = [
      f"corpus: {corpus_dir} (built by: {meta.get('synthetic_config', {}).get('builder', 'direct')})",
      f'  entities: {len(table)} (counts {table.counts.max()}..{table.counts.min()}, '
      f'most frequent first)',
      f'  train examples: {meta["num_train_examples"]} in {meta["num_shards"]} shards',
      f'  text_len: {meta["text_len"]}, vocab_size: {meta["vocab_size"]}',
      f'  retrieval: {meta["num_retrieval_categories"]} categories x 10 images in '
      f'{os.path.join(corpus_dir, meta["retrieval_dir"])}',
      f'  e.g. class 0: {table.ids[0]} {table.names[0]!r}: {table.descriptions[0]}',
  ]
  stats_path = os.path.join(corpus_dir, 'stats.json')
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      lines += selection_lines(json.load(f))
  return '\n'.join(lines)


def selection_lines(stats):
  sel = stats.get('demo_selection')
  if not sel:
    return []
  n = sel['counts']
  return [
      f'  pipeline: {stats["inputs"]} pairs in, {stats["written"]} written, filtered '
      f'{stats["filtered"]}, dead-lettered {stats["dead_letter"]}',
      f'  CLIP selection vs ground truth: precision {sel["precision"]:.3f} '
      f'(text only: {sel["text_only_precision"]:.3f}), recall {sel["recall"]:.3f} '
      f'({n["mentioned_true_kept"]} of {n["mentioned_true"]} named true entities kept), '
      f'distractors removed {sel["distractors_removed"]:.3f} '
      f'({n["distractors"] - n["distractors_kept"]} of {n["distractors"]})',
      f'  entity table: {sel["entities"]} entities, {sel["entities_never_drawn"]} of them '
      f'never drawn; {sel["drawn_entities_kept"]:.1%} of the drawn entities kept',
      '  build seconds: ' + ', '.join(f'{k} {v}' for k, v in sel['seconds'].items()),
  ]


def main(argv=None):
  out, cfg, overwrite = parse_args(argv)
  logging.use_absl_handler()  # The demo build logs each step it runs.
  logging.set_verbosity(logging.INFO)
  start = time.time()
  try:
    corpus_dir = demo_world.ensure_corpus(out, cfg, overwrite=overwrite)
  except (RuntimeError,) + cli_errors.input_errors() as e:
    cli_errors.exit_with('make_demo_corpus', e)
  print(f'ready in {time.time() - start:.1f}s')
  print(summary(corpus_dir))


if __name__ == '__main__':
  main()
