"""The model flags of the commands that embed with a trained model (embed, search, serve):
`--workdir W [--step N]` or `--hf_clip FOLDER`, and the Encoder they name."""
import os


def add_model_flags(parser):
  model = parser.add_mutually_exclusive_group(required=True)
  model.add_argument('--workdir', help='training workdir (config.json + checkpoints/)')
  model.add_argument('--hf_clip', help='Hugging Face CLIP folder (released MOFI included)')
  parser.add_argument('--step', type=int, help='checkpoint step (default: newest)')


def check_model_flags(args):
  if args.hf_clip and args.step is not None:
    raise ValueError('--step applies to --workdir checkpoints, not to --hf_clip.')


def model_spec(args):
  """The model the flags name, with absolute paths (what a run records)."""
  if args.workdir:
    return dict(workdir=os.path.abspath(args.workdir), step=args.step)
  return dict(hf_clip=os.path.abspath(args.hf_clip))


def load_encoder(args):
  """The inference.Encoder the flags name (imports JAX and the model: call it late)."""
  from mofi_jax import inference  # pylint: disable=import-outside-toplevel
  check_model_flags(args)
  if args.hf_clip:
    return load_hf_clip(args.hf_clip)
  return inference.load(os.path.abspath(args.workdir), args.step)


def load_hf_clip(folder):
  """The inference.Encoder of a Hugging Face CLIP folder (released MOFI folders included).
  Here, not in inference.py: interop imports inference, so the way back would be a circle."""
  try:
    from mofi_jax.interop import hf_import  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f'--hf_clip needs mofi_jax.interop.hf_import, which cannot be imported '
                     f'({e}).') from e
  return hf_import.load_encoder(folder)
