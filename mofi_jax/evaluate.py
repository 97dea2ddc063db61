r"""Evaluates a checkpoint (or a features file); prints JSON and writes it beside the checkpoint.

  python -m mofi_jax.evaluate gpr1200 --features F.npy
  python -m mofi_jax.evaluate gpr1200 --workdir W [--step N] --images DIR \
      [--official] [--save_features F.npy] [--resize 224 --image_size 224] [--preprocess mofi]
  python -m mofi_jax.evaluate zeroshot --workdir W --dataset imagenet2012 --data_dir D
  python -m mofi_jax.evaluate linear_probe --workdir W --dataset cifar10 --data_dir D
  python -m mofi_jax.evaluate knn --workdir W --dataset folder --data_dir W/corpus/retrieval
  python -m mofi_jax.evaluate classifier --workdir W --dataset imagefolder --data_dir D  # own head
  python -m mofi_jax.evaluate image_text --workdir W --data_dir FLICKR30K_TEST   # captions.jsonl
  python -m mofi_jax.evaluate entities --workdir W --image X.jpg [--k 10]

`--hf_clip FOLDER` (a Hugging Face CLIP folder) may replace `--workdir W [--step N]`.
`--dataset` is a TFDS name (read from --data_dir, never downloaded), `folder`, an image
folder in the GPR1200 layout with a categories.json (the demo's held-out set), or
`imagefolder`, torchvision's class_name/*.jpg layout (evals/class_folders.py). Accuracy is
reported as top1/top5 and as CLIP_benchmark's acc1/acc5, with mean_per_class_recall.
Results go to `<workdir>/eval/<eval>_<dataset>_step<N>.json` (see evals/results.py), or for
--hf_clip to `./eval_results/<folder name>/` (an imported folder is never written into).
`gpr1200 --features` scores [12000, D] features in the official order (row i has
category i // 10) and prints `all` and the six domains.
Bad input exits non-zero with one line naming the file, field or dataset at fault.
"""
import argparse
import json
import os
import sys

# Before TensorFlow loads: its C++ INFO/WARNING lines would bury the one-line error.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf

from mofi_jax import cli_errors, inference, model_flags
from mofi_jax.data import eval_transform
from mofi_jax.evals import (classifier, entities, gpr1200, image_text, knn, linear_probe,
                            results, zeroshot)
from mofi_jax.evals.embedding import Towers

USER_ERRORS = cli_errors.INPUT_ERRORS + (tf.errors.OpError,)


def _model_flags(parser):
  model = parser.add_mutually_exclusive_group()
  model.add_argument('--workdir', help='training workdir (config.json + checkpoints/)')
  model.add_argument('--hf_clip', help='Hugging Face CLIP folder instead of a workdir')
  parser.add_argument('--step', type=int, help='checkpoint step (default: newest)')
  parser.add_argument('--results_dir', help='default: <workdir>/eval, or '
                      './eval_results/<folder name> for --hf_clip')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--image_size', type=int, help='crop size; must be the model\'s')
  parser.add_argument('--resize', type=int,
                      help='shorter side before the crop (default: the crop size)')
  parser.add_argument('--preprocess', choices=eval_transform.EVAL_PREPROCESSINGS,
                      help='tf (ours) or mofi (ml-mofi\'s get_mofi_transform, the released '
                           'models\' eval input); default: the model\'s own (mofi for a '
                           '--hf_clip folder without a preprocessor_config.json), else tf')


def _data_flags(parser, splits):
  parser.add_argument('--dataset', required=True,
                      help='TFDS name, "folder" (GPR1200 layout) or "imagefolder" (class_name/*.jpg)')
  parser.add_argument('--data_dir', required=True, help='TFDS data_dir, or the image folder')
  for split in splits:
    parser.add_argument(f'--{split}', help='default: the dataset\'s usual split')


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m mofi_jax.evaluate')
  sub = parser.add_subparsers(dest='eval', required=True)
  gpr = sub.add_parser('gpr1200', help='GPR1200 retrieval mAP')
  gpr.add_argument('--features', help='[12000, D] .npy in the official order (no model needed)')
  gpr.add_argument('--images', help='image folder in GPR1200 layout ({category}_{name}.jpg)')
  gpr.add_argument('--official', action='store_true', help='demand 1,200 categories x 10')
  gpr.add_argument('--save_features', help='write the features here (.npy, official order)')
  zs = sub.add_parser('zeroshot', help='zero-shot top-1/top-5 (CLIP prompts)')
  zs.add_argument('--templates', help='imagenet | cifar | caltech101 | pets | identity | "..{}.."')
  zs.add_argument('--text_batch_size', type=int,
                  help='prompts per text batch (default 256; ml-mofi uses 16)')
  lp = sub.add_parser('linear_probe', help='logistic regression on frozen features')
  lp.add_argument('--max_iter', type=int, default=1000)
  lp.add_argument('--val_fraction', type=float, default=0.2)
  nn_ = sub.add_parser('knn', help='weighted kNN on frozen features (DINO)')
  nn_.add_argument('--k', type=int, default=knn.DEFAULT_K)
  nn_.add_argument('--temperature', type=float, default=knn.DEFAULT_TEMPERATURE)
  clf = sub.add_parser('classifier', help="the model's own head: top-1/top-5 (fine-tuned models)")
  it = sub.add_parser('image_text', help='image-text retrieval recall@1/5/10 both ways')
  it.add_argument('--dataset', default=image_text.DATASET,
                  help='"captions": --data_dir holds the images and captions.jsonl/.csv')
  it.add_argument('--data_dir', required=True, help='folder of images with its captions file')
  it.add_argument('--text_batch_size', type=int, help='captions per text batch (default 256)')
  ent = sub.add_parser('entities', help='top-k entities for an image: head vs text tower')
  ent.add_argument('--image', required=True)
  ent.add_argument('--k', type=int, default=10)
  _data_flags(zs, ['split'])
  _data_flags(lp, ['train_split', 'val_split', 'test_split'])
  _data_flags(nn_, ['train_split', 'test_split'])
  _data_flags(clf, ['test_split'])
  for p in (gpr, zs, lp, nn_, clf, it, ent):
    _model_flags(p)
  return parser.parse_args(argv)


def _checked_image_size(args, model_size):
  if args.image_size and args.image_size != model_size:
    raise ValueError(f'--image_size {args.image_size}, but the model takes {model_size} px '
                     'images.')
  return model_size


def _encoder_and_evaluator(args, build):
  """(Encoder, build(preprocessing)); a workdir's data is checked before the slow restore.

  preprocessing: {image_size: the model's crop size, resize: the shorter side before the
  crop (--resize, else the model's own, e.g. a HF folder's preprocessor, else the crop),
  preprocess: --preprocess, else the model's own (config.input.eval_preprocess), else tf}.
  """
  if not (args.workdir or args.hf_clip):
    raise ValueError(f'{args.eval} needs a model: pass --workdir W or --hf_clip FOLDER.')
  model_flags.check_model_flags(args)
  if args.hf_clip:
    encoder = model_flags.load_hf_clip(args.hf_clip)
    config = encoder.config
  else:
    encoder, config = None, inference.read_config(args.workdir)
  image_size = _checked_image_size(args, int(config.input.image_size))
  evaluator = build(dict(image_size=image_size,
                         resize=args.resize or config.input.get('eval_resize'),
                         preprocess=args.preprocess or config.input.get('eval_preprocess')))
  return encoder or inference.load(args.workdir, args.step), evaluator


def _results_dir(args):
  """--results_dir; else <workdir>/eval for our own runs, and ./eval_results/<folder name>
  for an imported --hf_clip folder, which is never written into (it may be read-only, or
  someone else's)."""
  if args.results_dir:
    return args.results_dir
  if args.workdir:
    return os.path.join(args.workdir, 'eval')
  return os.path.abspath(os.path.join('eval_results', os.path.basename(
      os.path.normpath(args.hf_clip))))


def _report(args, encoder, dataset, options, metrics, *, show=True):
  """Writes the results file; prints (if `show`) and returns what it holds, plus its path."""
  path = results.write(_results_dir(args), eval_name=args.eval, dataset=dataset,
                       step=encoder.step, source=encoder.source, options=options,
                       metrics=metrics)
  out = dict(eval=args.eval, dataset=dataset, step=encoder.step, metrics=metrics,
             results_file=path)
  if show:
    print(json.dumps(out, indent=2, sort_keys=True))
  return out


def _build(module, cfg, preprocessing):
  cfg = dict(cfg, resize=preprocessing['resize'], preprocess=preprocessing['preprocess'])
  return module.Evaluator(ml_collections.ConfigDict(cfg), image_size=preprocessing['image_size'])


def _dataset_tag(dataset, data_dir):
  if dataset in ('folder', 'imagefolder', image_text.DATASET):
    return f'{dataset}-{os.path.basename(os.path.normpath(data_dir))}'
  return dataset


def run_gpr1200(args):
  if args.features:
    if args.workdir or args.hf_clip or args.images:
      raise ValueError('--features scores a features file; do not also pass a model or --images.')
    scores = gpr1200.score_features_file(args.features)
    print(json.dumps(scores, indent=2, sort_keys=True))
    return scores
  if not args.images:
    raise ValueError('gpr1200 needs --features F.npy, or --images DIR with a model.')
  if args.save_features:
    if tf.io.gfile.exists(args.save_features):
      raise ValueError(f'{args.save_features} already exists; not overwriting it.')
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.save_features))):
      raise ValueError(f'{args.save_features}: its folder does not exist.')
  cfg = dict(data_dir=args.images, batch_size=args.batch_size, official=args.official)
  encoder, evaluator = _encoder_and_evaluator(args, lambda pre: _build(gpr1200, cfg, pre))
  features = evaluator.embed(Towers.from_encoder(encoder))
  if args.save_features:
    tmp = f'{args.save_features}.tmp-{os.getpid()}.npy'
    np.save(tmp, features)
    os.replace(tmp, args.save_features)
  metrics = evaluator.score(features)
  return _report(args, encoder, os.path.basename(os.path.normpath(args.images)),
                 evaluator.info, metrics)


def run_classification(args):
  """zeroshot, linear_probe, knn, classifier and image_text: the same evaluators as in
  training, on any model."""
  module = {'zeroshot': zeroshot, 'linear_probe': linear_probe, 'knn': knn,
            'classifier': classifier, 'image_text': image_text}[args.eval]
  keys = ('dataset', 'data_dir', 'split', 'train_split', 'val_split', 'test_split',
          'templates', 'max_iter', 'val_fraction', 'k', 'temperature', 'batch_size',
          'text_batch_size')
  cfg = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
  encoder, evaluator = _encoder_and_evaluator(args, lambda pre: _build(module, cfg, pre))
  metrics = evaluator.run(Towers.from_encoder(encoder))
  return _report(args, encoder, _dataset_tag(args.dataset, args.data_dir), evaluator.info,
                 metrics)


def run_entities(args):
  with tf.io.gfile.GFile(args.image, 'rb') as f:
    image_bytes = f.read()
  encoder, _ = _encoder_and_evaluator(args, lambda preprocessing: None)
  try:
    ranked = entities.rank_entities(encoder, image_bytes, args.k, cache=True)
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f'{args.image}: unreadable image ({e.message.splitlines()[0]}).') from e
  stem = os.path.splitext(os.path.basename(args.image))[0]
  out = _report(args, encoder, stem, dict(image=os.path.abspath(args.image), k=args.k), ranked,
                show=False)
  print(f'{args.image} ({encoder.source}):')
  print(entities.format_table(ranked))
  print(f'results: {out["results_file"]}')
  return out


COMMANDS = {'gpr1200': run_gpr1200, 'zeroshot': run_classification,
            'linear_probe': run_classification, 'knn': run_classification,
            'classifier': run_classification, 'image_text': run_classification,
            'entities': run_entities}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    return COMMANDS[args.eval](args)
  except USER_ERRORS as e:
    message = cli_errors.one_line(e)
    where = args.features if args.eval == 'gpr1200' and args.features else ''
    prefix = f'{where}: ' if where and where not in message else ''
    sys.exit(f'mofi_jax.evaluate: error: {prefix}{message}')


if __name__ == '__main__':
  main()
