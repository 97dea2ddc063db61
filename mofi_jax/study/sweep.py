"""The two sweeps, end to end: worlds (or corpora), runs, then results.csv, results.md and plots.

Each point of a sweep is one corpus: a world of N entities (entities) or one threshold's
corpus of one world (selection). Its runs live under
{root}/entities/{world}/runs/{arm}/seed{s} or {root}/selection/{world}/{corpus}/runs/...; a
re-run skips what finished. Results are computed only from what each run wrote
(eval_results.jsonl) and what each build wrote (stats.json, selection.json).
"""
import concurrent.futures
import dataclasses
import os
import shutil
import time

from mofi_jax.data import schema
from mofi_jax.study import arms, sweep_plots, sweep_report, sweeps, worlds
from mofi_jax.study.runner import say, train_all

METRICS = ('retrieval/map', 'zeroshot/top1', 'linear_probe/top1', 'knn/top1')
BUILD_WORKERS = 2


def run(name, root, *, quick=False, seeds=None, total_steps=None):
  """Runs sweep `name` ('entities' | 'selection') under `root`; returns (the results folder,
  the plotted series)."""
  t0 = time.time()
  out = os.path.join(root, name)
  design = sweeps.entities(quick) if name == 'entities' else sweeps.selection(quick)
  design = dataclasses.replace(design, seeds=tuple(seeds or design.seeds),
                               total_steps=total_steps or design.total_steps)
  points = _entity_points if name == 'entities' else _selection_points
  rows = []
  for point, run_root, corpora, info in points(design, root):
    runs = [arms.Run(arm, seed, arms.arm_config(arm, seed, corpora=corpora,
                                                total_steps=design.total_steps,
                                                curve_points=0))
            for seed in design.seeds for arm in design.arms]
    say(f'{name} sweep, point {point}: {len(runs)} runs')
    for row in train_all(runs, os.path.join(out, run_root)):
      rows.append(dict(row, point=point, config_file=_keep_config(out, point, row), **info))
  say(f'{name} sweep: writing results.csv, results.md and plots into {out}')
  sweep_report.write_csv(os.path.join(out, sweep_report.CSV), rows)
  series = sweep_plots.plot(name, out, rows, METRICS)
  sweep_report.write_markdown(os.path.join(out, 'results.md'), name, design, rows,
                              METRICS, minutes=(time.time() - t0) / 60)
  say(f'done in {(time.time() - t0) / 60:.1f} min: {os.path.join(out, "results.md")}')
  return out, series


def _keep_config(out, point, row):
  """Copies a run's config.json to {out}/configs/ (results are published without runs/);
  returns its path relative to {out}."""
  name = os.path.join('configs', f'{point}_{row["arm"]}_seed{row["seed"]}.json')
  os.makedirs(os.path.join(out, 'configs'), exist_ok=True)
  shutil.copyfile(row['config_file'], os.path.join(out, name))
  return name


def _in_parallel(fn, items):
  """[fn(item)], BUILD_WORKERS at a time: each build is a chain of subprocesses, mostly one
  core each (start-up, compiles, an in-memory Beam runner), so two overlap well."""
  with concurrent.futures.ThreadPoolExecutor(BUILD_WORKERS) as pool:
    return list(pool.map(fn, items))


def _entity_points(design, root):
  """(point name, its runs' folder, corpora, csv fields) per world size; every world is
  built first, the largest first (it takes longest)."""
  order = sorted(design.sizes, reverse=True)
  built = dict(zip(order, _in_parallel(
      lambda n: worlds.build_world(root, design.world(n), log=say), order)))
  for n in design.sizes:
    name, corpora = worlds.world_name(design.world(n)), built[n]
    yield name, name, corpora, dict(
        x=n, **_corpus_fields(corpora['i2e'], corpora['selection']))


def _selection_points(design, root):
  """(point name, corpora, csv fields) per corpus: the world's pairs and held-out folder,
  the threshold's I2E corpus. The world is built first, then every corpus."""
  world = worlds.build_world(root, design.world, log=say)
  built = _in_parallel(lambda c: worlds.build_selection_corpus(root, world, design.world, c,
                                                               log=say), design.corpora)
  world_name = worlds.world_name(design.world)
  for corpus, (folder, selection) in zip(design.corpora, built):
    # x: the threshold; none for the text-only linker, which thresholds nothing.
    yield corpus.name, os.path.join(world_name, corpus.name), dict(world, i2e=folder), dict(
        x=None if corpus.link_top_k else corpus.threshold,
        link_top_k=corpus.link_top_k or '', **_corpus_fields(folder, selection))


def _corpus_fields(corpus, selection):
  """The corpus's size and its selection scored against the world's ground truth."""
  meta = schema.load_corpus_meta(corpus)
  out = dict(corpus_entities=meta['num_entities'], corpus_images=meta['num_train_examples'])
  out.update({f'selection_{k}': selection.get(k) for k in sweep_report.CORPUS_KEYS})
  return out
