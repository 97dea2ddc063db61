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


def search_folder(index, encoder, folder, k, threshold):
  """Each image under `folder` against the index: its neighbours >= threshold. Returns
  {image path: hits}."""
  from mofi_jax import embed_inputs, search_queries  # pylint: disable=import-outside-toplevel
  items = list(embed_inputs.image_files(folder).items())
  found = {}
  for start in range(0, len(items), FOLDER_BATCH):
    names, images = [], []
    for item in items[start:start + FOLDER_BATCH]:
      data, reason = embed_inputs.read_bytes(item)
      try:
        if data is None:
          raise search_queries.QueryError(f'{item.image_path}: {reason}')
        vector = search_queries.image_vectors(encoder, [data], [item.image_path])
      except search_queries.QueryError as e:
        print(f'{PROG}: skipped: {e}', file=sys.stderr)
        continue
      names.append(item.image_path)
      images.append(vector[0])
    if not images:
      continue
    for name, hits in zip(names, index.search(images, k, threshold)):
      found[name] = hits
      _print(hits, query=name)
  return found


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
    with open(args.image, 'rb') as f:
      vector = search_queries.image_vectors(encoder, [f.read()], [args.image])[0]
    query = args.image
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
