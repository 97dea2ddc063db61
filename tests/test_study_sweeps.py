"""mofi_jax.study --sweep entities|selection: the designs, and the quick sweeps end to end
(CI runs them) checked against what each build and run wrote, recomputed here."""
import collections
import glob
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from data_prep import demo_world
from data_prep.demo_world import i2e_build
from mofi_jax.study import sweep_plots, sweep_report, sweeps, worlds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ('retrieval/map', 'zeroshot/top1', 'linear_probe/top1', 'knn/top1')


# ------------------------------------------------------------------------------ the designs

@pytest.mark.parametrize('quick', [False, True])
def test_designs_follow_the_issue(quick):
  ent, sel = sweeps.entities(quick), sweeps.selection(quick)
  assert ent.sizes == tuple(sorted(ent.sizes)) and ent.sizes[-1] >= 10 * ent.sizes[0]
  assert len(ent.sizes) >= (3 if quick else 4) and len(ent.seeds) == (1 if quick else 2)
  assert set(ent.arms) == {'i2t_clip', 'i2e_clip_name_desc', 'supervised', 'mofi'}
  worlds = [demo_world.resolve_config(ent.world(n)) for n in ent.sizes]
  # Worlds differ in their number of entities and bootstrap steps only; every bootstrap CLIP
  # sees its world's pairs the design's number of times (128 pairs a step), or trains for the
  # minimum number of steps.
  varying = ('num_entities', 'bootstrap_steps')
  for n, w in zip(ent.sizes, worlds):
    assert {k: v for k, v in w.items() if k not in varying} == {
        k: v for k, v in worlds[0].items() if k not in varying}
    epochs = w.bootstrap_steps * 128 / (n * ent.images_per_entity)
    assert w.bootstrap_steps == ent.min_bootstrap_steps or (
        ent.bootstrap_epochs <= epochs < ent.bootstrap_epochs + 128 / (n * ent.images_per_entity))
  assert worlds[0].heldout_first and worlds[0].builder == 'i2e'
  thresholds = [c.threshold for c in sel.corpora if c.link_top_k is None]
  assert thresholds[0] == sweeps.ALL_LINKED and thresholds == sorted(thresholds)
  assert len(thresholds) >= 4 and sel.arm == 'mofi'
  assert [c.name for c in sel.corpora if c.link_top_k == 1] == ['text_top1']
  assert sel.world in [ent.world(n) for n in ent.sizes]   # shared with the entity sweep


# --------------------------------------------------------------------- report and plots

def _rows(rng):
  rows = []
  for x in (10, 100, 1000):
    for arm in ('supervised', 'mofi'):
      for seed in (0, 1, 2):
        metrics = {'retrieval/map': float(rng.uniform())}
        if arm == 'mofi':
          metrics['zeroshot/top1'] = float(rng.uniform())
        rows.append(dict(point=f'w{x}', x=x, corpus_entities=x - 1, corpus_images=9 * x,
                         selection_precision=0.9, selection_recall=float(rng.uniform()),
                         selection_drawn_entities_kept=1 - 1 / x,
                         arm=arm, seed=seed, config_file=f'/r/{x}/{arm}/{seed}.json',
                         workdir='', metrics=metrics))
  return rows


def test_csv_markdown_and_plotted_means_equal_a_recount(tmp_path):
  rows = _rows(np.random.default_rng(0))
  sweep_report.write_csv(tmp_path / 'results.csv', rows)
  back = sweep_report.read_csv(tmp_path / 'results.csv')
  assert len(back) == len(rows)
  for r, b in zip(rows, back):
    assert (b['point'], int(b['x']), b['arm'], int(b['seed'])) == (
        r['point'], r['x'], r['arm'], r['seed'])
    assert float(b['retrieval/map']) == pytest.approx(r['metrics']['retrieval/map'], abs=1e-6)
    if r['arm'] == 'supervised':
      assert b['zeroshot/top1'] == ''
    else:
      assert float(b['zeroshot/top1']) == pytest.approx(r['metrics']['zeroshot/top1'], abs=1e-6)
  groups = collections.defaultdict(list)
  for b in back:
    if b['zeroshot/top1']:
      groups[int(b['x'])].append(float(b['zeroshot/top1']))
  series = sweep_plots.entity_curves(str(tmp_path / 'c.png'), rows, METRICS)
  assert os.path.getsize(tmp_path / 'c.png') > 10_000
  assert set(series) == {'retrieval/map', 'zeroshot/top1', 'corpus'}
  assert series['corpus']['drawn_entities_kept'] == [1 - 1 / x for x in (10, 100, 1000)]
  assert [(p[0], p[1]) for p in series['zeroshot/top1']['mofi']] == [
      (x, pytest.approx(statistics.fmean(v), abs=1e-6)) for x, v in sorted(groups.items())]
  sweep_report.write_markdown(tmp_path / 'results.md', 'entities', sweeps.ENTITIES, rows,
                              METRICS, minutes=1.0)
  text = (tmp_path / 'results.md').read_text()
  mean, std = statistics.fmean(groups[100]), statistics.stdev(groups[100])
  assert f'| w100 | mofi | ' in text and f'{mean:.3f} ± {std:.3f} (n=3)' in text
  assert '| w10 | supervised | ' in text and text.count('n/a') == 3  # no zero-shot there


# ------------------------------------------------------------------ the quick sweeps, run

@pytest.mark.longest
@pytest.mark.timeout(2400)   # about 13 min alone on 2 cores; more beside the other tests
def test_quick_sweeps_end_to_end(tmp_path):
  """Both quick sweeps from the command line, in one workdir (one test, so that one xdist
  worker builds the worlds once), then their outputs against a recount."""
  root = str(tmp_path)
  env = i2e_build.cpu_env()   # one CPU device, as a user's run has (the suite simulates 8)
  for name in ('entities', 'selection'):
    proc = subprocess.run([sys.executable, '-m', 'mofi_jax.study', '--workdir', root,
                           '--sweep', name, '--quick'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1150)
    assert proc.returncode == 0, proc.stderr[-3000:]
  check_entity_sweep(root)
  check_selection_sweep(root)


def _last_evals(workdir):
  """{'<eval>/<metric>': value} at the last step, read from eval_results.jsonl here."""
  out = {}
  with open(os.path.join(workdir, 'eval_results.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  last = max(r['step'] for r in rows)
  # config.eval_at_start=False: the sweeps evaluate at the last step only.
  assert {r['step'] for r in rows} == {last} and last > 0
  for r in rows:
    if r['step'] == last:
      out.update({f'{r["eval"]}/{k}': v for k, v in r.items()
                  if k not in ('eval', 'step') and isinstance(v, (int, float))})
  return out


def _check_rows_against_runs(rows, out):
  """Each row's metrics are its run's last evals, and the run trained on the row's corpus
  (row['_corpus'], or the world's pairs for I2T CLIP) with the row's seed."""
  for row in rows:
    workdir = os.path.join(out, row['_runs'], 'runs', row['arm'], f'seed{row["seed"]}')
    evals = _last_evals(workdir)
    for m in METRICS:
      if m in evals:
        assert float(row[m]) == pytest.approx(evals[m], abs=1e-6), (row['point'], m)
      else:
        assert row[m] == '' and (m == 'zeroshot/top1') == (row['arm'] == 'supervised')
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    with open(os.path.join(out, row['config'])) as f:   # the copy results are published with
      assert json.load(f) == config
    assert config['seed'] == config['input']['seed'] == int(row['seed'])
    pairs = os.path.join(row['_heldout'], '..', 'i2e_build', 'pairs')
    expected = pairs if row['arm'] == 'i2t_clip' else row['_corpus']
    assert os.path.realpath(config['input']['data_dir']) == os.path.realpath(expected)
    assert {e['data_dir'] for e in config['evals'].values()} == {row['_heldout']}


def _folder_bytes(folder):
  return {os.path.basename(p): open(p, 'rb').read() for p in sorted(glob.glob(f'{folder}/*'))}


def check_entity_sweep(root, design=sweeps.ENTITIES_QUICK):
  """Rows are what each world and run wrote; one held-out set at every size."""
  out = os.path.join(root, 'entities')
  rows = sweep_report.read_csv(os.path.join(out, 'results.csv'))
  assert [(int(r['x']), r['arm']) for r in rows] == [
      (n, a) for n in design.sizes for _ in design.seeds for a in design.arms]
  heldout = None
  for row in rows:
    world = os.path.join(root, 'worlds', row['point'])
    with open(os.path.join(world, 'corpus.json')) as f:
      meta = json.load(f)
    assert (int(row['corpus_entities']), int(row['corpus_images'])) == (
        meta['num_entities'], meta['num_train_examples'])
    # The same held-out images at every size, and none of their categories trained on.
    folder = _folder_bytes(os.path.join(world, 'retrieval'))
    heldout = heldout or folder
    assert folder == heldout
    trained = {json.loads(l)['description'] for l in open(os.path.join(world,
                                                                       'entities.jsonl'))}
    held = {c['description'] for c in json.loads(folder['categories.json'])}
    assert len(held) == 40 and not trained & held
    row.update(_heldout=os.path.join(world, 'retrieval'), _corpus=world, _runs=row['point'])
  _check_rows_against_runs(rows, out)
  assert os.path.getsize(os.path.join(out, 'entities_curves.png')) > 10_000


def _records(corpus):
  """{image key: set of entity ids} read with the raw protobuf API."""
  out = {}
  for path in sorted(glob.glob(os.path.join(corpus, '*.tfrecord*'))):
    for record in tf.data.TFRecordDataset(path):
      f = tf.train.Example.FromString(record.numpy()).features.feature
      out[f['image/key'].bytes_list.value[0].decode()] = {
          i.decode() for i in f['entity/id'].bytes_list.value}
  return out


def _precision_recall(records, truth):
  kept = sum(len(v) for v in records.values())
  kept_true = sum(len(v & set(truth[k]['true'])) for k, v in records.items())
  mentioned = sum(len(set(t['mentioned_true'])) for t in truth.values())
  found = sum(len(records.get(k, set()) & set(t['mentioned_true'])) for k, t in truth.items())
  return kept_true / kept, found / mentioned


def check_selection_sweep(root, design=sweeps.SELECTION_QUICK):
  """Each corpus's selection figures recounted from its records and the ground truth."""
  out = os.path.join(root, 'selection')
  rows = sweep_report.read_csv(os.path.join(out, 'results.csv'))
  assert [r['point'] for r in rows] == [c.name for c in design.corpora for _ in design.seeds]
  world = os.path.join(root, 'worlds', f'entities{design.world["num_entities"]}_ipe'
                                        f'{design.world["images_per_entity"]}')
  with open(os.path.join(world, 'i2e_build', 'web', 'ground_truth.jsonl')) as f:
    truth = {t['key']: t for t in map(json.loads, f)}
  kept = {}
  for row in rows:
    corpus = (world if row['point'] == f'clip_{demo_world.default_config().clip_threshold:g}'
              else os.path.join(root, 'corpora', os.path.basename(world), row['point']))
    kept[row['point']] = records = _records(corpus)
    assert len(records) == int(row['corpus_images'])
    precision, recall = _precision_recall(records, truth)
    assert float(row['selection_precision']) == pytest.approx(precision, abs=1e-4)
    assert float(row['selection_recall']) == pytest.approx(recall, abs=1e-4)
    row.update(_heldout=os.path.join(world, 'retrieval'), _corpus=corpus,
               _runs=os.path.join(os.path.basename(world), row['point']))
  _check_rows_against_runs(rows, out)
  # One CLIP, one choice per mention: a stricter threshold keeps a subset of each image's
  # entities, and keeping every linked mention is the least precise of them.
  clip = [c.name for c in design.corpora if c.link_top_k is None]
  for loose, strict in zip(clip, clip[1:]):
    assert all(v <= kept[loose].get(k, set()) for k, v in kept[strict].items()), strict
  precision = {r['point']: float(r['selection_precision']) for r in rows}
  assert precision[clip[0]] < max(precision[c] for c in clip[1:])
  # The text-only linker had one candidate per mention to choose from.
  table = pq.read_table(os.path.join(root, 'corpora', os.path.basename(world), 'text_top1',
                                     'metadata')).to_pylist()
  assert table and all(len(m['entity_ids']) == 1 for r in table for m in r['mentions'])
  assert os.path.getsize(os.path.join(out, 'selection_curves.png')) > 10_000
  assert not math.isnan(precision['text_top1'])


def test_a_corpus_from_another_build_of_the_world_is_refused(tmp_path):
  design = sweeps.SELECTION_QUICK
  world = tmp_path / 'worlds' / 'w'
  world.mkdir(parents=True)
  (world / 'entities.jsonl').write_text('{"id": "Q1"}\n')
  (world / 'tokenizer.json').write_text('{}')
  corpus = design.corpora[0]
  out = tmp_path / 'corpora' / worlds.world_name(design.world) / corpus.name
  out.mkdir(parents=True)
  paths = dict(i2e=str(world), selection={})
  (out / worlds.SELECTION_FILE).write_text(json.dumps(
      dict(precision=0.5, world_fingerprint=worlds.world_fingerprint(str(world)))))
  folder, metrics = worlds.build_selection_corpus(str(tmp_path), paths, design.world, corpus)
  assert folder == str(out) and metrics['precision'] == 0.5      # the same build: reused
  (world / 'entities.jsonl').write_text('{"id": "Q2"}\n')          # the world was rebuilt
  with pytest.raises(Exception, match=f'{out}: built from another build of the world'):
    worlds.build_selection_corpus(str(tmp_path), paths, design.world, corpus)
