"""CLIP_benchmark's command line, runnable beside NumPy >= 2.4.

  python -m mofi_jax.interop.clip_benchmark_cli eval --model_type open_clip \
      --model local-dir:OUT --pretrained none --dataset wds/NAME --dataset_root D ...

This is `clip_benchmark` (clip-benchmark 1.6.2, the newest release) with one repair: its
top-k `accuracy` (metrics/zeroshot_classification.py, also used by the linear probe) calls
`float()` on a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can
be converted to Python scalars"), so every zero-shot classification run fails. Here
`float` inside that module accepts a one-element array; every figure is still computed by
clip_benchmark's own code. With NumPy < 2.4 the plain `clip_benchmark` command works too.
"""
import builtins
import sys

import numpy as np


def _float(x):
  return builtins.float(np.asarray(x).reshape(-1)[0]) if np.size(x) == 1 else builtins.float(x)


def main(argv=None):
  from clip_benchmark import cli  # pylint: disable=g-import-not-at-top  (optional extra)
  from clip_benchmark.metrics import zeroshot_classification  # pylint: disable=g-import-not-at-top
  zeroshot_classification.float = _float   # shadows the builtin in that module only
  sys.argv = ['clip_benchmark'] + list(sys.argv[1:] if argv is None else argv)
  return cli.main()


if __name__ == '__main__':
  main()
