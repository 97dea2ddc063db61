r"""Why the NER gate matters when common words are KB aliases: false mentions with and without it.

  python benchmarks/ner_gate.py [--train 3000] [--test 2000] [--epochs 10] \
      [--plot docs/figures/ner_gate.png]

Writes the caption world of data_prep/demo_world/common_words.py (its KB has 'Sunset',
'Apple', 'Rain', 'Orange', 'Shell', 'Target', 'The Who' beside places and people), trains the
NER with `python -m data_prep.train_ner` on `--train` captions and scores held-out captions
(another seed) against their ground truth: per 100 captions, how many mentions name nothing
(false), the share of found mentions that are false, and the recall of the true ones, for the
alias matcher alone and gated by the NER. Figures are of this synthetic world.
"""
import argparse
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq

from configs import i2e as i2e_config
from data_prep import train_ner
from data_prep.demo_world import common_words
from data_prep.i2e import kb as kb_lib
from data_prep.i2e import mentions


def plot(rows, path):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
  for ax, key, title in zip(axes, ('false_per_100', 'recall'),
                            ('false mentions per 100 captions', 'recall of true mentions')):
    ax.bar(list(rows), [r[key] for r in rows.values()], color=['#c44', '#48c'])
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--train', type=int, default=3000)
  parser.add_argument('--test', type=int, default=2000)
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--plot', default='')
  args = parser.parse_args()
  read = i2e_config.get_config().read
  with tempfile.TemporaryDirectory() as work:
    kb_lib.write_small_kb(f'{work}/kb', common_words.kb_entities())
    texts = [c.text for c in common_words.captions(args.train, seed=0)]
    pq.write_table(pa.table({read.parquet_image_column: [b'-'] * len(texts),
                             read.parquet_caption_column[0]: texts}), f'{work}/pairs.parquet')
    train_ner.main(['--pairs', f'{work}/pairs.parquet', '--kb', f'{work}/kb',
                    '--out', f'{work}/ner', '--epochs', str(args.epochs)])
    import spacy  # pylint: disable=import-outside-toplevel
    kb = kb_lib.KnowledgeBase.load(f'{work}/kb')
    nlp = spacy.load(f'{work}/ner')
    held_out = common_words.captions(args.test, seed=1)
    rows = {'alias matcher': common_words.score(mentions.MentionFinder(kb), held_out),
            'NER gate': common_words.score(mentions.MentionFinder(kb, nlp, ner_gate=True),
                                           held_out)}
  print(f'\n{args.test} held-out captions; NER trained on {args.train}, {args.epochs} epochs')
  print(f'{"":16s} {"false/100":>10s} {"false share":>12s} {"recall":>8s}')
  for name, r in rows.items():
    print(f'{name:16s} {r["false_per_100"]:10.1f} {r["false_share"]:12.3f} {r["recall"]:8.3f}')
  if args.plot:
    plot(rows, args.plot)
    print(f'wrote {args.plot}')


if __name__ == '__main__':
  main()
