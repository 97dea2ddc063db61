r"""Serves an index (python -m mofi_jax.index) over HTTP: a search API and one web page.

  python -m mofi_jax.serve --index I --workdir W [--step N] [--host 127.0.0.1] [--port 8000]
  python -m mofi_jax.serve --index I --hf_clip F [--image_root DIR] [--max_upload_mb 16]

The model and the index load once, and the model is compiled before the port opens, so
the first query is as fast as the rest. Open http://HOST:PORT/ for the page; the routes are
listed in serve_app.py and documented at /docs. clip-front works against it unchanged
(clip_back_api.py). The model must be the one that embedded the collection. Bad input at
start (an index folder, a model of another dimension) exits non-zero with one line.
"""
import argparse
import os
import sys

# Before TensorFlow loads: its C++ INFO/WARNING lines would bury the one-line error.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from mofi_jax import cli_errors, model_flags, search_index  # pylint: disable=wrong-import-position

PROG = 'mofi_jax.serve'


def parse_args(argv):
  parser = argparse.ArgumentParser(prog=f'python -m {PROG}')
  parser.add_argument('--index', required=True, help='folder written by python -m mofi_jax.index')
  model_flags.add_model_flags(parser)
  parser.add_argument('--host', default='127.0.0.1', help='address to listen on')
  parser.add_argument('--port', type=int, default=8000)
  parser.add_argument('--image_root', help='serve row images from this folder (default: the '
                      'folder python -m mofi_jax.embed --images read)')
  parser.add_argument('--max_upload_mb', type=float, default=16, help='largest image upload')
  return parser.parse_args(argv)


def warm_up(encoder):
  """Traces and compiles what queries run (decoding, the image tower, raw for the head,
  the text tower) before serving, on a small generated image."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = io.BytesIO()
  Image.new('RGB', (32, 32), (128, 64, 32)).save(image, 'PNG')
  pixels = encoder.preprocess([image.getvalue()])
  encoder.embed_images(pixels)
  if encoder.has_head:
    encoder.embed_images(pixels, normalize=False)
  if encoder.has_text and encoder.tokenize is not None:
    encoder.embed_texts(['warm up'])


def load_service(args):
  model_flags.check_model_flags(args)
  if args.image_root and not os.path.isdir(args.image_root):
    raise FileNotFoundError(f'--image_root {args.image_root}: no such folder.')
  index = search_index.load(args.index)
  # Requests run concurrently, one thread each; an OpenMP team per search as well would
  # oversubscribe the cores (docs/benchmarks.md, "Search": the API figures).
  import faiss  # pylint: disable=import-outside-toplevel
  faiss.omp_set_num_threads(1)
  # After the index: TensorFlow's start-up lines would bury a bad --index's one line.
  from mofi_jax import search_service  # pylint: disable=import-outside-toplevel
  encoder = model_flags.load_encoder(args)
  dim = int(encoder.config.model.embed_dim)
  if dim != index.dim:
    raise ValueError(f'{args.index}: holds {index.dim}-d vectors, but {encoder.source} embeds '
                     f'{dim}-d ones; serve it with the model that embedded the collection.')
  warm_up(encoder)
  return search_service.SearchService(encoder, index, root=args.image_root,
                                      max_bytes=int(args.max_upload_mb * (1 << 20)))


def run(args):
  if not 0 < args.port < 65536:
    raise ValueError(f'--port {args.port}: expected 1..65535.')
  service = load_service(args)
  import uvicorn  # pylint: disable=import-outside-toplevel
  from mofi_jax import serve_app  # pylint: disable=import-outside-toplevel
  print(f'{PROG}: {len(service.index.rows)} rows of {service.name}, images from '
        f'{service.root or "nowhere"}; http://{args.host}:{args.port}/', file=sys.stderr)
  uvicorn.run(serve_app.create_app(service), host=args.host, port=args.port,
              log_level='warning')


def main(argv=None):
  return cli_errors.run_command(PROG, parse_args, run, argv)

if __name__ == '__main__':
  main()
