r"""Evaluates features or checkpoints; prints JSON.

  python -m mofi_jax.evaluate gpr1200 --features F.npy

`F.npy` holds [12000, D] GPR1200 features in the official order (sorted by the
integer category, so row i has category i // 10), from any model. The output
has `all` and the six domains. Bad input (wrong shape, NaNs, a missing or
unreadable file) exits non-zero with one line naming the file and the problem.
"""
import argparse
import json
import sys

from mofi_jax.evals import gpr1200


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m mofi_jax.evaluate')
  sub = parser.add_subparsers(dest='eval', required=True)
  gpr = sub.add_parser('gpr1200', help='GPR1200 retrieval mAP of a features file')
  gpr.add_argument('--features', required=True, help='[12000, D] .npy, official order')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    results = gpr1200.score_features_file(args.features)
  except (OSError, ValueError) as e:
    where = '' if args.features in str(e) else f'{args.features}: '
    sys.exit(f'mofi_jax.evaluate: error: {where}{e}')
  print(json.dumps(results, indent=2, sort_keys=True))
  return results


if __name__ == '__main__':
  main()
