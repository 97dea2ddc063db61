"""mofi_jax.study: the five arms differ only in their training signal; the report's
numbers equal an independent recomputation from what training wrote."""
import csv
import json
import statistics

import numpy as np
import pytest
from clu import metric_writers

from mofi_jax.study import arms, heldout, report
from test_gpr1200 import official_aps

CORPORA = dict(i2e='/data/i2e', pairs='/data/i2e/build/pairs', heldout='/data/i2e/retrieval')
# What each arm must train with: (mode, corpus, text source, entity template).
EXPECTED = {
    'i2t_clip': ('contrastive', 'pairs', 'alt_text', None),
    'i2e_clip_name': ('contrastive', 'i2e', 'entity', '{name}'),
    'i2e_clip_name_desc': ('contrastive', 'i2e', 'entity', '{name}, {description}'),
    'supervised': ('supervised', 'i2e', None, None),
    'mofi': ('multitask', 'i2e', 'entity', '{name}, {description}'),
}


def _shared(config):
  """Everything that must be equal across arms: tower, data size, budget, evals."""
  c = config.to_dict()
  return dict(image=c['model']['image'], embed_dim=c['model']['embed_dim'],
              input={k: v for k, v in c['input'].items()
                     if k not in ('data_dir', 'text_source', 'entity_template')},
              optim=c['optim'], steps=c['total_steps'], seed=c['seed'],
              evals={k: v for k, v in c['evals'].items() if k != 'zeroshot'})


def test_arms_share_tower_and_budget_and_differ_in_signal():
  runs = arms.plan(CORPORA, seeds=[3, 4], total_steps=60)
  assert [(r.arm, r.seed) for r in runs] == [(a, s) for s in (3, 4) for a in EXPECTED]
  for seed in (3, 4):
    mine = [r for r in runs if r.seed == seed]
    reference = _shared(mine[0].config)
    for run in mine:
      c = run.config
      assert _shared(c) == reference, run.name
      mode, corpus, text_source, template = EXPECTED[run.arm]
      assert c.model.mode == mode and c.input.data_dir == CORPORA[corpus]
      if text_source:
        assert c.input.text_source == text_source
      if template:
        assert c.input.entity_template == template
      # Every arm is evaluated on the I2E corpus's held-out folder, zero-shot where
      # there is a text tower.
      assert {ev.data_dir for ev in c.evals.values()} == {CORPORA['heldout']}
      assert ('zeroshot' in c.evals) == (mode != 'supervised')
      assert c.seed == c.input.seed == seed and c.total_steps == 60


def _rows(rng):
  rows = []
  for arm in EXPECTED:
    for seed in (0, 1, 2):
      metrics = {'retrieval/map': float(rng.uniform()), 'knn/top1': float(rng.uniform())}
      if arm != 'supervised':
        metrics['zeroshot/top1'] = float(rng.uniform())
      rows.append(dict(arm=arm, seed=seed, config_file=f'/runs/{arm}/{seed}/config.json',
                       workdir='', metrics=metrics))
  return rows


def test_aggregate_is_mean_and_sample_std():
  rows = _rows(np.random.default_rng(0))
  summary = report.aggregate(rows)
  for arm in EXPECTED:
    for key in ('retrieval/map', 'knn/top1', 'zeroshot/top1'):
      values = [r['metrics'][key] for r in rows if r['arm'] == arm and key in r['metrics']]
      if not values:
        assert key not in summary[arm]
        continue
      mean, std, n = summary[arm][key]
      assert n == len(values) == 3
      assert mean == pytest.approx(statistics.fmean(values), abs=1e-12)
      assert std == pytest.approx(statistics.stdev(values), abs=1e-12)


def test_csv_and_markdown_round_trip(tmp_path):
  rows = _rows(np.random.default_rng(1))
  report.write_csv(tmp_path / 'results.csv', rows)
  with open(tmp_path / 'results.csv') as f:
    read = list(csv.DictReader(f))
  assert len(read) == len(rows)
  for row, back in zip(rows, read):
    assert (back['arm'], int(back['seed']), back['config']) == (
        row['arm'], row['seed'], row['config_file'])
    for k, v in row['metrics'].items():
      assert float(back[k]) == pytest.approx(v, abs=1e-6)
    assert all(back[k] == '' for k in back if k.startswith('zeroshot') and
               k not in row['metrics'])
  summary = report.aggregate(rows)
  report.write_markdown(tmp_path / 'results.md', summary, header='# head',
                        metrics=['retrieval/map', 'zeroshot/top1'], arm_order=list(EXPECTED))
  lines = (tmp_path / 'results.md').read_text().splitlines()
  table = [l for l in lines if l.startswith('| ') and not l.startswith('| model')]
  assert [l.split(' | ')[0][2:] for l in table] == list(EXPECTED)
  mofi = table[-1].split(' | ')
  mean, std, _ = summary['mofi']['retrieval/map']
  assert mofi[1] == f'{mean:.3f} ± {std:.3f} (n=3)'
  assert table[3].split(' | ')[2].startswith('n/a')   # supervised: no zero-shot


def test_final_metrics_and_curves_read_what_training_wrote(tmp_path):
  lines = [dict(step=0, eval='retrieval', map=0.2), dict(step=20, eval='retrieval', map=0.6),
           dict(step=10, eval='retrieval', map=0.4), dict(step=20, eval='knn', top1=0.7,
                                                          note='text is skipped')]
  with open(tmp_path / 'eval_results.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(l) for l in lines) + '\n')
  assert report.final_metrics(str(tmp_path)) == {'retrieval/map': 0.6, 'knn/top1': 0.7}
  assert report.eval_curve(str(tmp_path), 'retrieval/map') == [(0, 0.2), (10, 0.4), (20, 0.6)]
  # The loss curve comes back from the TensorBoard file CLU writes during training.
  writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
  losses = {5: 3.25, 10: 2.5, 15: 1.75}
  for step, loss in losses.items():
    writer.write_scalars(step, {'train/loss': loss, 'train/lr': 0.1})
  writer.flush()
  assert report.scalar_curve(str(tmp_path), 'train/loss') == sorted(losses.items())


def test_domain_maps_match_the_official_loop_per_domain():
  """Each domain's mAP is the official GPR1200 loop's APs (float64, every image ranked)
  averaged over that domain's queries; weighted by query counts they give the overall mAP."""
  rng = np.random.default_rng(2)
  categories = np.repeat(np.arange(12), 5)
  features = rng.normal(size=(60, 8)) + 2 * rng.normal(size=(12, 8))[categories]
  domains = np.array(['ring', 'star', 'cross'])[categories % 3]
  maps = heldout.domain_maps(features, categories, domains)
  assert sorted(maps) == ['retrieval/map/cross', 'retrieval/map/ring', 'retrieval/map/star']
  reference = official_aps(features, categories)
  for d in ('ring', 'star', 'cross'):
    assert maps[f'retrieval/map/{d}'] == pytest.approx(reference[domains == d].mean(), abs=1e-9)
  weighted = sum(maps[f'retrieval/map/{d}'] * np.mean(domains == d) for d in set(domains))
  assert weighted == pytest.approx(reference.mean(), abs=1e-9)
