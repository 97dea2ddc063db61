r"""Exports a training checkpoint for other frameworks.

  python -m mofi_jax.export --workdir W [--step N] --format hf --out OUT [--overwrite]
  python -m mofi_jax.export --workdir W --format open_clip --out OUT
  python -m mofi_jax.export --workdir W --format savedmodel --out OUT

hf: a folder transformers loads with `AutoModel.from_pretrained(OUT)` (a
CLIPModel), with the tokenizer, the image preprocessor config and the entity
head beside it (see mofi_jax/interop/hf_export.py and docs/interop.md).
open_clip: a folder open_clip loads with `create_model_and_transforms('local-dir:OUT')`
and CLIP_benchmark with `--model_type open_clip --model local-dir:OUT`
(mofi_jax/interop/open_clip_export.py).
savedmodel: the image and text encoders as a TF SavedModel (jax2tf), batch size
polymorphic (mofi_jax/interop/savedmodel.py).

OUT is written to a temporary sibling and renamed when complete; a non-empty OUT
is refused unless --overwrite, which replaces only an earlier export (never the
workdir, its corpus, or a folder that contains them). Errors exit non-zero with one line.
"""
import argparse
import sys

from mofi_jax import cli_errors
from mofi_jax.interop import outputs

FORMATS = ('hf', 'open_clip', 'savedmodel')


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m mofi_jax.export')
  parser.add_argument('--workdir', required=True, help='training workdir (config.json, '
                      'checkpoints/)')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--format', required=True, choices=FORMATS)
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  parser.add_argument('--platforms', default='cpu,cuda,tpu',
                      help='savedmodel: platforms to serialise for, comma-separated')
  return parser.parse_args(argv)


def export(args):
  inputs = [('--workdir', args.workdir)]
  outputs.check_output_folder(args.out, args.overwrite, inputs)   # before the slow imports
  # Imported here so that --help and a bad --out are answered at once.
  from mofi_jax import inference  # pylint: disable=g-import-not-at-top
  from mofi_jax.interop import (hf_export, open_clip_export,  # pylint: disable=g-import-not-at-top
                                savedmodel)
  encoder = inference.load(args.workdir, args.step)
  inputs.append(('the corpus', encoder.config.input.data_dir))
  if args.format == 'hf':
    return hf_export.export_hf(encoder, args.out, overwrite=args.overwrite, inputs=inputs)
  if args.format == 'open_clip':
    return open_clip_export.export_open_clip(encoder, args.out, overwrite=args.overwrite,
                                             inputs=inputs)
  return savedmodel.export_savedmodel(encoder, args.out, overwrite=args.overwrite,
                                      platforms=tuple(args.platforms.split(',')),
                                      inputs=inputs)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    out = export(args)
  except cli_errors.input_errors() as e:
    message = str(e) if isinstance(e, (OSError, ValueError)) else cli_errors.one_line(e)
    sys.exit(f'mofi_jax.export: error: {" ".join(message.split())}')   # one line
  print(out)
  return out


if __name__ == '__main__':
  main()
