"""Builds the synthetic demo corpus (mofi_jax/data/synthetic.py) and prints a summary.

  python -m data_prep.make_demo_corpus --out /tmp/mofi_demo [--num_entities 300 ...]

Every field of `default_synthetic_config()` is a flag. Re-running with the same flags is
a no-op; different flags on an existing demo corpus need --overwrite.
"""
import argparse
import os
import time

from mofi_jax.data import schema
from mofi_jax.data import synthetic


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='corpus folder to create')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing demo corpus made with another config')
  for key, value in synthetic.default_synthetic_config().items():
    parser.add_argument(f'--{key}', type=type(value), default=value)
  args = parser.parse_args(argv)
  cfg = {k: getattr(args, k) for k in synthetic.default_synthetic_config()}
  return args.out, cfg, args.overwrite


def summary(corpus_dir):
  meta, table = schema.validate_corpus(corpus_dir)
  lines = [
      f'corpus: {corpus_dir}',
      f'  entities: {len(table)} (counts {table.counts.max()}..{table.counts.min()}, '
      f'most frequent first)',
      f'  train examples: {meta["num_train_examples"]} in {meta["num_shards"]} shards',
      f'  text_len: {meta["text_len"]}, vocab_size: {meta["vocab_size"]}',
      f'  retrieval: {meta["num_retrieval_categories"]} categories x 10 images in '
      f'{os.path.join(corpus_dir, meta["retrieval_dir"])}',
      f'  e.g. class 0: {table.ids[0]} {table.names[0]!r}: {table.descriptions[0]}',
  ]
  return '\n'.join(lines)


def main(argv=None):
  out, cfg, overwrite = parse_args(argv)
  start = time.time()
  corpus_dir = synthetic.ensure_demo_corpus(out, cfg, overwrite=overwrite)
  print(f'ready in {time.time() - start:.1f}s')
  print(summary(corpus_dir))


if __name__ == '__main__':
  main()
