"""Orbax checkpoints of the train state, plus the input position and metadata.

Layout under `workdir`:
  checkpoints/<step>/{state,meta}   Orbax CheckpointManager (async, keeps N);
                                    meta holds the config, array checksums and
                                    each process's input-state sha256
  input_state/<step>/process_<i>*   each process's input position

Restoring (`restore_latest`) is one decision for all processes: process 0
picks the newest step and broadcasts it, every process tries it, and the
outcomes are gathered. Then, by the worst outcome (checkpoint_checks.classify):
  * all restored and verified:   train on from that step;
  * incompatible (another tree, shapes or model config): stop with the
    differing keys, touching nothing (`start_fresh` moves the run aside);
  * corrupt anywhere (checksum mismatch, truncated or missing files, a missing
    input state or one whose sha256 differs): every process drops the step together; process 0 renames
    it to `<step>.corrupt-<time>` (kept, never deleted); the previous step is
    tried next;
  * transient storage errors: retried with backoff, then fatal;
  * fatal (out of memory, permissions, anything unrecognised): stop.
"""
import hashlib
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from etils import epath

from mofi_jax import checkpoint_checks as checks
from mofi_jax import drained_reads

_OUTCOMES = ('ok', 'corrupt', 'incompatible', 'transient', 'fatal')


def config_hash(config):
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


def _sync(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _broadcast_int(value):
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _gather_digests(digest):
  """Every process's 32-byte digest, as hex, in process order."""
  if jax.process_count() == 1:
    return [digest.hex()]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  rows = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, np.uint8)))
  return [bytes(r.astype(np.uint8)).hex() for r in rows.reshape(jax.process_count(), -1)]


def input_state_digest(path):
  """sha256 over this process's input-state files (names and bytes): the checkpoint's
  record of them, since a valid tf.data state of another step or run restores silently."""
  h = hashlib.sha256()
  for name in sorted(tf.io.gfile.glob(path + '.*')):
    with tf.io.gfile.GFile(name, 'rb') as f:
      data = f.read()
    h.update(f'{os.path.basename(name)}:{len(data)}:'.encode())
    h.update(data)
  return h.digest()


def _gather_int(value):
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [int(v) for v in np.ravel(multihost_utils.process_allgather(np.int32(value)))]


class Checkpointer:

  def __init__(self, workdir, ckpt_cfg, *, retries=4, backoff_s=2.0):
    self.every_steps = ckpt_cfg.every_steps
    self.workdir = os.path.abspath(workdir)
    self.dir = os.path.join(self.workdir, 'checkpoints')
    self.input_dir = os.path.join(self.workdir, 'input_state')
    self.retries, self.backoff_s = max(1, retries), backoff_s
    self._async = ckpt_cfg.async_save
    self._keep = ckpt_cfg.keep
    self.mngr = self._manager()

  def _manager(self):
    return ocp.CheckpointManager(
        self.dir, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            # A killed run leaves <step>.orbax-checkpoint-tmp behind; a re-save
            # of that step must not mix with its stale per-process metadata.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async))

  def _input_path(self, step):
    return os.path.join(self.input_dir, str(step), f'process_{jax.process_index()}')

  def should_save(self, step):
    # Our own interval: Orbax's default policy also saves the first step.
    return step % self.every_steps == 0

  # ------------------------------------------------------------------ save
  def save(self, step, state, meta, data_iter, force=False):
    """Saves if the interval (or `force`) says so; the state must be finite."""
    if not (force or self.should_save(step)):
      return False
    if step in self.mngr.all_steps():
      return False  # already saved (e.g. the final step coincides with one).
    data_iter.save(self._input_path(step))
    meta = dict(meta, step=int(step), saved_at=time.time(),
                process_count=jax.process_count(), checksums=checks.checksums(state),
                input_checksums=_gather_digests(input_state_digest(self._input_path(step))))
    saved = self.mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                           force=True)
    self._prune_input_states()
    return saved

  def _prune_input_states(self):
    """Drops this process's input states older than every kept checkpoint.

    Each process removes only its own files (the folder may be shared by all
    processes); whoever finds a folder empty removes it.
    """
    steps = self.mngr.all_steps()
    if not steps or not tf.io.gfile.isdir(self.input_dir):
      return
    for name in tf.io.gfile.listdir(self.input_dir):
      name = name.rstrip('/')
      if not (name.isdigit() and int(name) < min(steps)):
        continue
      folder = os.path.join(self.input_dir, name)
      mine = tf.io.gfile.glob(os.path.join(folder, f'process_{jax.process_index()}.*'))
      try:
        for path in mine:
          tf.io.gfile.remove(path)
        if not tf.io.gfile.listdir(folder):
          tf.io.gfile.rmtree(folder)
      except tf.errors.NotFoundError:
        pass  # another process emptied and removed it first.

  # --------------------------------------------------------------- restore
  def restore_latest(self, abstract_state, data_iter, run_config=None):
    """(step, state, meta) from the newest good checkpoint, or None.

    `run_config`: checks.flat_config(config) of this run, compared with the
    saved one. Raises checks.IncompatibleCheckpointError, FatalCheckpointError
    or TransientCheckpointError; see the module docstring.
    """
    self.mngr.reload()
    quarantined = []
    while True:
      steps = self.mngr.all_steps()
      step = _broadcast_int(max(steps) if steps else -1)
      if step < 0 and quarantined:
        raise checks.NothingToResumeError(
            f'every checkpoint in {self.dir} failed its checks and was moved '
            f'aside (steps {quarantined}, now <step>.corrupt-*); there is '
            f'nothing to resume from. Inspect them, or pass --fresh_run to '
            f'start at step 0.')
      if step < 0:
        return None
      # Phase 1, local reads only (metadata, config, tree, input-state files),
      # agreed on before phase 2: a process must never skip a collective that
      # the others wait in.
      worst, detail, meta = self._agreed(self._with_retries(
          step, lambda: self._try_once(
              lambda: self._preflight(step, abstract_state, run_config))))
      if worst == 'ok':
        worst, detail, restored = self._restore_together(step, abstract_state,
                                                         meta, data_iter)
      if worst == 'ok':
        logging.info('Restored checkpoint step %d from %s (%s)', step, self.dir,
                     'checksums verified' if 'checksums' in meta
                     else 'saved without checksums: not verified')
        return step, restored, meta
      self._act_on(worst, step, detail)
      quarantined.append(step)

  def _restore_together(self, step, abstract_state, meta, data_iter):
    """Phase 2, in two agreed steps: (a) every process reads its arrays (no
    collective); (b) only if all reads succeeded, the checksums (a
    collective) and the input position. Retries happen together."""
    worst, detail, state = self._with_retries(step, lambda: self._agreed(
        self._try_once(lambda: self._read_arrays(step, abstract_state))))
    if worst != 'ok':
      return worst, detail, None
    return self._with_retries(step, lambda: self._agreed(self._try_once(
        lambda: self._verify_and_restore_input(step, state, meta, data_iter))))

  @staticmethod
  def _agreed(attempt):
    """(outcome, detail, value) -> the worst outcome over all processes."""
    outcome, detail, value = attempt
    if outcome != 'ok' and jax.process_count() > 1:
      logging.warning('Process %d: %s: %s', jax.process_index(), outcome, detail)
    outcomes = [_OUTCOMES[i] for i in _gather_int(_OUTCOMES.index(outcome))]
    worst = max(outcomes, key=_OUTCOMES.index)
    if worst != 'ok' and outcome != worst:
      detail = (f'process(es) {[i for i, o in enumerate(outcomes) if o == worst]} '
                f'reported {worst}')
    return worst, detail, value

  def _act_on(self, worst, step, detail):
    """Raises for incompatible / transient / fatal; quarantines if corrupt."""
    where = self.step_path(step)
    if worst == 'incompatible':
      raise checks.IncompatibleCheckpointError(
          f'checkpoint {where} does not fit this run: {detail}. Nothing was '
          f'changed. Resume with the config it was saved with, use another '
          f'--workdir, or pass --fresh_run to move the old run aside and start '
          f'at step 0.')
    if worst in ('transient', 'fatal'):
      cls = (checks.TransientCheckpointError if worst == 'transient'
             else checks.FatalCheckpointError)
      raise cls(f'checkpoint {where} could not be restored and was left in '
                f'place: {detail}')
    logging.error('Checkpoint step %d in %s cannot be restored (%s); moving it '
                  'aside and trying the previous one.', step, self.dir, detail)
    self._quarantine(step)

  def step_path(self, step):
    return os.path.join(self.dir, str(step))

  @staticmethod
  def _try_once(fn):
    """(outcome, detail, fn()), the outcome classified from any error."""
    try:
      return 'ok', '', fn()
    except checks.IncompatibleCheckpointError as e:
      return 'incompatible', str(e), None
    except Exception as e:  # pylint: disable=broad-except
      return checks.classify(e), f'{type(e).__name__}: {str(e)[:600]}', None

  def _with_retries(self, step, attempt):
    """Repeats `attempt()` with backoff while it is transient. An attempt
    that contains a collective must agree first (`_agreed`), so that all
    processes retry together."""
    for i in range(self.retries):
      outcome, detail, value = attempt()
      if outcome != 'transient':
        return outcome, detail, value
      if i + 1 < self.retries:
        wait = self.backoff_s * 2**i
        logging.warning('Storage error restoring step %d (attempt %d of %d, '
                        'retrying in %.1f s): %s', step, i + 1, self.retries,
                        wait, detail)
        time.sleep(wait)
    return 'transient', f'{detail} (still failing after {self.retries} attempts)', None

  def _preflight(self, step, abstract_state, run_config):
    """Local checks: same process count, config and tree; input state
    present. Returns the step's metadata."""
    meta = self._read_meta(step)
    saved_procs = meta.get('process_count', jax.process_count())
    if saved_procs != jax.process_count():
      raise checks.IncompatibleCheckpointError(
          f'saved by {saved_procs} processes, this run has {jax.process_count()}: '
          f'each process saved its own input position')
    saved_config = meta.get('config') if run_config else None
    diffs = checks.resume_differences(saved_config, run_config) if saved_config else []
    if saved_config and not diffs:
      changed = checks.config_differences(saved_config, run_config, prefix='',
                                          ignore=())
      if changed:
        logging.info('Resuming step %d with %d config change(s) that keep the '
                     'checkpoint valid: %s', step, len(changed), '; '.join(changed[:8]))
    diffs += checks.tree_differences(self._saved_tree(step), abstract_state)
    if diffs:
      raise checks.IncompatibleCheckpointError(
          f'{len(diffs)} difference(s): ' + '; '.join(diffs[:8]) +
          ('; ...' if len(diffs) > 8 else ''))
    input_path = self._input_path(step)
    for suffix in ('.index', '.data-*'):
      if not tf.io.gfile.glob(input_path + suffix):
        raise FileNotFoundError(f'input state {input_path}{suffix} is missing')
    recorded = meta.get('input_checksums')
    if recorded is not None:
      if (not isinstance(recorded, list) or len(recorded) != jax.process_count() or
          recorded[jax.process_index()] != input_state_digest(input_path).hex()):
        raise checks.CorruptCheckpointError(
            f'input state {input_path}: its files differ from the sha256 the checkpoint '
            'recorded when it saved them')
    return meta

  def _state_dir(self, step):
    return epath.Path(self.step_path(step)) / 'state'

  def _saved_tree(self, step):
    """The saved tree's metadata (errors propagate, to be classified)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      with drained_reads.drained():
        return handler.metadata(self._state_dir(step)).tree
    finally:
      handler.close()

  def _read_arrays(self, step, abstract_state):
    """This process's shards. Orbax's handler is called directly:
    `Checkpointer.restore` ends in a barrier, which a process whose read
    failed would never reach; here every process returns with an outcome,
    and only once all of its reads have ended (drained_reads)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      with drained_reads.drained():
        return handler.restore(self._state_dir(step),
                               args=ocp.args.StandardRestore(abstract_state))
    finally:
      handler.close()

  def _verify_and_restore_input(self, step, state, meta, data_iter):
    if 'checksums' in meta:
      checks.verify_checksums(state, meta['checksums'], self.step_path(step))
    input_path = self._input_path(step)
    try:
      data_iter.restore(input_path)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError,
            tf.errors.FailedPreconditionError) as e:
      # The files are there (phase 1) and their CRCs passed (else DataLoss):
      # the saved iterator is another pipeline's.
      raise checks.IncompatibleCheckpointError(
          f'input state {input_path} does not match this run\'s input pipeline '
          f'(were input.* keys changed, such as shuffle_buffer, batch_size or '
          f'image_size?): {type(e).__name__}: {str(e)[:300]}') from e
    return state

  def _read_meta(self, step):
    path = os.path.join(self.step_path(step), 'meta', 'metadata')
    with tf.io.gfile.GFile(path) as f:
      return json.loads(f.read())

  def _quarantine(self, step):
    """Every process calls this together; process 0 moves the step aside."""
    self.mngr.wait_until_finished()
    if jax.process_index() == 0:
      suffix = f'.corrupt-{int(time.time())}'
      for src in (self.step_path(step), os.path.join(self.input_dir, str(step))):
        if tf.io.gfile.exists(src):
          tf.io.gfile.rename(src, src + suffix)
    _sync(f'quarantine_{step}')
    self.mngr.reload()

  def start_fresh(self):
    """Moves this workdir's checkpoints and input states to
    `superseded-<time>/` (nothing is deleted) so that the run starts at 0."""
    self.mngr.wait_until_finished()
    if jax.process_index() == 0:
      dest = os.path.join(self.workdir, f'superseded-{time.strftime("%Y%m%d-%H%M%S")}')
      for src in (self.dir, self.input_dir):
        if tf.io.gfile.exists(src):
          tf.io.gfile.makedirs(dest)
          tf.io.gfile.rename(src, os.path.join(dest, os.path.basename(src)))
          logging.warning('--fresh_run: moved %s to %s', src, dest)
    _sync('start_fresh')
    self.mngr.close()
    self.mngr = self._manager()

  # ----------------------------------------------------------------- misc
  def reached_preemption(self, step):
    return self.mngr.reached_preemption(step)

  def wait(self):
    self.mngr.wait_until_finished()

  def close(self):
    self.mngr.wait_until_finished()
    self.mngr.close()


def write_json(path, obj):
  """Atomically writes `obj` as JSON (never leaves a half-written file)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True, default=float))
  tf.io.gfile.rename(tmp, path, overwrite=True)
