"""The demo corpus, built the real way: raw web pairs -> I2E pipeline with a bootstrap CLIP.

`synthetic.ensure_demo_corpus` calls `build_demo_corpus` for `builder='i2e'` (the demo
default of data_prep/make_demo_corpus.py). Steps, each the project's own command line,
run on CPU as subprocesses (so that a training process holding a TPU, or several
processes of one job, never share a device with them):

  1 web pairs + Wikidata dump   data_prep/i2e/synthetic_web.py (in-process, numpy only)
  2 knowledge base              python -m data_prep.build_kb
  3 pairs corpus                python -m data_prep.build_i2e --pairs_only
  4 bootstrap CLIP              python -m mofi_jax.train --config configs/bootstrap_clip.py
  5 I2E corpus                  python -m data_prep.build_i2e --kb ... --clip <step 4>

Layout of the corpus folder: the I2E corpus of step 5 at the top (shards, entities.jsonl,
tokenizer.json, corpus.json, stats.json, TFDS metadata, dead_letter/), `retrieval/` (the
held-out GPR1200-layout folder), and `i2e_build/` with every intermediate (web pairs,
ground truth, KB, pairs corpus, bootstrap CLIP workdir, logs of each step).

stats.json gains `demo_selection`: the selected entities scored against the generator's
ground truth (`selection_metrics`).
"""
import json
import os
import shutil
import subprocess
import sys
import time

import tensorflow as tf
from absl import logging

from data_prep.i2e import synthetic_web
from mofi_jax.data import schema
from mofi_jax.data import synthetic

BUILD_DIR = 'i2e_build'
STATS_FILE = 'stats.json'
SELECTION_KEY = 'demo_selection'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOTSTRAP_CONFIG = os.path.join(REPO_ROOT, 'configs', 'bootstrap_clip.py')
PAIRS_TEXT_LEN = 32  # Stored alt-text tokens of the pairs corpus; training re-fits them.
# At demo scale one in-process Beam worker beats two processes on 2 cores: the CLIP step
# then loads and compiles the model once, not per worker (measured: about a third of the
# CPU time of multi_processing for the I2E step, same output).
BEAM_FLAGS = ['--direct_running_mode=in_memory', '--direct_num_workers=1']


class DemoBuildError(RuntimeError):
  """A step of the demo build failed; the message names the step and its log."""


def build_demo_corpus(out_dir, cfg, stamp, final_dir=None):
  """Builds the demo I2E corpus into the empty folder `out_dir` (see the docstring).

  `stamp` (source, generator version, config) goes into corpus.json; `final_dir` is
  where `out_dir` will be renamed to, so that the bootstrap workdir keeps pointing at
  its corpus. Returns the `demo_selection` dict.
  """
  build = os.path.join(out_dir, BUILD_DIR)
  paths = {k: os.path.join(build, k) for k in ('web', 'kb', 'pairs', 'bootstrap_clip',
                                                'corpus', 'logs')}
  os.makedirs(paths['logs'])
  timings = {}
  start = time.time()
  os.makedirs(paths['web'])
  synthetic_web.generate(paths['web'], cfg)
  timings['web_pairs'] = time.time() - start
  for name, argv in _commands(paths, cfg):
    timings[name] = _run(name, argv, paths['logs'])
  _move_corpus_up(paths['corpus'], out_dir)
  shutil.move(os.path.join(paths['web'], synthetic.RETRIEVAL_DIR), out_dir)
  _finish_meta(out_dir, cfg, stamp, paths['web'])
  selection = selection_metrics(out_dir, os.path.join(paths['web'],
                                                      synthetic_web.GROUND_TRUTH_FILE))
  selection['seconds'] = {k: round(v, 1) for k, v in timings.items()}
  _add_to_stats(out_dir, selection)
  if final_dir:
    _point_workdir_at(paths['bootstrap_clip'],
                      os.path.join(final_dir, BUILD_DIR, 'pairs'))
  schema.validate_corpus(out_dir)
  return selection


def _commands(paths, cfg):
  """[(step name, argv)] of steps 2-5."""
  py, web = [sys.executable, '-m'], paths['web']
  pairs_glob = os.path.join(web, synthetic_web.PAIRS_GLOB)
  common = [f'--config.seed={cfg.seed}', f'--config.write.vocab_size={cfg.vocab_size}',
            f'--config.write.num_shards={cfg.num_shards}']
  return [
      ('build_kb', py + ['data_prep.build_kb', '--wikidata',
                         os.path.join(web, synthetic_web.DUMP_PATH), '--out', paths['kb'],
                         *BEAM_FLAGS]),
      ('pairs_corpus', py + ['data_prep.build_i2e', '--pairs', pairs_glob, '--pairs_only',
                             '--out', paths['pairs'], *common, *BEAM_FLAGS,
                             f'--config.write.text_len={PAIRS_TEXT_LEN}']),
      ('bootstrap_clip', py + ['mofi_jax.train', f'--config={BOOTSTRAP_CONFIG}',
                               f'--workdir={paths["bootstrap_clip"]}',
                               f'--config.input.data_dir={paths["pairs"]}',
                               f'--config.total_steps={cfg.bootstrap_steps}',
                               f'--config.ckpt.every_steps={cfg.bootstrap_steps}',
                               f'--config.seed={cfg.seed}']),
      ('i2e_corpus', py + ['data_prep.build_i2e', '--pairs', pairs_glob, '--kb', paths['kb'],
                           '--clip', paths['bootstrap_clip'], '--out', paths['corpus'], *common,
                           *BEAM_FLAGS,
                           f'--config.write.text_len={cfg.text_len}',
                           f'--config.select.threshold={cfg.clip_threshold}',
                           f'--config.global_passes.min_images={cfg.min_images}']),
  ]


def _run(name, argv, log_dir):
  """Runs one step on CPU; its output goes to logs/{name}.log. Returns the seconds taken."""
  # One CPU device: simulated multi-device setups (tests) only slow these small steps down.
  xla_flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                       if not f.startswith('--xla_force_host_platform_device_count'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=xla_flags,
             PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get('PYTHONPATH'))
                                        if p))
  log = os.path.join(log_dir, f'{name}.log')
  logging.info('demo corpus: %s: %s', name, ' '.join(argv[2:]))
  start = time.time()
  with open(log, 'w') as f:
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                          check=False)
  seconds = time.time() - start
  if proc.returncode:
    with open(log) as f:
      lines = [l.strip() for l in f if l.strip()]
    last = next((l for l in reversed(lines) if 'error' in l.lower()), lines[-1] if lines else '')
    raise DemoBuildError(f'demo corpus: step {name!r} failed (exit {proc.returncode}) after '
                         f'{seconds:.0f}s: {last[:500]} (full log: {log})')
  logging.info('demo corpus: %s done in %.1fs', name, seconds)
  return seconds


def _move_corpus_up(corpus, out_dir):
  for name in sorted(os.listdir(corpus)):
    os.rename(os.path.join(corpus, name), os.path.join(out_dir, name))
  os.rmdir(corpus)


def _finish_meta(out_dir, cfg, stamp, web_dir):
  """corpus.json: the pipeline's metadata plus the demo's retrieval folder and stamp."""
  meta = schema.load_corpus_meta(out_dir)
  with open(os.path.join(web_dir, synthetic_web.META_FILE)) as f:
    web = json.load(f)
  meta.update(image_size=cfg.image_size, retrieval_dir=synthetic.RETRIEVAL_DIR,
              num_retrieval_categories=web['num_retrieval_categories'], **stamp)
  schema.write_corpus_meta(out_dir, meta)


def _add_to_stats(out_dir, selection):
  path = os.path.join(out_dir, STATS_FILE)
  with open(path) as f:
    stats = json.load(f)
  stats[SELECTION_KEY] = selection
  with open(path, 'w') as f:
    json.dump(stats, f, indent=2, sort_keys=True)
    f.write('\n')


def _point_workdir_at(workdir, data_dir):
  """The bootstrap run's config.json names its corpus; keep it valid after the move."""
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    config = json.load(f)
  config['input']['data_dir'] = data_dir
  with open(path, 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------
# Selection quality against the generator's ground truth.


def read_selected(corpus_dir):
  """{image/key: [entity ids]} of every record of the corpus."""
  out = {}
  for path in schema.list_shards(corpus_dir):
    for record in tf.data.TFRecordDataset(path):
      feats = tf.train.Example.FromString(record.numpy()).features.feature
      key = feats['image/key'].bytes_list.value[0].decode('utf-8')
      out[key] = [i.decode('utf-8') for i in feats['entity/id'].bytes_list.value]
  return out


def selection_metrics(corpus_dir, ground_truth_path):
  """Precision and recall of the corpus's entities against the ground truth.

  precision  kept entities that are drawn in their image / kept entities
  recall     mentioned true entities kept / mentioned true entities (an entity the
             alt-text never names cannot be found from it; pairs the pipeline dropped
             count as misses)
  distractors_removed  mentioned distractors (named, not drawn) not kept / all of them
  text_only_precision  the precision of keeping every mentioned entity (no CLIP), the
             baseline selection improves on.
  entities / entities_never_drawn / drawn_entities_kept  the class table: its size, its
             entities that no image draws (KB-only ones that survived selection), and the
             share of the drawn entities it has.
  """
  selected = read_selected(corpus_dir)
  table_ids = set(schema.load_entities(corpus_dir).ids)
  drawn = set()
  n = dict(pairs=0, kept=0, kept_true=0, mentioned_true=0, mentioned_true_kept=0,
           distractors=0, distractors_kept=0, ambiguous=0, ambiguous_kept=0)
  with open(ground_truth_path) as f:
    for line in f:
      truth = json.loads(line)
      drawn.update(truth['true'])
      kept = set(selected.get(truth['key'], ()))
      n['pairs'] += 1
      n['kept'] += len(kept)
      n['kept_true'] += len(kept & set(truth['true']))
      n['mentioned_true'] += len(set(truth['mentioned_true']))
      n['mentioned_true_kept'] += len(kept & set(truth['mentioned_true']))
      n['distractors'] += len(set(truth['distractors']))
      n['distractors_kept'] += len(kept & set(truth['distractors']))
      ambiguous = {m['entity'] for m in truth['mentions'] if m['ambiguous']}
      n['ambiguous'] += len(ambiguous)
      n['ambiguous_kept'] += len(kept & ambiguous)
  unknown = sorted(set(selected) - _keys(ground_truth_path))
  if unknown:
    raise DemoBuildError(f'{corpus_dir}: image keys {unknown[:3]} are not in '
                         f'{ground_truth_path}; corpus and ground truth do not match.')
  ratio = lambda a, b: round(a / b, 4) if b else None
  return dict(
      precision=ratio(n['kept_true'], n['kept']),
      recall=ratio(n['mentioned_true_kept'], n['mentioned_true']),
      distractors_removed=ratio(n['distractors'] - n['distractors_kept'], n['distractors']),
      text_only_precision=ratio(n['mentioned_true'], n['mentioned_true'] + n['distractors']),
      ambiguous_recall=ratio(n['ambiguous_kept'], n['ambiguous']),
      images_kept=len(selected), entities=len(table_ids),
      entities_never_drawn=len(table_ids - drawn),
      drawn_entities_kept=ratio(len(table_ids & drawn), len(drawn)), counts=n)


def _keys(ground_truth_path):
  with open(ground_truth_path) as f:
    return {json.loads(line)['key'] for line in f}
