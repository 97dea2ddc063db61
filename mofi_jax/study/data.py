"""The study's data: the demo world's raw web pairs, and the I2E corpus built from them.

One call to `demo_world.ensure_corpus(builder='i2e')` runs the whole chain (web
pairs + Wikidata dump -> KB -> pairs corpus -> bootstrap CLIP -> I2E corpus, see
data_prep/demo_world/i2e_build.py); the study trains on two of its products:

  pairs   the cleaned raw pairs (alt-text only): the I2T baseline's data
  i2e     the entity-labelled corpus: every other model's data
  heldout the GPR1200-layout folder of unseen categories: every model's evaluation
"""
import json
import os

from data_prep import demo_world
from data_prep.demo_world import i2e_build
from mofi_jax.data import schema

FULL_WORLD = dict(builder='i2e')   # the demo's default world
# A smaller world and a shorter-trained bootstrap CLIP (a weaker selector) for --quick.
QUICK_WORLD = dict(builder='i2e', num_entities=80, images_per_entity=25,
                   retrieval_categories=16, bootstrap_steps=80)


def build(root, *, quick=False, log=print):
  world = QUICK_WORLD if quick else FULL_WORLD
  corpus = demo_world.ensure_corpus(os.path.join(root, 'i2e'), world)
  corpora = dict(i2e=corpus,
                 pairs=os.path.join(corpus, i2e_build.BUILD_DIR, 'pairs'),
                 heldout=os.path.join(corpus, demo_world.RETRIEVAL_DIR))
  for name, path in corpora.items():
    if not os.path.isdir(path):
      raise FileNotFoundError(f'study data: {name} folder {path} is missing; delete '
                              f'{root} and re-run to rebuild it.')
  stats = read_stats(corpus)
  log(f'data: {stats.get("inputs")} raw pairs -> {stats.get("written")} I2E images, '
      f'{len(schema.load_entities(corpus))} entities; selection '
      f'{json.dumps(stats.get(i2e_build.SELECTION_KEY, {}))}')
  return corpora


def read_stats(corpus):
  """The corpus's stats.json ({} without one)."""
  path = os.path.join(corpus, 'stats.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def describe(corpora, runs, seconds):
  """The header of results.md: what was compared, on what, how long it took."""
  stats = read_stats(corpora['i2e'])
  meta = schema.load_corpus_meta(corpora['i2e'])
  pairs_meta = schema.load_corpus_meta(corpora['pairs'])
  c = runs[0].config
  seeds = sorted({r.seed for r in runs})
  lines = [
      '# MOFI in miniature: results',
      '',
      f'- Data: {stats.get("inputs", "?")} synthetic web pairs; I2T baseline trains on the '
      f'{pairs_meta["num_train_examples"]} cleaned pairs, the others on the '
      f'{meta["num_train_examples"]} I2E images with {meta["num_entities"]} entities.',
      f'- {_selection_line(stats.get(i2e_build.SELECTION_KEY, {}))}',
      f'- Every model: ViT width {c.model.image.width}, depth {c.model.image.depth}, patch '
      f'{c.model.image.patch}, {c.input.image_size} px; {c.total_steps} steps x batch '
      f'{c.input.batch_size}; seeds {seeds}; mean ± sample std over seeds.',
      '- Evaluation on the held-out folder (categories never trained on): retrieval mAP '
      '(GPR1200 protocol); zero-shot, kNN and linear probe per configs/demo.py.',
      f'- Wall time {seconds / 60:.1f} min. Config of each run: its `config.json` '
      '(column `config` of results.csv).',
  ]
  return '\n'.join(lines)


def _selection_line(sel):
  """The bootstrap CLIP's selection against the synthetic world's ground truth."""
  if not sel:
    return 'CLIP selection: no ground-truth comparison in stats.json'
  seconds = ', '.join(f'{k} {v:.0f}' for k, v in sel.get('seconds', {}).items())
  return (f'CLIP selection vs ground truth: precision {sel["precision"]:.3f} (linking alone '
          f'{sel["text_only_precision"]:.3f}), recall {sel["recall"]:.3f}, distractor mentions '
          f'removed {sel["distractors_removed"]:.3f}. Build seconds: {seconds}.')
