"""`python -m mofi_jax.train` end to end, as a user runs it: resume after
SIGTERM and SIGKILL equals an uninterrupted run; a truncated or bit-flipped
newest checkpoint falls back to the previous one and ends bit-identical; an
incompatible config is refused and touches nothing; non-finite values stop the
run; bad input gets one clear message, a non-zero exit, and leaves existing
checkpoints alone; 2 processes agree on the step to restore."""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import wandb_records
from portable_runner import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, EVERY = 30, 5

CONFIG = textwrap.dedent(f'''
    from configs import demo

    def get_config(arg='synthetic'):
      c = demo.get_config('multitask')
      c.total_steps = {TOTAL}
      c.log_every = {EVERY}
      c.ckpt.update(every_steps={EVERY}, keep=3)
      c.input.update(batch_size=16, shuffle_buffer=64)
      c.input.recipe_args.update(builder='direct', num_entities=20, images_per_entity=6,
                                 num_shards=4, retrieval_categories=5, vocab_size=400, image_size=24)
      c.model.image.update(depth=1, width=32, num_heads=2, mlp_dim=64)
      c.model.text.update(depth=1, width=32, num_heads=2, mlp_dim=64)
      c.model.embed_dim = 16
      c.evals.retrieval.update(every_steps=10, batch_size=50)
      if arg == 'nosynth':
        c.input.recipe = None
      return c
''')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('train')
  (tmp / 'tiny.py').write_text(CONFIG)
  return tmp


def train_cmd(tmp, workdir, *overrides, variant='synthetic'):
  return [sys.executable, '-m', 'mofi_jax.train',
          f'--config={tmp / "tiny.py"}:{variant}', f'--workdir={workdir}',
          f'--config.input.data_dir={tmp / "corpus"}', *overrides]


def env(devices=1):
  e = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
           XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
           TF_CPP_MIN_LOG_LEVEL='2')
  return e


def run(cmd, devices=1, check=True):
  p = subprocess.run(cmd, cwd=ROOT, env=env(devices), capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-4000:]}')
  return p


def steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_params(workdir, step=TOTAL):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  ckptr = ocp.StandardCheckpointer()
  # Restore onto one local device, whatever the topology that saved it.
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        ckptr.metadata(path).item_metadata.tree)
  state = ckptr.restore(path, target)
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(state['params'])


def assert_same_params(a, b, atol=1e-6):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=0,
                               atol=atol, err_msg=str(k))


WANDB_OFFLINE = ('--config.log.wandb.enabled=True', '--config.log.wandb.mode=offline')


@pytest.fixture(scope='module')
def uninterrupted(setup):
  workdir = setup / 'uninterrupted'
  run(train_cmd(setup, workdir, *WANDB_OFFLINE))
  assert steps(workdir) == [20, 25, 30]
  return workdir


def evaluate_cli(workdir, step, *args):
  out = run([sys.executable, '-m', 'mofi_jax.evaluate', *args, f'--workdir={workdir}',
             f'--step={step}'])
  result = json.loads(out.stdout)
  assert result['step'] == step
  return result['metrics']


def test_eval_results_of_a_real_run_equal_evaluate_on_its_checkpoints(setup, uninterrupted):
  """eval_results.jsonl as `python -m mofi_jax.train` writes it: every evaluator at the start
  and the end, retrieval also every 10 steps; a kept checkpoint's figures equal what
  `python -m mofi_jax.evaluate ... --step N` computes from that checkpoint alone."""
  with open(uninterrupted / 'eval_results.jsonl') as f:
    lines = {(r['step'], r['eval']): r for r in map(json.loads, f)}
  everything = {'retrieval', 'zeroshot', 'knn', 'linear_probe'}
  assert set(lines) == ({(0, e) for e in everything} | {(30, e) for e in everything}
                        | {(10, 'retrieval'), (20, 'retrieval')})
  heldout = setup / 'corpus' / 'retrieval'
  for step in (20, 30):                           # kept checkpoints
    offline = evaluate_cli(uninterrupted, step, 'gpr1200', f'--images={heldout}')
    assert offline['map'] == pytest.approx(lines[(step, 'retrieval')]['map'], abs=1e-4)
  offline = evaluate_cli(uninterrupted, 30, 'zeroshot', '--dataset=folder',
                         f'--data_dir={heldout}', '--split=all', '--templates=identity')
  assert offline['top1'] == pytest.approx(lines[(30, 'zeroshot')]['top1'], abs=1e-6)
  assert lines[(0, 'retrieval')]['map'] != lines[(30, 'retrieval')]['map']


def start_and_signal(cmd, workdir, min_step, *sigs):
  """Starts training, sends `sigs` (0.1 s apart) once a checkpoint >= min_step exists."""
  p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(s >= min_step for s in steps(workdir)):
    assert p.poll() is None and time.time() < deadline, 'training ended early'
    time.sleep(0.02)
  for sig in sigs:
    p.send_signal(sig)
    time.sleep(0.1)
  _, err = p.communicate(timeout=300)
  return p.returncode, err


def test_interrupted_runs_resume_to_identical_params(setup, uninterrupted):
  workdir = setup / 'interrupted'
  cmd = train_cmd(setup, workdir, *WANDB_OFFLINE)
  # SIGUSR1 prints the stacks (main thread in this loop) and the run goes on.
  code, err = start_and_signal(cmd, workdir, 5, signal.SIGUSR1, signal.SIGTERM)
  assert code == 0, err[-3000:]
  assert 'most recent call first' in err and 'in train_and_evaluate' in err, err[-3000:]
  assert 'Stopped at step' in err
  assert max(steps(workdir)) < TOTAL
  code, _ = start_and_signal(cmd, workdir, 15, signal.SIGKILL)
  assert code == -signal.SIGKILL
  resumed_from = max(steps(workdir))
  p = run(cmd)
  assert f'Restored checkpoint step {resumed_from}' in p.stderr
  assert_same_params(final_params(workdir), final_params(uninterrupted), atol=0)
  # metrics.jsonl reads as one run's: the killed run's lines after the restored step were
  # dropped (steps never go back), and the figures equal the uninterrupted run's: evals at
  # every step, train/ wherever its log interval lies after the last restore (the SIGTERM
  # run also logged at the step it stopped, and its next interval is shorter).
  resumed, whole = metrics_lines(workdir), metrics_lines(uninterrupted)
  order = [r['step'] for r in resumed]
  assert order == sorted(order) and order[-1] == TOTAL
  a, b = by_step(resumed), by_step(whole)
  assert set(b) <= set(a) and all(s < resumed_from for s in set(a) - set(b))
  for step, row in b.items():
    for key, value in row.items():
      timing = key.startswith('perf/') or key in ('steps_per_sec', 'uptime')
      if not timing and (step > resumed_from or not key.startswith('train/')):
        assert a[step][key] == pytest.approx(value, abs=1e-6), (step, key)
  # The three starts logged to one W&B run (its id kept in the workdir); the last one's
  # history starts after the step it restored.
  with open(workdir / 'wandb_run_id') as f:
    run_id = f.read().strip()
  files = sorted(glob.glob(str(workdir / 'wandb' / 'offline-run-*' / 'run-*.wandb')))
  assert len(files) == 3 and {p.rsplit('-', 1)[1][:-len('.wandb')] for p in files} == {run_id}
  # (The SIGKILLed start may die before its run record is written.)
  assert {wandb_records.run_id(p) for p in files} - {None} == {run_id}
  last_steps = [r['_step'] for r in wandb_records.history(files[-1])]
  assert last_steps and min(last_steps) > resumed_from and max(last_steps) == TOTAL


def by_step(lines):
  """{step: every scalar logged at it}: train/ and perf/ at a log step, evals at theirs."""
  out = {}
  for r in lines:
    out.setdefault(r['step'], {}).update({k: v for k, v in r.items() if k != 'step'})
  return out


def metrics_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def tensorboard_scalars(workdir):
  """{(step, tag): value} of the run's event files, read with TensorFlow's own reader."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor') and not value.tensor.string_val:
          array = tf.make_ndarray(value.tensor)
          if array.size == 1:   # scalars (hparams and text are not)
            out[(event.step, value.tag)] = float(array.reshape(()))
  return out


def test_a_run_from_a_workdir_with_a_locked_image_tower_keeps_that_tower(setup, uninterrupted):
  """config.init.workdir + config.model.lock_image (LiT) through the command: the new run
  ends with the source's final image tower bit for bit (loaded, then never updated), and
  its text tower moved on from the source's."""
  workdir = setup / 'lit'
  run(train_cmd(setup, workdir, f'--config.init.workdir={uninterrupted}',
                '--config.model.lock_image=True', f'--config.total_steps={EVERY}'))
  source, lit = final_params(uninterrupted), final_params(workdir, EVERY)
  assert source.keys() == lit.keys()
  for k in source:
    if k[0] == 'image_tower':
      np.testing.assert_array_equal(np.asarray(lit[k]), np.asarray(source[k]), err_msg=str(k))
  assert any(not np.array_equal(np.asarray(lit[k]), np.asarray(source[k]))
             for k in source if k[0] == 'text_tower')


def test_transfer_config_fine_tunes_a_fresh_head_from_a_workdir(setup, uninterrupted):
  """configs/transfer.py on the held-out folder, from the uninterrupted run: 5 classes read
  from the folder; at step 0 the linear probe is the source model's own (its image tower
  was loaded); the head's accuracy logged in training equals `evaluate classifier` on the
  saved checkpoint; the image tower was fine-tuned too."""
  workdir, heldout = setup / 'transfer', setup / 'corpus' / 'retrieval'
  run([sys.executable, '-m', 'mofi_jax.train',
       f'--config={ROOT}/configs/transfer.py:{uninterrupted}', f'--workdir={workdir}',
       '--config.input.dataset=folder', f'--config.input.data_dir={heldout}',
       '--config.input.batch_size=8', '--config.total_steps=10', '--config.log_every=5',
       '--config.ckpt.every_steps=10', '--config.evals.classifier.every_steps=10',
       '--config.evals.linear_probe.every_steps=10'])
  with open(workdir / 'config.json') as f:
    config = json.load(f)
  assert (config['model']['mode'], config['model']['head']['num_classes']) == ('supervised', 5)
  with open(workdir / 'eval_results.jsonl') as f:
    lines = {(r['step'], r['eval']): r for r in map(json.loads, f)}
  assert set(lines) == {(s, e) for s in (0, 10) for e in ('classifier', 'linear_probe')}
  with open(uninterrupted / 'eval_results.jsonl') as f:
    source_probe = [r for r in map(json.loads, f) if (r['step'], r['eval']) ==
                    (TOTAL, 'linear_probe')][0]
  assert lines[(0, 'linear_probe')]['top1'] == pytest.approx(source_probe['top1'], abs=1e-9)
  offline = evaluate_cli(workdir, 10, 'classifier', '--dataset=folder', f'--data_dir={heldout}')
  for key in ('acc1', 'acc5', 'mean_per_class_recall'):
    assert offline[key] == pytest.approx(lines[(10, 'classifier')][key], abs=1e-6), key
  source, tuned = final_params(uninterrupted), final_params(workdir, 10)
  assert tuned[('entity_head', 'kernel')].shape[1] == 64   # 5 classes, padded
  assert any(not np.array_equal(np.asarray(tuned[k]), np.asarray(source[k]))
             for k in tuned if k[0] == 'image_tower')


def test_metrics_jsonl_holds_what_tensorboard_holds_and_throughput(uninterrupted):
  """Every scalar of metrics.jsonl is in the event files with the same value, train/ at
  every log step; perf/ holds images/s whose ratio to TFLOP/s is the model's FLOPs per
  image (step_analysis.model_flops / batch), and MFU against the matmul rate measured at
  start-up (logged once)."""
  from mofi_jax import inference, step_analysis  # pylint: disable=g-import-not-at-top
  lines, events = metrics_lines(uninterrupted), tensorboard_scalars(uninterrupted)
  assert [r['step'] for r in lines if 'train/loss' in r] == list(range(EVERY, TOTAL + 1, EVERY))
  for step, row in by_step(lines).items():   # the last value of a tag at a step, as events
    for tag, value in row.items():
      assert events[(step, tag)] == pytest.approx(value, rel=1e-6), (step, tag)
  config = inference.read_config(str(uninterrupted))
  per_image = step_analysis.model_flops(config) / config.input.batch_size
  # The W&B run (offline) holds the same rows.
  files = glob.glob(str(uninterrupted / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
  assert len(files) == 1
  logged = {r['_step']: {k: v for k, v in r.items() if not k.startswith('_')}
            for r in wandb_records.history(files[0])}
  assert logged == {s: pytest.approx(row, rel=1e-6) for s, row in by_step(lines).items()}
  perf = [r for r in lines if 'perf/images_per_s' in r]
  peaks = [r['perf/peak_tflops_per_chip'] for r in lines if 'perf/peak_tflops_per_chip' in r]
  assert len(peaks) == 1 and peaks[0] > 0   # logged once
  for r in perf:
    assert r['perf/images_per_s'] > 0 and 0 <= r['perf/input_wait_share'] < 1
    assert r['perf/images_per_s_per_chip'] == pytest.approx(r['perf/images_per_s'])  # 1 device
    assert r['perf/tflops_per_chip'] * 1e12 == pytest.approx(r['perf/images_per_s'] * per_image,
                                                             rel=1e-6)
    assert r['perf/mfu'] == pytest.approx(r['perf/tflops_per_chip'] / peaks[0], rel=1e-6)


def damage(state_dir, how):
  """'truncate': every data file cut to a third; 'bitflip': 4 KiB inverted in
  the middle of the largest array file (a bad disk, a bad copy)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
  if how == 'truncate':
    for path in files:
      with open(path, 'r+b') as fh:
        fh.truncate(os.path.getsize(path) // 3)
    return
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as fh:
    fh.seek(os.path.getsize(path) // 2)
    chunk = fh.read(4096)
    fh.seek(os.path.getsize(path) // 2)
    fh.write(bytes(b ^ 0xFF for b in chunk))


@pytest.mark.parametrize('how', ['truncate', 'bitflip'])
def test_damaged_newest_checkpoint_falls_back(setup, uninterrupted, how):
  workdir = setup / f'corrupt_{how}'
  shutil.copytree(uninterrupted, workdir)
  damage(os.path.join(workdir, 'checkpoints', str(TOTAL), 'state'), how)
  p = run(train_cmd(setup, workdir))
  assert f'Checkpoint step {TOTAL}' in p.stderr and 'cannot be restored' in p.stderr
  assert 'Restored checkpoint step 25' in p.stderr
  assert any(n.startswith(f'{TOTAL}.corrupt') for n in
             os.listdir(os.path.join(workdir, 'checkpoints')))
  # Retrained from 25 with the restored input position: the same bits.
  assert_same_params(final_params(workdir), final_params(uninterrupted), atol=0)


def test_incompatible_config_is_refused_then_fresh_run_starts_over(setup, uninterrupted):
  workdir = setup / 'incompatible'
  shutil.copytree(uninterrupted, workdir)
  before = tree_digest(workdir / 'checkpoints')
  cmd = train_cmd(setup, workdir, '--config.model.embed_dim=24')
  p = run(cmd, check=False)
  assert p.returncode != 0
  assert 'does not fit this run' in p.stderr and 'Traceback' not in p.stderr
  assert 'config.model.embed_dim: checkpoint 16, this run 24' in p.stderr
  assert f'checkpoints/{TOTAL}' in p.stderr and '--fresh_run' in p.stderr
  assert tree_digest(workdir / 'checkpoints') == before
  p = run(cmd + ['--fresh_run', '--config.total_steps=5'])
  moved = [n for n in os.listdir(workdir) if n.startswith('superseded-')]
  assert len(moved) == 1 and steps(workdir) == [5]
  assert tree_digest(workdir / moved[0] / 'checkpoints') == before
  # A restart script that keeps the flag resumes a resumable run.
  p = run(cmd + ['--fresh_run', '--config.total_steps=10'])
  assert 'Restored checkpoint step 5' in p.stderr and steps(workdir) == [5, 10]
  assert len([n for n in os.listdir(workdir) if n.startswith('superseded-')]) == 1


def test_nonfinite_loss_stops_naming_the_step(setup):
  workdir = setup / 'nonfinite'
  p = run(train_cmd(setup, workdir, '--config.optim.lr=1e30',
                    '--config.optim.warmup_steps=1', '--config.optim.clip_norm=1e30'),
          check=False)
  assert p.returncode != 0
  assert 'non-finite loss or gradient at step' in p.stderr
  assert steps(workdir) == []


def test_nonfinite_right_after_restore_names_the_checkpoint(setup, uninterrupted):
  workdir = setup / 'nonfinite_after_restore'
  shutil.copytree(uninterrupted, workdir)
  # A loss weight that overflows float32: what a config or data change since
  # the save can do to the very first step (1e39 > float32 max).
  p = run(train_cmd(setup, workdir, f'--config.total_steps={TOTAL + 5}',
                    '--config.loss.entity_weight=1e39'), check=False)
  assert p.returncode != 0
  assert (f'non-finite loss or gradient at step {TOTAL}, the first step after '
          f'restoring checkpoint {workdir}/checkpoints/{TOTAL}') in p.stderr
  assert 'Lower the learning rate' not in p.stderr
  assert steps(workdir) == [20, 25, 30]


def tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(root, f), 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()


def bad_corpus(setup, uninterrupted):
  """A copy of the corpus whose first shard holds a record without an image."""
  corpus = setup / 'bad_corpus'
  if not corpus.exists():
    shutil.copytree(setup / 'corpus', corpus)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    shard = sorted(corpus.glob('train-*.tfrecord'))[0]
    example = tf.train.Example()
    example.features.feature['entity/class'].int64_list.value.append(0)
    with tf.io.TFRecordWriter(str(shard)) as w:
      w.write(example.SerializeToString())
  return corpus


@pytest.mark.parametrize('case', ['missing_corpus', 'empty_corpus', 'bad_record',
                                  'unknown_key', 'batch_does_not_divide'])
def test_bad_input_fails_cleanly_without_touching_checkpoints(setup, uninterrupted, case):
  workdir = setup / f'bad_{case}'
  shutil.copytree(uninterrupted, workdir)
  before = tree_digest(workdir / 'checkpoints')
  devices, variant, extra = 1, 'nosynth', []
  if case == 'missing_corpus':
    extra, expect = [f'--config.input.data_dir={setup}/nowhere'], 'nowhere'
  elif case == 'empty_corpus':
    (setup / 'empty').mkdir(exist_ok=True)
    extra, expect = [f'--config.input.data_dir={setup}/empty'], 'empty'
  elif case == 'bad_record':
    corpus = bad_corpus(setup, uninterrupted)
    extra, expect = [f'--config.input.data_dir={corpus}'], 'image/encoded'
  elif case == 'unknown_key':
    extra, expect = ['--config.model.no_such_key=3'], 'no_such_key'
  else:
    devices, variant = 8, 'synthetic'
    extra, expect = ['--config.input.batch_size=12'], 'batch_size=12'
  cmd = train_cmd(setup, workdir, variant=variant)
  cmd = [a for a in cmd if not (extra and a.startswith('--config.input.data_dir')
                                and case not in ('unknown_key', 'batch_does_not_divide'))]
  p = run(cmd + extra, devices=devices, check=False)
  assert p.returncode != 0
  assert expect in p.stderr, p.stderr[-3000:]
  assert 'Traceback' not in p.stderr
  assert tree_digest(workdir / 'checkpoints') == before


def load_tiny_config(setup, variant):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('tiny_config', setup / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def two_process_reference(setup, num_steps):
  """In-process, 4 devices: the global batches that 2 processes would build
  (each reading its own files), fed to the library's train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from mofi_jax import run_setup, sharding, trainer  # pylint: disable=g-import-not-at-top
  from mofi_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = load_tiny_config(setup, 'nosynth')
  corpus = str(setup / 'corpus')
  c = run_setup.resolve_from_corpus(c, corpus)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:4])
  sharding.activate(mesh)
  setup = trainer.build(c, mesh)
  state, step = setup.init(mesh, c.seed), setup.train_step
  half = c.input.batch_size // 2
  iters = [pipeline.make_train_dataset(
      corpus, c.input, process_index=i, process_count=2, per_process_batch=half,
      seed=c.input.seed).as_numpy_iterator() for i in (0, 1)]
  for _ in range(num_steps):
    parts = [next(it) for it in iters]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    state, _ = step(state, sharding.global_batch(mesh, batch))
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return traverse_util.flatten_dict(jax.device_get(state.params))


def gloo_unavailable():
  """Why 2 CPU processes cannot run collectives here, or None."""
  from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
  if not hasattr(xla_client._xla, 'make_gloo_tcp_collectives'):  # pylint: disable=protected-access
    return 'this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)'
  return None


def launch_two_processes(setup, workdir):
  procs, port = [], free_port()
  for i in (0, 1):
    cmd = train_cmd(setup, workdir, f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}')
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(devices=2),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def finish(procs, timeout=400):
  deadline = time.time() + timeout
  try:
    errs = [p.communicate(timeout=max(1, deadline - time.time()))[1] for p in procs]
  except subprocess.TimeoutExpired:
    raise AssertionError(hung(procs, timeout)) from None
  # No skip here: once the processes ran, a failure (one crashing and breaking its peer's
  # gloo connection included) is what this test exists to catch. gloo_unavailable() decides
  # before anything runs.
  return errs


def hung(procs, timeout):
  """Each stuck process's Python stacks (SIGUSR1, see run_setup) and log tail."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGUSR1)
  time.sleep(5)
  for p in procs:
    p.kill()
  errs = [p.communicate()[1] for p in procs]
  return f'not finished after {timeout} s:\n' + '\n'.join(
      f'--- process {i} (exit {p.returncode}) ---\n{e[-8000:]}'
      for i, (p, e) in enumerate(zip(procs, errs)))


@pytest.mark.required
def test_two_processes_preempted_resume_and_match_one_process(setup, uninterrupted):
  """2 processes x 2 CPU devices (jax.distributed, gloo), each reading its own
  corpus shards: SIGTERM (what a TPU maintenance event sends) stops both at the
  same step with a checkpoint; restarted, they restore it and finish; the final
  params equal one process running the same step on 4 devices. Restarted from a
  copy where process 1's input state of that step is missing, or from one
  where only the array files process 1 wrote are truncated, both fall back
  to the previous step together and still end equal to the reference."""
  reason = gloo_unavailable()
  if reason:
    pytest.skip(reason)
  workdir = setup / 'two_process'
  procs = launch_two_processes(setup, workdir)
  deadline = time.time() + 400
  while not any(s >= 10 for s in steps(workdir)):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  errs = finish(procs)
  assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  stopped = max(steps(workdir))
  assert 10 <= stopped < TOTAL and f'Stopped at step {stopped}' in errs[0]
  # Each process saved its own input position (its own files) with the state.
  assert all(os.path.exists(workdir / 'input_state' / str(stopped) /
                            f'process_{i}.index') for i in (0, 1))
  # A copy in which only process 1 lacks its input state for the newest step:
  # the processes must drop that step together and agree on the one before.
  disagree = setup / 'two_process_disagree'
  shutil.copytree(workdir, disagree)
  for f in (disagree / 'input_state' / str(stopped)).glob('process_1.*'):
    f.unlink()
  previous = max(s for s in steps(disagree) if s < stopped)
  # And one in which only the array files process 1 wrote (and reads back)
  # are truncated: process 1's read fails while process 0's succeeds, and
  # neither may wait in a barrier the other skips.
  one_shard = setup / 'two_process_one_shard'
  shutil.copytree(workdir, one_shard)
  written_by_1 = one_shard / 'checkpoints' / str(stopped) / 'state' / 'ocdbt.process_1'
  assert written_by_1.is_dir()
  damage(str(written_by_1), 'truncate')
  reference = two_process_reference(setup, TOTAL)
  for folder, expect in ((workdir, stopped), (disagree, previous), (one_shard, previous)):
    procs = launch_two_processes(setup, folder)
    errs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert all(f'Restored checkpoint step {expect}' in e for e in errs), errs[1][-3000:]
    # Another device layout sums in another order; Adam turns round-off in
    # mathematically-zero gradients (e.g. attention key biases) into ~1e-6 moves.
    assert_same_params(final_params(folder), reference, atol=1e-5)
  for folder in (disagree, one_shard):
    assert any(n.startswith(f'{stopped}.corrupt') for n in
               os.listdir(folder / 'checkpoints'))


def test_compile_cache_serves_a_second_run(setup):
  """config.compile_cache: the first run stores its compiled programs; a second run of the
  same config compiles nothing new (the cache gains no entry) and trains the same."""
  cache = setup / 'compile_cache'
  flags = [f'--config.compile_cache.dir={cache}', '--config.compile_cache.min_compile_secs=0',
           '--config.total_steps=10']
  run(train_cmd(setup, setup / 'cached_a', *flags))
  stored = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
  assert any(name.startswith('jit_train_step') for name in stored), sorted(stored)
  run(train_cmd(setup, setup / 'cached_b', *flags))
  assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stored
  assert_same_params(final_params(setup / 'cached_a', 10), final_params(setup / 'cached_b', 10),
                     atol=0)
