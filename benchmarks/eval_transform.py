r"""Eval preprocessing throughput: images/s of the 'tf' and 'mofi' paths in tf.data.

  JAX_PLATFORMS=cpu python benchmarks/eval_transform.py --images 600

Writes `--images` JPEGs of web-photo sizes (shorter side 300-800 px, both orientations)
and streams them through evals.image_folder.image_batches, as `evaluate gpr1200` does,
once per preprocessing. 'mofi' runs NumPy and PIL under tf.numpy_function, so it holds
the GIL for part of each image; the ratio says what choosing it costs an evaluation.
"""
import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from mofi_jax.data import eval_transform
from mofi_jax.evals import image_folder


def write_jpegs(folder, n, seed=0):
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    short, ratio = rng.integers(300, 800), rng.uniform(1.0, 1.6)
    h, w = (short, int(short * ratio)) if i % 2 else (int(short * ratio), short)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, 'JPEG', quality=90)
    paths.append(os.path.join(folder, f'{i // 10}_{i:05d}.jpg'))
    with open(paths[-1], 'wb') as f:
      f.write(buf.getvalue())
  return paths


def time_path(paths, method, batch_size):
  transform = eval_transform.EvalTransform(224, method=method)
  start, cpu = time.perf_counter(), time.process_time()
  n = sum(len(x) for x, _ in image_folder.image_batches(paths, [0] * len(paths), transform,
                                                         batch_size))
  return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--images', type=int, default=600)
  parser.add_argument('--batch_size', type=int, default=64)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    paths = write_jpegs(folder, args.images)
    time_path(paths[:args.batch_size], 'mofi', args.batch_size)   # warm-up: tracing
    results = {m: time_path(paths, m, args.batch_size) for m in ('tf', 'mofi')}
  for method, (wall, per_cpu) in results.items():
    print(f'{method:5s} {wall:8.1f} images/s wall  {per_cpu:8.1f} images/s per CPU-second')
  print(f'mofi / tf wall: {results["mofi"][0] / results["tf"][0]:.2f}')


if __name__ == '__main__':
  main()
