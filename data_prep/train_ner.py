r"""Trains a spaCy NER for the I2E mention stage from a KB and alt-texts (no download needed).

  python -m data_prep.train_ner --pairs 'raw/*.tar' --kb /tmp/kb --out /tmp/ner
  python -m data_prep.build_i2e ... --config.mentions.ner_model=/tmp/ner \
      --config.mentions.ner_gate=True

The alt-texts are labelled by the KB's aliases (data_prep/i2e/ner_train.py explains how) and
the NER is trained with `spacy train`. --out receives a pipeline folder that spacy.load and
`mentions.ner_model` read; its meta.json records the weak labels under 'i2e_weak_labels'.
--pairs: file pattern(s) of WebDataset tars, Parquet or TFRecord files (repeat the flag or
separate with commas), read with --config's `read` section. --out must be a local folder.

Reads like a table of contents: flags -> texts -> weak labels -> training -> move into place.
"""
import argparse
import os
import sys
import uuid

from mofi_jax import cli_errors

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              'configs', 'i2e.py')


TOOL = 'data_prep.train_ner'


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='data_prep.train_ner', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pairs', action='append', required=True, help='file pattern(s)')
  parser.add_argument('--kb', required=True, help='knowledge-base folder (data_prep.build_kb)')
  parser.add_argument('--out', required=True, help='pipeline folder to create (local)')
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='configs/i2e.py-style file')
  parser.add_argument('--max_texts', type=int, default=200_000, help='0 = every alt-text')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  args = parser.parse_args(argv)
  args.pairs = [p for flag in args.pairs for p in flag.split(',') if p]
  return args


def check_args(args):
  """Fails fast, naming the flag."""
  from data_prep.i2e import commit  # pylint: disable=import-outside-toplevel
  commit.check_out_dir(args.out, args.overwrite, tool=TOOL,
                       inputs=[('--kb', args.kb)] + [('--pairs', p) for p in args.pairs])
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise ValueError(f'--out {args.out}: exists and is not a folder')
  if args.epochs < 1 or args.max_texts < 0:
    raise ValueError(f'--epochs must be >= 1 and --max_texts >= 0, got {args.epochs}, '
                     f'{args.max_texts}')


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from data_prep.build_i2e import load_config  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import commit, kb as kb_lib, ner_train  # pylint: disable=import-outside-toplevel
  try:
    check_args(args)
    knowledge = kb_lib.KnowledgeBase.load(args.kb)
    read_config = dict(load_config(args.config).read)
    texts = ner_train.read_texts(args.pairs, read_config, args.max_texts)
    labelled, common = ner_train.weak_labels(texts, knowledge)
    out, run_id = os.path.abspath(args.out), uuid.uuid4().hex[:12]
    commit.remove_stale_temporaries(out, tool=TOOL)   # ours only, never through a link
    staging = commit.make_temporary_dir(commit.temporary_dir(out, run_id), tool=TOOL)
    summary = dict(texts=len(texts), entity_spans=sum(len(e.entities) for e in labelled),
                   missing_spans=sum(len(e.missing) for e in labelled),
                   common_forms=len(common), common_examples=sorted(common)[:50],
                   epochs=args.epochs, seed=args.seed, kb=args.kb)
    scores = ner_train.train(labelled, staging, epochs=args.epochs, seed=args.seed,
                             meta={'i2e_weak_labels': summary})
    commit.rename_into_place(staging, out, run_id, tool=TOOL)
  except cli_errors.input_errors() as e:
    cli_errors.exit_with('data_prep.train_ner', e)
  print(f'{args.out}: NER trained on {len(texts)} alt-texts ({summary["entity_spans"]} entity '
        f'spans, {len(common)} common surface forms); dev F1 on the weak labels '
        f'{scores.get("ents_f", 0):.3f}.')


if __name__ == '__main__':
  main()
