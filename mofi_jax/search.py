r"""Searches an index (python -m mofi_jax.index) by image, text or entity; prints JSON lines.

  python -m mofi_jax.search --index I --workdir W [--step N] --image photo.jpg [--k 10]
  python -m mofi_jax.search --index I --hf_clip F --text "a red bicycle"
  python -m mofi_jax.search --index I --workdir W --entity Q90
  python -m mofi_jax.search --index I --workdir W --image FOLDER [--threshold 0.9]

One line per result: {"rank", "score", "row", and the row's metadata (image_path, key, url,
caption, ...)}, best first. The model must be the one that embedded the collection.
--entity: the entity head's class vector of that Q-id, or the text tower on
'name, description' for a model without a head (search_queries.py).
--image FOLDER: every image under it (recursively) is a query; each result line also names
its "query", and only neighbours scoring >= --threshold (default 0.9) are printed: a
near-duplicate / decontamination report. Unreadable images are reported on stderr and
skipped. Bad input exits non-zero with one line.
"""
import argparse
import json
import os
import sys

# Before TensorFlow loads: its C++ INFO/WARNING lines would bury the one-line error.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # pylint: disable=wrong-import-position

from mofi_jax import cli_errors, model_flags, search_index  # pylint: disable=wrong-import-position

PROG = 'mofi_jax.search'
FOLDER_THRESHOLD = 0.9
FOLDER_BATCH = 64


def parse_args(argv):
  parser = argparse.ArgumentParser(prog=f'python -m {PROG}')
  parser.add_argument('--index', required=True, help='folder written by python -m mofi_jax.index')
  model_flags.add_model_flags(parser)
  query = parser.add_mutually_exclusive_group(required=True)
  query.add_argument('--image', help='an image file, or a folder of images (near-duplicates)')
  query.add_argument('--text', help='a text query (text tower)')
  query.add_argument('--entity', help='a Q-id of the model\'s entity table, e.g. Q90')
  parser.add_argument('--k', type=int, default=10, help='results per query')
  parser.add_argument('--threshold', type=float,
                      help=f'keep scores >= this (default: none; {FOLDER_THRESHOLD} for a folder)')
  return parser.parse_args(argv)


def _print(hits, **extra):
  for hit in hits:
    print(json.dumps(dict(hit, **extra), ensure_ascii=False, sort_keys=True, default=str))


def image_vectors(encoder, items):
  """(float32 [n_ok, D], the items embedded, {image_path: skip reason}) of image files,
  decoded as embed does them (image_limits' header checks, a bounded read), FOLDER_BATCH
  rows per tower call."""
  from mofi_jax import embed  # pylint: disable=import-outside-toplevel
  vectors, kept, skipped = [], [], {}
  for start in range(0, len(items), FOLDER_BATCH):
    batch = items[start:start + FOLDER_BATCH]
    for item, e in zip(batch, embed.embed_items(encoder, batch, FOLDER_BATCH, False)):
      if e.reason:
        skipped[item.image_path] = e.reason
      else:
        vectors.append(e.image)
        kept.append(item)
  dim = int(encoder.config.model.embed_dim)
  return np.asarray(vectors, np.float32).reshape(-1, dim), kept, skipped


def search_folder(index, encoder, folder, k, threshold):
  """Each image under `folder` against the index: its neighbours >= threshold. Returns
  {image path: hits}."""
  from mofi_jax import embed_inputs  # pylint: disable=import-outside-toplevel
  items = list(embed_inputs.image_files(folder).items())
  vectors, kept, skipped = image_vectors(encoder, items)
  for path, reason in skipped.items():
    print(f'{PROG}: skipped: {path}: {reason}', file=sys.stderr)
  found = {}
  for start in range(0, len(kept), FOLDER_BATCH):
    chunk = kept[start:start + FOLDER_BATCH]
    for item, hits in zip(chunk, index.search(vectors[start:start + FOLDER_BATCH], k, threshold)):
      found[item.image_path] = hits
      _print(hits, query=item.image_path)
  return found


def image_file_vector(encoder, path):
  from mofi_jax import embed_inputs, search_queries  # pylint: disable=import-outside-toplevel
  vectors, _, skipped = image_vectors(encoder, [embed_inputs.Item(image_path=path, key=path)])
  if skipped:
    raise search_queries.QueryError(f'--image {path}: cannot embed it ({skipped[path]}).')
  return vectors[0]


def run(args):
  """Searches as the flags say; returns {query: hits}."""
  model_flags.check_model_flags(args)
  if args.k < 1:
    raise ValueError(f'--k {args.k}: must be at least 1.')
  index = search_index.load(args.index)
  from mofi_jax import search_queries  # pylint: disable=import-outside-toplevel
  if args.image and not os.path.exists(args.image):
    raise FileNotFoundError(f'{args.image}: no such file or folder.')
  encoder = model_flags.load_encoder(args)
  if args.image and os.path.isdir(args.image):
    threshold = FOLDER_THRESHOLD if args.threshold is None else args.threshold
    return search_folder(index, encoder, args.image, args.k, threshold)
  if args.image:
    vector, query = image_file_vector(encoder, args.image), args.image
  elif args.text is not None:
    vector, query = search_queries.text_vector(encoder, args.text), args.text
  else:
    vector, _ = search_queries.entity_vector(encoder, args.entity)
    query = args.entity
  hits = index.search([vector], args.k, args.threshold)[0]
  _print(hits)
  return {query: hits}


def main(argv=None):
  return cli_errors.run_command(PROG, parse_args, run, argv)

if __name__ == '__main__':
  main()
