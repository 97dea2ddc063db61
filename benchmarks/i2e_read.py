r"""Read + clean throughput of the I2E pipeline: pairs/s per core.

  JAX_PLATFORMS=cpu python benchmarks/i2e_read.py --pairs 2000 --image_size 256

Writes `--pairs` synthetic web pairs (JPEGs of drawn shapes on gradients, ~web-thumbnail
size, with noisy HTML-escaped alt-texts) into `--shards` WebDataset tars, then measures:
  1. the stage logic alone, no Beam: read.read_tar -> clean.normalize_text /
     truncate_words / verify_image -> sha256 (what one core does per pair);
  2. ReadPairs + DedupPairs + CleanPairs on Beam's DirectRunner (in_memory, one worker),
     i.e. with the runner's own per-element costs (pickling, the dedup shuffles of small
     records, the second read of the survivors).
Per-core figures divide by the process CPU time, so they hold on a busy machine; wall
figures are printed too.
"""
import argparse
import hashlib
import io
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

from data_prep.i2e import clean, dedup, read


def make_shards(folder, num_pairs, num_shards, image_size, seed=0):
  """WebDataset tars of drawn images; returns their total bytes."""
  import tarfile  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  total = 0
  for shard in range(num_shards):
    with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w') as tar:
      for i in range(shard, num_pairs, num_shards):
        members = {'jpg': _image(rng, image_size),
                   'txt': f'photo #{i} of a &quot;thing&quot; &amp; more   at the fair'.encode()}
        for ext, data in members.items():
          info = tarfile.TarInfo(f'{i:09d}.{ext}')
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
          total += len(data)
  return total


def _image(rng, size):
  ramp = np.linspace(0, 1, size, dtype=np.float32)
  base = (rng.uniform(40, 200, 3) * (0.5 + ramp[:, None, None] * ramp[None, :, None]))
  image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(4):
    x, y = rng.integers(0, size, 2)
    r = int(rng.integers(size // 10, size // 3))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  # Sensor-like noise: brings JPEG sizes to those of web images (~20-30 KiB at 256px).
  noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (size, size, 3))
  out = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, 'JPEG', quality=85)
  return out.getvalue()


def stage_logic(paths, max_chars):
  """Pairs through the read and clean logic without Beam; returns the number kept."""
  kept = 0
  for path in paths:
    for pair in read.read_tar(path, ('caption', 'txt')):
      text = clean.truncate_words(clean.normalize_text(pair.text), max_chars)
      image, error = clean.verify_image(pair.image)
      if text and not error:
        hashlib.sha256(image).digest()
        kept += 1
  return kept


def beam_read_clean(pattern):
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  options = PipelineOptions(['--direct_running_mode=in_memory', '--direct_num_workers=1'])
  with beam.Pipeline(options=options) as p:
    reader = read.ReadPairs([pattern])
    index = p | reader
    pairs = index['main'] | dedup.DedupPairs(reader.read_fn)
    cleaned = pairs['main'] | clean.CleanPairs()
    _ = cleaned['main'] | beam.combiners.Count.Globally()


def timed(fn, *args):
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn(*args)
  return out, time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', type=int, default=2000)
  parser.add_argument('--shards', type=int, default=4)
  parser.add_argument('--image_size', type=int, default=256)
  parser.add_argument('--skip_beam', action='store_true')
  args = parser.parse_args()
  folder = tempfile.mkdtemp(prefix='i2e_read_bench-')
  try:
    size = make_shards(folder, args.pairs, args.shards, args.image_size)
    print(f'{args.pairs} pairs in {args.shards} tars, {size / args.pairs / 1024:.1f} KiB/pair, '
          f'{args.image_size}px JPEGs')
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    stage_logic(paths[:1], 1000)  # Warm-up: imports, PIL plugins.
    kept, wall, cpu = timed(stage_logic, paths, 1000)
    assert kept == args.pairs, (kept, args.pairs)
    print(f'read+clean logic (no Beam): {kept / cpu:8.0f} pairs/s per core '
          f'({kept / wall:.0f} pairs/s wall, {cpu:.2f} s CPU)')
    if not args.skip_beam:
      _, wall, cpu = timed(beam_read_clean, os.path.join(folder, '*.tar'))
      print(f'ReadPairs+DedupPairs+CleanPairs, DirectRunner in_memory x1: '
            f'{args.pairs / cpu:8.0f} pairs/s per core ({args.pairs / wall:.0f} pairs/s wall, {cpu:.2f} s CPU, '
            'including pipeline start-up)')
  finally:
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
  main()
