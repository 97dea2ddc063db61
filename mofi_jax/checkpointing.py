"""Orbax checkpoints of the train state, plus the input position and metadata.

Layout under `workdir`:
  checkpoints/<step>/{state,meta}   Orbax CheckpointManager (async, keeps N)
  input_state/<step>/process_<i>*   each process's tf.data iterator (CLU)

A checkpoint that cannot be restored (truncated or corrupted files) is renamed
to `<step>.corrupt` (kept for inspection, never deleted) and the previous one is
tried; the input state of the chosen step is restored with it.
"""
import hashlib
import json
import os
import time

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging


def config_hash(config):
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:

  def __init__(self, workdir, ckpt_cfg):
    self.every_steps = ckpt_cfg.every_steps
    self.dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.input_dir = os.path.join(os.path.abspath(workdir), 'input_state')
    self.mngr = ocp.CheckpointManager(
        self.dir, item_names=('state', 'meta'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep,
            # A killed run leaves <step>.orbax-checkpoint-tmp behind; a re-save
            # of that step must not mix with its stale per-process metadata.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=ckpt_cfg.async_save))

  def _input_path(self, step):
    return os.path.join(self.input_dir, str(step), f'process_{jax.process_index()}')

  def should_save(self, step):
    # Our own interval: Orbax's default policy also saves the first step.
    return step % self.every_steps == 0

  def save(self, step, state, meta, data_iter, force=False):
    """Saves if the interval (or `force`) says so; the state must be finite."""
    if not (force or self.should_save(step)):
      return False
    if step in self.mngr.all_steps():
      return False  # already saved (e.g. the final step coincides with one).
    data_iter.save(self._input_path(step))
    meta = dict(meta, step=int(step), saved_at=time.time())
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

  def restore_latest(self, abstract_state, data_iter):
    """(step, state, meta) from the newest restorable checkpoint, or None."""
    self.mngr.reload()
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        restored = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
        input_path = self._input_path(step)
        if not tf.io.gfile.exists(input_path + '.index'):
          raise FileNotFoundError(f'input state {input_path} is missing')
        data_iter.restore(input_path)
      except Exception as e:  # pylint: disable=broad-except
        logging.error('Checkpoint step %d in %s cannot be restored (%s: %s); '
                      'moving it aside and trying the previous one.',
                      step, self.dir, type(e).__name__, str(e)[:500])
        self._quarantine(step)
        continue
      logging.info('Restored checkpoint step %d from %s', step, self.dir)
      return step, restored['state'], restored['meta']
    return None

  def _quarantine(self, step):
    self.mngr.wait_until_finished()
    if jax.process_index() == 0:
      src = os.path.join(self.dir, str(step))
      dst = f'{src}.corrupt-{int(time.time())}'
      if tf.io.gfile.exists(src):
        tf.io.gfile.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'quarantine_{step}')
    self.mngr.reload()

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


