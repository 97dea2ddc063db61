r"""Embeds an image collection with a model, into clip-retrieval's layout (embed_shards.py).

  python -m mofi_jax.embed --workdir W [--step N] --images 'photos/**/*.jpg' --out E
  python -m mofi_jax.embed --hf_clip F --pairs 'laion/*.tar' --captions --out E
  python -m mofi_jax.embed --workdir W --tfds NAME --data_dir D [--split train] --out E
      [--shard_size 10000] [--batch_size 256] [--process_id I --num_processes N] [--overwrite]

Images go through the model's evaluation preprocessing (Encoder.preprocess, as `evaluate`),
after image_limits' header checks. An image that cannot be embedded (unreadable, empty, too
large, a reader's dead letter) is skipped and counted by reason in stats.json, never fatal.
Shard i holds input positions [i * shard_size, (i+1) * shard_size) in embed_inputs' order;
process p writes the shards i with i % num_processes == p, skipping finished ones, so a
re-run resumes. Bad flags, inputs or --out end with one line and a non-zero exit.
"""
import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
from typing import Optional

# Before TensorFlow loads: its C++ INFO/WARNING lines would bury the one-line error.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np
from tqdm import tqdm

from mofi_jax import cli_errors, embed_inputs, embed_shards, model_flags
from mofi_jax.data import image_limits
from mofi_jax.evals import embedding

PROG = 'mofi_jax.embed'


def build_parser(prog=PROG):
  parser = argparse.ArgumentParser(prog=f'python -m {prog}')
  model_flags.add_model_flags(parser)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--images', help="image files: a glob ('**' recursive) or a folder")
  source.add_argument('--pairs', help='img2dataset/WebDataset tars, Parquet or TFRecord (glob)')
  source.add_argument('--tfds', help='TFDS dataset name, read from --data_dir')
  parser.add_argument('--data_dir', help='TFDS data_dir holding the prepared dataset')
  parser.add_argument('--split', default='train', help='TFDS split (default: train)')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--shard_size', type=int, default=10000, help='inputs per shard')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--captions', action='store_true', help='also embed the captions')
  parser.add_argument('--process_id', type=int, help='this process (default: JAX\'s, or 0)')
  parser.add_argument('--num_processes', type=int, help='processes sharing the shards')
  parser.add_argument('--overwrite', action='store_true', help='replace another run in --out')
  return parser


def parse_args(argv):
  return build_parser().parse_args(argv)


def check_flags(args):
  if args.shard_size < 1 or args.batch_size < 1:
    raise ValueError('--shard_size and --batch_size must be positive.')
  model_flags.check_model_flags(args)
  if args.tfds and not args.data_dir:
    raise ValueError('--tfds needs --data_dir (the prepared data; nothing is downloaded).')
  if args.captions and args.images:
    raise ValueError('--captions needs inputs with captions (--pairs or --tfds), not --images.')
  if (args.process_id is None) != (args.num_processes is None):
    raise ValueError('--process_id and --num_processes go together.')
  if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
    raise ValueError(f'--process_id {args.process_id} is not in 0..--num_processes - 1.')


def process_share(args):
  """(process_id, num_processes): the flags, else JAX's when jax.distributed is initialised."""
  if args.process_id is not None:
    return args.process_id, args.num_processes
  import jax  # pylint: disable=import-outside-toplevel
  if jax.distributed.is_initialized():
    return jax.process_index(), jax.process_count()
  return 0, 1


def input_paths(args):
  return [('--workdir', args.workdir), ('--hf_clip', args.hf_clip), ('--images', args.images),
          ('--pairs', args.pairs), ('--data_dir', args.data_dir)]


def run_spec(args, inputs):
  """What the flags ask for, as embed_info.json records it (compared on a resume)."""
  return dict(tool=embed_shards.TOOL, model=model_flags.model_spec(args), input=inputs.spec,
              shard_size=args.shard_size, captions=args.captions)


def model_info(args, encoder, inputs):
  if args.captions and not inputs.has_captions:
    raise ValueError(f'--captions: the input has no captions ({inputs.spec}).')
  if args.captions and (not encoder.has_text or encoder.tokenize is None):
    raise ValueError(f'--captions: {encoder.source} has no text tower or tokenizer.')
  config = encoder.config.input
  return dict(source=encoder.source, step=encoder.step, dim=int(encoder.config.model.embed_dim),
              preprocessing=dict(image_size=encoder.image_size,
                                 resize=config.get('eval_resize') or encoder.image_size,
                                 preprocess=config.get('eval_preprocess') or 'tf'))


def decode(encoder, item):
  """(pixels [S, S, 3] or None, skip reason, (width, height) or None) of one item."""
  data, reason = (None, item.skip) if item.skip else embed_inputs.read_bytes(item)
  if reason or not data:
    return None, reason or 'empty_file', None
  try:
    size = image_limits.header_size(data, all_frames=True)
  except image_limits.ImageLimitError as e:
    return None, e.reason, None
  try:
    return encoder.preprocess([data])[0], '', size
  except Exception:  # pylint: disable=broad-except  # TF and PIL raise many kinds on junk
    return None, 'unreadable_image', None


@dataclasses.dataclass(frozen=True)
class Embedded:
  """What became of one item: its metadata row and embeddings, or the reason it was skipped
  (no image bytes: this is what crosses a Beam shuffle)."""
  count: int
  reason: str = ''
  row: Optional[dict] = None
  image: Optional[np.ndarray] = None
  text: Optional[np.ndarray] = None


def embed_items(encoder, batch, batch_size, captions, pool=None):
  """Items -> one Embedded each. Every tower call sees batch_size rows (zero-padded), so a
  row's embedding does not depend on which batch it came in (local and Beam runs agree)."""
  decoded = list((pool.map if pool else map)(lambda i: decode(encoder, i), batch))
  good = [j for j, (_, reason, _) in enumerate(decoded) if not reason]
  images = texts = None
  if good:
    pixels = np.stack([decoded[j][0] for j in good])
    images = encoder.embed_images(embedding.pad_batch(pixels, batch_size), batch_size)
    if captions:
      text = [batch[j].caption or '' for j in good]
      texts = encoder.embed_texts(embedding.pad_batch(text, batch_size), batch_size)
  out, row = [], {j: n for n, j in enumerate(good)}
  for j, (item, (_, reason, size)) in enumerate(zip(batch, decoded)):
    if reason:
      out.append(Embedded(item.count, reason))
      continue
    width, height = size or (None, None)
    meta = dict(image_path=item.image_path, key=item.key, url=item.url, caption=item.caption,
                width=width, height=height)
    out.append(Embedded(item.count, row=meta, image=images[row[j]],
                        text=None if texts is None else texts[row[j]]))
  return out


def write_embedded(out, index, embedded, dim, captions):
  """Shard `index`'s files from its items' Embedded, in input order."""
  kept = [e for e in embedded if not e.reason]
  skipped = collections.Counter()
  for e in embedded:
    if e.reason:
      skipped[e.reason] += e.count
  stack = lambda xs: np.stack(xs) if xs else np.zeros((0, dim), np.float32)
  counts = dict(seen=sum(e.count for e in embedded), embedded=len(kept),
                skipped=dict(sorted(skipped.items())))
  embed_shards.write_shard(out, index, stack([e.image for e in kept]),
                           stack([e.text for e in kept]) if captions else None,
                           [e.row for e in kept], counts)


def embed_shard(encoder, items, pool, args, bar, out, index):
  embedded = []
  items = iter(items)
  while batch := list(itertools.islice(items, args.batch_size)):
    embedded += embed_items(encoder, batch, args.batch_size, args.captions, pool)
    bar.update(len(batch))
  write_embedded(out, index, embedded, int(encoder.config.model.embed_dim), args.captions)


def pending_total(total, args, mine):
  """Inputs in this process's unfinished shards, for the progress bar's ETA."""
  if total is None:
    return None
  shards = range(-(-total // args.shard_size))
  return sum(min(args.shard_size, total - i * args.shard_size) for i in shards if mine(i))


def embed_all(encoder, inputs, args, out):
  """Writes this process's unfinished shards; returns the number of shards of the inputs."""
  process_id, num_processes = process_share(args)
  mine = lambda i: i % num_processes == process_id and not embed_shards.is_done(out, i)
  positions = enumerate(inputs.items())
  num_shards = 0
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool, tqdm(
      total=pending_total(inputs.total, args, mine), unit='img', desc='embed') as bar:
    for index, group in itertools.groupby(positions, lambda p: p[0] // args.shard_size):
      num_shards = index + 1
      if mine(index):
        embed_shards.clear_temporaries(out, index)
        embed_shard(encoder, (item for _, item in group), pool, args, bar, out, index)
  return num_shards


def prepare(args):
  """(out, inputs, encoder, embed_info) of checked flags, --out opened for the run (shared
  with the Beam pipeline, data_prep/embed_beam.py)."""
  out = os.path.abspath(args.out)
  inputs = embed_inputs.open_inputs(args)
  spec = run_spec(args, inputs)
  embed_shards.check_output(out, spec, args.overwrite, input_paths(args))  # before the load
  encoder = model_flags.load_encoder(args)
  info = dict(spec, **model_info(args, encoder, inputs))
  embed_shards.open_output(out, info, args.overwrite, input_paths(args))
  return out, inputs, encoder, info


def run(args):
  check_flags(args)
  out, inputs, encoder, _ = prepare(args)
  return report(out, embed_all(encoder, inputs, args, out))


def report(out, num_shards):
  """Writes stats.json (the done shards' counts) and prints it as one JSON line."""
  stats = embed_shards.write_stats(out, num_shards)
  print(json.dumps(stats, sort_keys=True))
  return stats


def main(argv=None):
  return cli_errors.run_command(PROG, parse_args, run, argv)


if __name__ == '__main__':
  main()
