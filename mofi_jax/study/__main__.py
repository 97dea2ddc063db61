r"""The paper's comparisons in miniature, on the synthetic world, built the real way.

  python -m mofi_jax.study --workdir W                       # five recipes, 2 seeds (~25 min)
  python -m mofi_jax.study --workdir W --sweep entities      # label-space size (< 60 min)
  python -m mofi_jax.study --workdir W --sweep selection     # CLIP threshold (< 60 min)
  ... --quick                                                # minutes; checks the machinery

recipes (default): five models, same tower and budget, two seeds (arms.py).
entities, selection: sweeps.py gives their designs; W/worlds/ holds the worlds, shared by
the sweeps, and W/<sweep>/ their runs, results.csv, results.md and plots.

Stages: build the data (raw web pairs -> I2E with the Beam pipeline and its
bootstrap CLIP), train and evaluate every (model, seed), then write
results.md, results.csv and the plots into --workdir. Re-running skips the
runs that already finished (each run resumes from its checkpoints).
"""
import argparse
import os
import sys
import time

import jax
from absl import logging

from mofi_jax import cli_errors, run_setup
from mofi_jax.study import arms, data, heldout, plots, report, sweep
from mofi_jax.study.runner import say, train_all

HEADLINE = ['retrieval/map', 'zeroshot/top1', 'linear_probe/top1', 'knn/top1']


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m mofi_jax.study', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', required=True)
  p.add_argument('--sweep', choices=('recipes', 'entities', 'selection'), default='recipes')
  p.add_argument('--quick', action='store_true', help='tiny data and few steps')
  p.add_argument('--seeds', type=lambda s: [int(x) for x in s.split(',')], default=None,
                 help='comma-separated, e.g. 0,1,2 (default 0,1)')
  p.add_argument('--steps', type=int, default=None, help='train steps per model')
  return p.parse_args(argv)


def write_outputs(root, rows, corpora, header):
  say('embedding the held-out set with every model (per-domain mAP, t-SNE)')
  embeddings, categories, domains = heldout.embed_all(rows, corpora['heldout'])
  for r in rows:
    r['metrics'].update(heldout.domain_maps(embeddings[r['arm'], r['seed']], categories,
                                            domains))
  say('writing results.md, results.csv and plots')
  order = list(arms.ARMS)
  summary = report.aggregate(rows)
  report.write_csv(os.path.join(root, 'results.csv'), rows)
  metrics = [m for m in HEADLINE if any(m in s for s in summary.values())]
  metrics += sorted({k for s in summary.values() for k in s
                     if k.startswith(heldout.DOMAIN_PREFIX)})
  report.write_markdown(os.path.join(root, 'results.md'), summary, metrics=metrics,
                        header=header, arm_order=order)
  by_arm = lambda fn: {a: [fn(r['workdir']) for r in rows if r['arm'] == a] for a in order}
  plots.curves(os.path.join(root, 'train_loss.png'),
               by_arm(lambda w: report.scalar_curve(w, 'train/loss')),
               title='training loss (mean over seeds, band = min..max)', ylabel='loss')
  plots.curves(os.path.join(root, 'retrieval_map_curve.png'),
               by_arm(lambda w: report.eval_curve(w, 'retrieval/map')),
               title='held-out retrieval mAP during training', ylabel='mAP')
  plots.bars(os.path.join(root, 'map_by_model.png'), summary, 'retrieval/map',
             arm_order=order, title='held-out retrieval mAP (mean ± std over seeds)')
  first_seed = min(r['seed'] for r in rows)
  plots.tsne_grid(os.path.join(root, 'tsne.png'),
                  {a: embeddings[a, first_seed] for a in order if (a, first_seed) in embeddings},
                  categories, domains)
  return summary


def _cache_compiles(root):
  """Every seed of an arm runs the same programs: compile them once, on disk in the
  workdir (a re-run reuses them too). Saves about a third of a 40-step run."""
  jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    study(args)
  except cli_errors.input_errors() as e:
    cli_errors.exit_with('mofi_jax.study', e)


def study(args):
  """The three stages; results.md (printed at the end) and its figures under --workdir."""
  run_setup.quiet_libraries()
  logging.set_verbosity(logging.WARNING)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  _cache_compiles(root)
  if args.sweep != 'recipes':
    sweep.run(args.sweep, root, quick=args.quick, seeds=args.seeds, total_steps=args.steps)
    return
  t0 = time.time()
  # ------------------------------------------------------------------ data
  say('stage 1/3: data (raw web pairs -> pairs corpus, bootstrap CLIP, I2E)')
  corpora = data.build(os.path.join(root, 'data'), quick=args.quick, log=say)
  # -------------------------------------------------------- train + evaluate
  runs = arms.plan(corpora, quick=args.quick, seeds=args.seeds, total_steps=args.steps)
  say(f'stage 2/3: {len(runs)} runs ({len(arms.ARMS)} models x '
      f'{len({r.seed for r in runs})} seed(s))')
  rows = train_all(runs, root)
  # ------------------------------------------------------------------ report
  header = data.describe(corpora, runs, time.time() - t0)
  write_outputs(root, rows, corpora, header)
  say(f'done in {(time.time() - t0) / 60:.1f} min: {os.path.join(root, "results.md")}')
  with open(os.path.join(root, 'results.md')) as f:
    print(f.read())


if __name__ == '__main__':
  main()
