"""Checkpoint integrity and restore decisions, in process:

* the JAX checksum equals a float64/uint64 NumPy re-implementation of the
  docstring formula, is the same for any sharding, and changes for a flip of
  any single bit;
* restore errors are classified by what they mean (corrupt / transient /
  fatal), and a Checkpointer acts on the class: a bit flip in the array data
  falls back to the previous step, an incompatible state is refused with the
  differing keys and nothing moved, a transient error is retried and never
  quarantines.
"""
import asyncio
import gc
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec as P

from mofi_jax import checkpoint_checks as checks
from mofi_jax import checkpointing

M32 = 2**32


def np_fmix32(h):
  h = h.astype(np.uint64)
  h ^= h >> np.uint64(16)
  h = (h * np.uint64(0x85EBCA6B)) % M32
  h ^= h >> np.uint64(13)
  h = (h * np.uint64(0xC2B2AE35)) % M32
  return h ^ (h >> np.uint64(16))


def np_checksum(x):
  """The docstring formula with Python-int-exact uint64 arithmetic."""
  x = np.asarray(x)
  view = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  words = x.view(view).astype(np.uint64).ravel()
  index = np.arange(words.size, dtype=np.uint64) % M32
  out = ''
  for seed in checks.SEEDS:
    weight = np_fmix32((index + seed) % M32) | np.uint64(1)
    terms = (weight * np_fmix32(words ^ np.uint64(seed))) % M32
    out += f'{int(terms.sum() % M32):08x}'
  return out


def sample_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'kernel': rng.normal(size=(16, 24)).astype(np.float32),
      'bf16': jnp.asarray(rng.normal(size=(8, 3, 5)), jnp.bfloat16),
      'step': np.int32(1234),
      'ids': rng.integers(-5, 5, (7,)).astype(np.int32),
  }


def test_checksum_matches_numpy_reference():
  tree = sample_tree()
  got = checks.checksums(tree)
  for name, leaf in tree.items():
    assert got[name] == np_checksum(np.asarray(leaf)), name


def test_checksum_is_the_same_for_any_sharding():
  devices = np.array(jax.devices()[:8]).reshape(2, 4)
  mesh = jax.sharding.Mesh(devices, ('a', 'b'))
  x = np.random.default_rng(1).normal(size=(16, 24)).astype(np.float32)
  dense = checks.checksums({'x': x})['x']
  for spec in (P('a', 'b'), P('b', None), P(None, ('a', 'b')), P()):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    assert checks.checksums({'x': sharded})['x'] == dense, spec


def test_every_single_bit_flip_changes_the_checksum():
  x = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)
  base = checks.checksums({'x': x})['x']
  raw = x.view(np.uint32).ravel()
  flipped = []
  for i in range(raw.size):
    for bit in range(32):
      y = raw.copy()
      y[i] ^= np.uint32(1 << bit)
      flipped.append(y.view(np.float32).reshape(x.shape))
  # All 960 variants in one jitted call (stacked on a new leading axis would
  # change the index; a dict of leaves keeps each one's own index).
  sums = checks.checksums({str(k): v for k, v in enumerate(flipped)})
  assert base not in set(sums.values())
  assert len(set(sums.values())) == len(flipped)


def test_verify_names_the_damaged_leaf():
  tree = sample_tree()
  saved = checks.checksums(tree)
  tree['kernel'][3, 4] += 1e-7
  with pytest.raises(checks.CorruptCheckpointError, match='kernel'):
    checks.verify_checksums(tree, saved, '/ckpt/7')


class _StatusError(ValueError):
  pass


def wrapped(inner):
  """Like Orbax: a bare Exception whose cause is TensorStore's ValueError."""
  try:
    raise inner
  except Exception as e:  # pylint: disable=broad-except
    try:
      raise Exception('Encountered error while reading array index') from e  # pylint: disable=broad-exception-raised
    except Exception as outer:  # pylint: disable=broad-except
      return outer


@pytest.mark.parametrize('exc, kind', [
    (wrapped(ValueError('OUT_OF_RANGE: Requested byte range [1, 2) is not valid')), 'corrupt'),
    (wrapped(ValueError('FAILED_PRECONDITION: Truncated Zstd-compressed stream')), 'corrupt'),
    (wrapped(ValueError('DATA_LOSS: checksum')), 'corrupt'),
    (FileNotFoundError('input state missing'), 'corrupt'),
    (tf.errors.DataLossError(None, None, 'crc mismatch'), 'corrupt'),
    (checks.CorruptCheckpointError('checksums'), 'corrupt'),
    (wrapped(ValueError('UNAVAILABLE: GCS 503')), 'transient'),
    (wrapped(ValueError('DEADLINE_EXCEEDED: read timed out')), 'transient'),
    (ConnectionResetError('peer reset'), 'transient'),
    (OSError(5, 'Input/output error'), 'transient'),
    (tf.errors.UnavailableError(None, None, 'try again'), 'transient'),
    (wrapped(ValueError('RESOURCE_EXHAUSTED: Out of memory allocating 8 GiB')), 'fatal'),
    (MemoryError(), 'fatal'),
    (PermissionError('read-only bucket'), 'fatal'),
    (TypeError('a bug'), 'fatal'),
])
def test_classify(exc, kind):
  assert checks.classify(exc) == kind


def test_tree_and_config_differences_name_the_keys():
  saved = {'params': {'w': jax.ShapeDtypeStruct((4, 128), jnp.float32),
                      'old': jax.ShapeDtypeStruct((2,), jnp.float32)}}
  run = {'params': {'w': jax.ShapeDtypeStruct((4, 96), jnp.float32),
                    'new': jax.ShapeDtypeStruct((2,), jnp.int32)}}
  diffs = checks.tree_differences(saved, run)
  assert diffs == ['params.old: only in the checkpoint', 'params.new: only in this run',
                   'params.w: checkpoint float32[4, 128], this run float32[4, 96]']
  a = {'model.embed_dim': 128, 'model.remat': 'none', 'optim.lr': 1e-3,
       'input.threads': 8, 'input.shuffle_buffer': 10_000, 'model.removed': 1}
  b = {'model.embed_dim': 96, 'model.remat': 'full', 'optim.lr': 5e-4,
       'input.threads': 2, 'input.shuffle_buffer': 2_000, 'model.new_field': 3}
  assert checks.resume_differences(a, b) == [
      'config.model.embed_dim: checkpoint 128, this run 96',
      'the saved input position belongs to another input pipeline: '
      'config.input.shuffle_buffer: checkpoint 10000, this run 2000']


# ------------------------------------------------------------ Checkpointer

class _Input:
  """Stands in for the tf.data iterator: a position saved as a TF checkpoint."""

  def __init__(self, position=0):
    self.position = tf.Variable(position, dtype=tf.int64)

  def save(self, path):
    tf.train.Checkpoint(position=self.position).write(path)

  def restore(self, path):
    tf.train.Checkpoint(position=self.position).read(path).assert_consumed()


def ckpt_cfg():
  return ml_collections.ConfigDict(dict(every_steps=1, keep=3, async_save=False))


def state_at(step):
  rng = np.random.default_rng(step)
  return {'w': jnp.asarray(rng.normal(size=(256, 64)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(32,)), jnp.float32),
          'step': jnp.int32(step)}


def abstract_of(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding), state)


CONFIG = {'model.embed_dim': 32, 'optim.lr': 1e-3}


@pytest.fixture
def saved_run(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), ckpt_cfg())
  for step in (1, 2, 3):
    ckpt.save(step, state_at(step), {'config': CONFIG}, _Input(step * 10), force=True)
  ckpt.close()
  return str(tmp_path)


def digest(folder):
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      with open(os.path.join(root, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(root, f), folder)] = hash(fh.read())
  return out


def largest_array_file(workdir, step):
  state = os.path.join(workdir, 'checkpoints', str(step), 'state')
  files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs]
  return max(files, key=os.path.getsize)


def test_restore_returns_the_newest_step_and_its_input_position(saved_run):
  data = _Input()
  step, state, meta = checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
      abstract_of(state_at(0)), data, CONFIG)
  assert step == 3 and int(data.position.numpy()) == 30
  np.testing.assert_array_equal(np.asarray(state['w']), np.asarray(state_at(3)['w']))
  assert set(meta['checksums']) == {'w', 'b', 'step'}


def test_bit_flip_in_array_data_falls_back_to_previous_step(saved_run, caplog):
  path = largest_array_file(saved_run, 3)
  with open(path, 'r+b') as f:   # one bit, mid-file (zstd stores noise raw)
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes([byte ^ 0x10]))
  data = _Input()
  step, state, _ = checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
      abstract_of(state_at(0)), data, CONFIG)
  assert step == 2 and int(data.position.numpy()) == 20
  # Orbax read the damaged bytes without complaint; only the checksum saw it.
  assert 'array checksums do not match' in caplog.text
  np.testing.assert_array_equal(np.asarray(state['w']), np.asarray(state_at(2)['w']))
  names = os.listdir(os.path.join(saved_run, 'checkpoints'))
  assert any(n.startswith('3.corrupt-') for n in names)
  assert any(n.startswith('3.corrupt-') for n in os.listdir(
      os.path.join(saved_run, 'input_state')))


def test_input_state_of_another_step_is_caught_by_its_checksum(saved_run, caplog):
  """Step 2's input state copied over step 3's is a valid tf.data state (its own CRCs
  pass) at the wrong position: only the sha256 recorded at save time tells."""
  folder = os.path.join(saved_run, 'input_state')
  for name in os.listdir(os.path.join(folder, '2')):
    shutil.copyfile(os.path.join(folder, '2', name), os.path.join(folder, '3', name))
  data = _Input()
  step, _, _ = checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
      abstract_of(state_at(0)), data, CONFIG)
  assert step == 2 and int(data.position.numpy()) == 20
  assert 'differ from the sha256 the checkpoint recorded' in caplog.text
  assert any(n.startswith('3.corrupt-') for n in os.listdir(folder))


def test_failed_read_leaves_no_read_running(tmp_path):
  """A truncated step fails in one shard while others are still being read:
  the restore returns (falling back) only once every read has ended, with no
  asyncio task left pending for the garbage collector to finalize mid-run
  (Orbax alone leaves dozens; see mofi_jax/drained_reads.py)."""
  many = lambda step: {f'w{i}': state_at(step + i)['w'] for i in range(24)}
  ckpt = checkpointing.Checkpointer(str(tmp_path), ckpt_cfg())
  for step in (1, 2):
    ckpt.save(step, many(step), {'config': CONFIG}, _Input(step), force=True)
  ckpt.close()
  state_dir = os.path.join(tmp_path, 'checkpoints', '2', 'state')
  for root, _, files in os.walk(state_dir):   # OCDBT data files, under .../d/
    for path in (os.path.join(root, f) for f in files if os.path.basename(root) == 'd'):
      with open(path, 'r+b') as fh:
        fh.truncate(os.path.getsize(path) // 3)
  gc.collect()
  gc.disable()   # what is left pending stays visible until we look
  try:
    step, state, _ = checkpointing.Checkpointer(str(tmp_path), ckpt_cfg()).restore_latest(
        abstract_of(many(0)), _Input(), CONFIG)
    pending = [o for o in gc.get_objects() if type(o) is asyncio.Task and not o.done()]
  finally:
    gc.enable()
  assert step == 1 and not pending, pending[:3]
  np.testing.assert_array_equal(np.asarray(state['w3']), np.asarray(many(1)['w3']))


@pytest.mark.parametrize('change', ['shape', 'config'])
def test_incompatible_state_is_refused_and_nothing_moves(saved_run, change):
  before = digest(saved_run)
  abstract, config = abstract_of(state_at(0)), dict(CONFIG)
  if change == 'shape':
    abstract['w'] = jax.ShapeDtypeStruct((256, 16), jnp.float32)
    expect = r'w: checkpoint float32\[256, 64\], this run float32\[256, 16\]'
  else:
    config['model.embed_dim'] = 16
    expect = 'config.model.embed_dim: checkpoint 32, this run 16'
  with pytest.raises(checks.IncompatibleCheckpointError, match=expect) as e:
    checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
        abstract, _Input(), config)
  assert 'checkpoints/3' in str(e.value) and '--fresh_run' in str(e.value)
  assert digest(saved_run) == before


def test_other_config_changes_resume(saved_run):
  step, _, _ = checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
      abstract_of(state_at(0)), _Input(), dict(CONFIG, **{'optim.lr': 5e-4}))
  assert step == 3


def flaky_restore(monkeypatch, failures):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real, calls = ocp.StandardCheckpointHandler.restore, []

  def restore(self, *args, **kw):
    calls.append(1)
    if len(calls) <= failures:
      raise wrapped(ValueError('UNAVAILABLE: connection reset by the object store'))
    return real(self, *args, **kw)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'restore', restore)
  return calls


def test_transient_errors_are_retried_then_succeed(saved_run, monkeypatch):
  ckpt = checkpointing.Checkpointer(saved_run, ckpt_cfg(), retries=3, backoff_s=0)
  calls = flaky_restore(monkeypatch, failures=2)
  step, _, _ = ckpt.restore_latest(abstract_of(state_at(0)), _Input(), CONFIG)
  assert step == 3 and len(calls) == 3


def test_persistent_transient_error_fails_without_quarantine(saved_run, monkeypatch):
  before = digest(saved_run)
  ckpt = checkpointing.Checkpointer(saved_run, ckpt_cfg(), retries=3, backoff_s=0)
  calls = flaky_restore(monkeypatch, failures=99)
  with pytest.raises(checks.TransientCheckpointError, match='after 3 attempts'):
    ckpt.restore_latest(abstract_of(state_at(0)), _Input(), CONFIG)
  assert len(calls) == 3 and digest(saved_run) == before


def rewrite_meta(workdir, step, **fields):
  path = os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  with open(path, 'w') as f:
    json.dump(dict(meta, **fields), f)


@pytest.mark.parametrize('field, expect', [
    ({'process_count': 2}, 'saved by 2 processes, this run has 1'),
    ({'config': dict(CONFIG, **{'input.batch_size': 64})},
     'another input pipeline: config.input.batch_size'),
])
def test_other_process_count_or_input_pipeline_is_refused(saved_run, field, expect):
  """Both would restore an input position that is not this run's; restoring
  a tf.data state into another pipeline can even corrupt the heap."""
  rewrite_meta(saved_run, 3, **field)
  before = digest(saved_run)
  with pytest.raises(checks.IncompatibleCheckpointError, match=expect):
    checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
        abstract_of(state_at(0)), _Input(), dict(CONFIG, **{'input.batch_size': 32}))
  assert digest(saved_run) == before


def test_all_checkpoints_corrupt_stops_instead_of_starting_over(saved_run):
  for step in (1, 2, 3):
    os.remove(os.path.join(saved_run, 'input_state', str(step), 'process_0.index'))
  with pytest.raises(checks.NothingToResumeError, match=r'steps \[3, 2, 1\]'):
    checkpointing.Checkpointer(saved_run, ckpt_cfg()).restore_latest(
        abstract_of(state_at(0)), _Input(), CONFIG)


def test_fresh_run_moves_the_old_run_aside(saved_run):
  ckpt = checkpointing.Checkpointer(saved_run, ckpt_cfg())
  ckpt.start_fresh()
  assert ckpt.restore_latest(abstract_of(state_at(0)), _Input(), CONFIG) is None
  moved = [n for n in os.listdir(saved_run) if n.startswith('superseded-')]
  assert len(moved) == 1
  old = os.path.join(saved_run, moved[0])
  assert sorted(os.listdir(os.path.join(old, 'checkpoints'))) == ['1', '2', '3']
  with open(os.path.join(old, 'checkpoints', '3', 'meta', 'metadata')) as f:
    assert json.load(f)['step'] == 3


def test_a_rebuilt_corpus_is_refused_with_its_fingerprint_named(tmp_path, tiny_corpus):
  """The saved input position is a cursor into the corpus's shards: a rebuilt corpus (other
  shard names or counts) must be refused, naming input.corpus; the same corpus resumes."""
  from conftest import TINY_CORPUS_CONFIG  # pylint: disable=import-outside-toplevel
  from data_prep import demo_world  # pylint: disable=import-outside-toplevel
  from mofi_jax import run_setup  # pylint: disable=import-outside-toplevel
  rebuilt = demo_world.ensure_corpus(tmp_path / 'rebuilt',
                                     dict(TINY_CORPUS_CONFIG, num_shards=3))
  same = demo_world.ensure_corpus(tmp_path / 'same', TINY_CORPUS_CONFIG)
  saved_fp = run_setup.corpus_fingerprint(str(tiny_corpus))
  assert run_setup.corpus_fingerprint(str(same)) == saved_fp
  assert run_setup.corpus_fingerprint(str(rebuilt)) != saved_fp
  run = tmp_path / 'run'
  ckpt = checkpointing.Checkpointer(str(run), ckpt_cfg())
  ckpt.save(1, state_at(1), {'config': dict(CONFIG, **{'input.corpus': saved_fp})},
            _Input(10), force=True)
  ckpt.close()
  current = dict(CONFIG, **{'input.corpus': run_setup.corpus_fingerprint(str(rebuilt))})
  with pytest.raises(checks.IncompatibleCheckpointError, match=r'another input pipeline: '
                     r'config.input.corpus'):
    checkpointing.Checkpointer(str(run), ckpt_cfg()).restore_latest(
        abstract_of(state_at(0)), _Input(), current)
  step, _, _ = checkpointing.Checkpointer(str(run), ckpt_cfg()).restore_latest(
      abstract_of(state_at(0)), _Input(), dict(CONFIG, **{'input.corpus': saved_fp}))
  assert step == 1
