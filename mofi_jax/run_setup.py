"""Small pieces of the training entry point: config checks, processes, paths,
finite checks. Kept here so that train.py reads like a table of contents."""
import contextlib
import faulthandler
import importlib
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import logging
from flax import traverse_util

from mofi_jax import checkpoint_checks, inference, sharding, workdir_lock
from mofi_jax.data import pipeline, schema
from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.models import attention, mofi


class ConfigError(ValueError):
  pass


class NonFiniteError(RuntimeError):
  pass


USER_ERRORS = (ConfigError, NonFiniteError, schema.CorpusError,
               sharding.ShardingError, inference.LoadError,
               checkpoint_checks.CheckpointError, workdir_lock.WorkdirLockedError)


class _DropLibraryInfo(logging.logging.Filter):
  """Orbax logs every save at INFO; keep its warnings, drop the chatter."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'tensorstore'))


def quiet_libraries():
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def stacks_on_sigusr1():
  """`kill -USR1 <pid>` prints every thread's Python stack to stderr and the run
  goes on: what a stuck pod worker waits in (a collective, a barrier, a read),
  with nothing to install on the host.

  A Python handler, not `faulthandler.register`: that one walks the other
  threads from inside the signal, without the GIL, and segfaulted the run when
  Orbax's save threads started or ended at that moment. Here the walk holds
  the GIL; the cost is that a main thread blocked in C prints when it returns."""
  def dump(signum, frame):
    del signum, frame
    faulthandler.dump_traceback(all_threads=True)
  signal.signal(signal.SIGUSR1, dump)


def init_processes(flags_):
  """jax.distributed for multi-process runs; gloo collectives on CPU."""
  if flags_.coordinator_address:
    if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get(
        'JAX_PLATFORMS') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(flags_.coordinator_address,
                               num_processes=flags_.num_processes,
                               process_id=flags_.process_id)
  elif flags_.distributed:
    jax.distributed.initialize()


def corpus_fingerprint(data_dir):
  """Shard names and corpus counts, hashed: a rebuilt corpus changes it (the
  saved input position is a cursor into these files). No per-shard stat, so
  it stays cheap with thousands of shards on GCS."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  meta = schema.load_corpus_meta(data_dir)
  names = sorted(os.path.basename(f) for f in schema.list_shards(data_dir))
  key = [names, meta.get('num_train_examples'), meta.get('num_entities')]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def restore_or_start_fresh(ckpt, abstract_state, data_iter, run_config, fresh_run):
  """ckpt.restore_latest; with `fresh_run`, checkpoints that cannot be
  resumed (incompatible, or all corrupt) are moved aside instead of stopping
  the run."""
  try:
    return ckpt.restore_latest(abstract_state, data_iter, run_config)
  except (checkpoint_checks.IncompatibleCheckpointError,
          checkpoint_checks.NothingToResumeError) as e:
    if not fresh_run:
      raise
    logging.warning('--fresh_run: %s', e)
    ckpt.start_fresh()
    return None


def validate_config(config):
  choices = {
      'model.mode': (config.model.mode, mofi.MODES),
      'nonfinite': (config.nonfinite, ('stop', 'skip')),
      'input.text_source': (config.input.text_source, ('entity', 'alt_text')),
      'model.dtype': (config.model.dtype, tuple(mofi.DTYPES)),
      'model.head.kind': (config.model.head.kind, ('linear', 'cosine')),
      'model.attention': (config.model.get('attention', 'xla'), attention.IMPLEMENTATIONS),
  }
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ConfigError(f'config.{key}={value!r}; expected one of {allowed}')
  for key in ('total_steps', 'log_every', 'input.batch_size',
              'input.image_size', 'input.device_prefetch', 'ckpt.every_steps',
              'loss.tile_size'):
    value = config
    for part in key.split('.'):
      value = value[part]
    if int(value) <= 0:
      raise ConfigError(f'config.{key}={value}; expected a positive integer')


def corpus_recipe(name, registry):
  """The function `config.input.recipe` names: a key of `registry`, or 'module:function'."""
  target = registry.get(name, name)
  module, sep, function = target.partition(':')
  if not sep:
    raise ConfigError(f'config.input.recipe={name!r}; expected one of {sorted(registry)} '
                      "or 'module:function'")
  try:
    return getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'config.input.recipe={name!r}: cannot load {target!r} ({e})') from e


def resolve_path(path, **kw):
  return os.path.abspath(path.format(**kw)) if '://' not in path else path.format(**kw)


def enable_compile_cache(cache_cfg, workdir):
  """Turns on JAX's persistent compilation cache in `cache_cfg.dir`, if one is set."""
  if not cache_cfg.dir:
    return None
  path = resolve_path(cache_cfg.dir, workdir=workdir)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(cache_cfg.min_compile_secs))
  logging.info('Persistent compilation cache: %s', path)
  return path


@contextlib.contextmanager
def workdir_locked(workdir, job_id=''):
  """Holds <workdir>/train.lock for the run (workdir_lock.py). Process 0 takes it; every
  process of the job learns whether it did, so all stop together when it is held."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:   # any failure: the other processes must learn it, not wait in the broadcast
      tf.io.gfile.makedirs(workdir)
      lock = workdir_lock.WorkdirLock(workdir, job_id).acquire()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is None and not int(held):
      error = workdir_lock.WorkdirLockedError(
          f'{workdir}: process 0 could not take the workdir lock (its log names the holder).')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


def on_process_zero(fn, name):
  """Runs fn on process 0 only; every process waits for it."""
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def check_attention_platform(config, mesh):
  """A fused attention kernel needs its platform's devices: a clear error, not a
  lowering failure deep in the first compile."""
  name = config.model.get('attention', 'xla')
  needed = attention.PLATFORMS.get(name)
  platform = mesh.devices.flat[0].platform
  if needed and platform != needed:
    runnable = [i for i in attention.IMPLEMENTATIONS
                if attention.PLATFORMS.get(i) in (None, platform)]
    raise ConfigError(
        f'config.model.attention={name!r} runs only on {needed.upper()} devices; these '
        f'are {platform.upper()}: set --config.model.attention to one of {runnable}')


def resolve_from_corpus(config, data_dir):
  """Fills head.num_classes / text.vocab_size from the corpus where they are -1,
  and checks them where they are set. A 'pairs' corpus (0 entities: num_classes 0,
  no head) trains only a contrastive model on alt-texts."""
  config = config.copy_and_resolve_references()
  meta = schema.load_corpus_meta(data_dir)
  try:
    pipeline.check_corpus_kind(schema.corpus_kind(meta), config.input.text_source,
                               data_dir, mode=config.model.mode)
  except schema.CorpusError as e:
    raise ConfigError(str(e)) from e
  with config.unlocked():
    head = config.model.head
    if head.num_classes == -1:
      head.num_classes = int(meta['num_entities'])
    elif head.num_classes != int(meta['num_entities']):
      raise ConfigError(
          f'config.model.head.num_classes={head.num_classes} but the corpus '
          f'{data_dir} has {meta["num_entities"]} entities')
    if mofi.uses_text(config.model.mode) and config.model.text.vocab_size == -1:
      tok = tokenizer_lib.load_tokenizer(os.path.join(data_dir, schema.TOKENIZER_FILE))
      config.model.text.vocab_size = tok.get_vocab_size()
  return config


def with_shardings(abstract, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


def log_param_counts(params):
  flat = traverse_util.flatten_dict(params)
  towers = {}
  for path, x in flat.items():
    towers[path[0]] = towers.get(path[0], 0) + int(np.prod(x.shape))
  for name, n in sorted(towers.items()):
    logging.info('Parameters %-14s %14s', name, f'{n:,}')
  logging.info('Parameters %-14s %14s', 'total', f'{sum(towers.values()):,}')


@jax.jit
def _all_finite(params):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]
  return jnp.all(jnp.stack(leaves))


def check_finite(state, config, restored_from=None):
  """Raises NonFiniteError (policy 'stop') naming the first non-finite step.

  `restored_from`: (step, path, checksums verified) of the checkpoint this
  run resumed from. When
  the very first step after it is the bad one, the checkpoint (or what
  changed since it was written) is the suspect, not the learning rate.
  """
  bad_step = int(state.nonfinite_step)
  if (bad_step >= 0 and config.nonfinite == 'stop' and restored_from
      and bad_step == restored_from[0]):
    step, path, verified = restored_from
    raise NonFiniteError(
        f'non-finite loss or gradient at step {step}, the first step after '
        f'restoring checkpoint {path}. '
        + ('Its array checksums matched at restore, so the saved values are '
           'what was written: ' if verified else
           'It was saved without checksums, so it may be damaged: ') +
        'check that checkpoint (and any config or data change since it was '
        'saved) before the learning rate; the previous checkpoint may be the '
        'one to resume from.')
  if bad_step >= 0 and config.nonfinite == 'stop':
    raise NonFiniteError(
        f'non-finite loss or gradient at step {bad_step}; the run stopped '
        f'there (config.nonfinite="stop") and wrote no checkpoint after it. '
        f'Lower the learning rate or set --config.nonfinite=skip.')
  if int(state.skipped_steps):
    logging.warning('%d updates skipped so far for non-finite values (first at '
                    'step %d).', int(state.skipped_steps), bad_step)
  if not bool(_all_finite(state.params)):
    raise NonFiniteError(f'parameters hold non-finite values at step '
                         f'{int(state.step)}; not saving them.')


def flat_hparams(config):
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
          for k, v in flat.items()}
