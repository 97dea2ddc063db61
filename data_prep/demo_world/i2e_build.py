"""The demo corpus, built the real way: raw web pairs -> I2E pipeline with a bootstrap CLIP.

`corpus.ensure_corpus` calls `build_demo_corpus` for `builder='i2e'` (the demo default
of data_prep/make_demo_corpus.py and configs/demo.py). Steps, each the project's own command line,
run on CPU as subprocesses (so that a training process holding a TPU, or several
processes of one job, never share a device with them):

  1 web pairs + Wikidata dump   web.py (in-process, numpy only)
  2 knowledge base              python -m data_prep.build_kb
  3 pairs corpus                python -m data_prep.build_i2e --pairs_only
  4 bootstrap CLIP              python -m mofi_jax.train --config configs/bootstrap_clip.py
  5 I2E corpus                  python -m data_prep.build_i2e --kb ... --clip <step 4>

Layout of the corpus folder: the I2E corpus of step 5 at the top (shards, entities.jsonl,
tokenizer.json, corpus.json, stats.json, TFDS metadata, dead_letter/), `retrieval/` (the
held-out GPR1200-layout folder), and `i2e_build/` with every intermediate (web pairs,
ground truth, KB, pairs corpus, bootstrap CLIP workdir, logs of each step).

stats.json gains `demo_selection`: the selected entities scored against the generator's
ground truth (selection.py).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import logging

from data_prep.demo_world import selection, web
from data_prep.demo_world.config import RETRIEVAL_DIR
from mofi_jax.data import schema

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
  web.generate(paths['web'], cfg)
  timings['web_pairs'] = time.time() - start
  for name, argv in commands(paths, cfg):
    timings[name] = run_step(name, argv, paths['logs'])
  _move_corpus_up(paths['corpus'], out_dir)
  shutil.move(os.path.join(paths['web'], RETRIEVAL_DIR), out_dir)
  _finish_meta(out_dir, cfg, stamp, paths['web'])
  selection_stats = selection.selection_metrics(out_dir, os.path.join(paths['web'],
                                                      web.GROUND_TRUTH_FILE))
  selection_stats['seconds'] = {k: round(v, 1) for k, v in timings.items()}
  _add_to_stats(out_dir, selection_stats)
  if final_dir:
    _point_workdir_at(paths['bootstrap_clip'],
                      os.path.join(final_dir, BUILD_DIR, 'pairs'))
  schema.validate_corpus(out_dir)
  return selection_stats


def commands(paths, cfg, beam_flags=BEAM_FLAGS):
  """[(step name, argv)] of steps 2-5; `beam_flags` pick the Beam runner of steps 2, 3, 5."""
  py, web_dir = [sys.executable, '-m'], paths['web']
  pairs_glob = os.path.join(web_dir, web.PAIRS_GLOB)
  return [
      ('build_kb', py + ['data_prep.build_kb', '--wikidata',
                         os.path.join(web_dir, web.DUMP_PATH), '--out', paths['kb'],
                         *beam_flags]),
      ('pairs_corpus', py + ['data_prep.build_i2e', '--pairs', pairs_glob, '--pairs_only',
                             '--out', paths['pairs'], *_common_flags(cfg), *beam_flags,
                             f'--config.write.text_len={PAIRS_TEXT_LEN}']),
      ('bootstrap_clip', py + ['mofi_jax.train', f'--config={BOOTSTRAP_CONFIG}',
                               f'--workdir={paths["bootstrap_clip"]}',
                               f'--config.input.data_dir={paths["pairs"]}',
                               f'--config.total_steps={cfg.bootstrap_steps}',
                               f'--config.ckpt.every_steps={cfg.bootstrap_steps}',
                               f'--config.seed={cfg.seed}']),
      ('i2e_corpus', i2e_corpus_argv(paths, cfg, paths['corpus'], beam_flags=beam_flags)),
  ]


def i2e_corpus_argv(paths, cfg, out, *, threshold=None, link_top_k=None,
                    beam_flags=BEAM_FLAGS):
  """Step 5's command writing to `out`: the world's CLIP threshold unless `threshold` is
  given; `link_top_k=1` makes it the text-only top-1 linker (CLIP then only thresholds)."""
  threshold = cfg.clip_threshold if threshold is None else threshold
  extra = [] if link_top_k is None else [f'--config.link.top_k={link_top_k}']
  return [sys.executable, '-m', 'data_prep.build_i2e',
          '--pairs', os.path.join(paths['web'], web.PAIRS_GLOB), '--kb', paths['kb'],
          '--clip', paths['bootstrap_clip'], '--out', out, *_common_flags(cfg), *beam_flags,
          f'--config.write.text_len={cfg.text_len}', f'--config.select.threshold={threshold}',
          f'--config.global_passes.min_images={cfg.min_images}', *extra]


def _common_flags(cfg):
  # The world draws every image at image_size px: none is too small for the demo.
  return [f'--config.seed={cfg.seed}', f'--config.write.vocab_size={cfg.vocab_size}',
          f'--config.write.num_shards={cfg.num_shards}',
          f'--config.clean.min_image_size={min(cfg.image_size, 32)}',
          # Flat shapes drawn at image_size px: their pHashes collide across entities (within
          # 3 bits for 205 of generator 4's 12,106 images, 156 of them another entity's), so
          # near-duplicate dedup, made for re-encoded photos, is off for the demo.
          '--config.dedup.near_duplicate_distance=-1']


def cpu_env():
  """The environment of a step (or of a Beam worker): CPU, one device, the repo importable.

  One device because simulated multi-device setups (tests) only slow these small steps
  down, and because CLIP scores computed over 8 shards differ in the last float bits.
  """
  xla_flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                       if not f.startswith('--xla_force_host_platform_device_count'))
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS=xla_flags,
              PYTHONPATH=os.pathsep.join(p for p in (REPO_ROOT, os.environ.get('PYTHONPATH'))
                                         if p))


def run_step(name, argv, log_dir, timeout_s=None):
  """Runs one step on CPU; its output goes to logs/{name}.log. Returns the seconds taken.

  A step still running after `timeout_s` is sent SIGUSR1 (the entry points print every
  thread's stack on it, into the log), then killed, and the build fails naming the log.
  """
  log = os.path.join(log_dir, f'{name}.log')
  logging.info('demo corpus: %s: %s', name, ' '.join(argv[2:]))
  start = time.time()
  with open(log, 'w') as f:
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=cpu_env(), stdout=f,
                            stderr=subprocess.STDOUT)
    try:
      proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      _dump_stacks(proc)
      raise DemoBuildError(f'demo corpus: step {name!r} did not finish in {timeout_s}s; '
                           f'its threads\' stacks are at the end of {log}') from None
    finally:  # a timeout, KeyboardInterrupt, a test's timeout: leave no step running
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  seconds = time.time() - start
  if proc.returncode:
    with open(log) as f:
      lines = [l.strip() for l in f if l.strip()]
    last = next((l for l in reversed(lines) if 'error' in l.lower()), lines[-1] if lines else '')
    raise DemoBuildError(f'demo corpus: step {name!r} failed (exit {proc.returncode}) after '
                         f'{seconds:.0f}s: {last[:500]} (full log: {log})')
  logging.info('demo corpus: %s done in %.1fs', name, seconds)
  return seconds


def _dump_stacks(proc):
  proc.send_signal(signal.SIGUSR1)
  try:
    proc.wait(timeout=5)  # a step without the handler dies of the signal
  except subprocess.TimeoutExpired:
    pass


def _move_corpus_up(corpus, out_dir):
  for name in sorted(os.listdir(corpus)):
    os.rename(os.path.join(corpus, name), os.path.join(out_dir, name))
  os.rmdir(corpus)


def _finish_meta(out_dir, cfg, stamp, web_dir):
  """corpus.json: the pipeline's metadata plus the demo's retrieval folder and stamp."""
  meta = schema.load_corpus_meta(out_dir)
  with open(os.path.join(web_dir, web.META_FILE)) as f:
    web_meta = json.load(f)
  meta.update(image_size=cfg.image_size, retrieval_dir=RETRIEVAL_DIR,
              num_retrieval_categories=web_meta['num_retrieval_categories'], **stamp)
  schema.write_corpus_meta(out_dir, meta)


def _add_to_stats(out_dir, selection_stats):
  path = os.path.join(out_dir, STATS_FILE)
  with open(path) as f:
    stats = json.load(f)
  stats[SELECTION_KEY] = selection_stats
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
