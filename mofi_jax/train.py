r"""Trains MOFI: supervised entity classification, contrastive, or multi-task.

  python -m mofi_jax.train --config configs/demo.py --workdir /tmp/mofi_demo
  python -m mofi_jax.train --config configs/mofi_b16.py:multitask \
      --workdir gs://BUCKET/run --config.input.batch_size=4096

Reads like a table of contents: config, mesh, input, model/optimizer/update
step, sharded init or restore, evaluators, metrics, loop.
Re-running the same command resumes from the newest checkpoint in --workdir.
"""
import functools
import signal
import sys
import threading

import jax
from absl import app, flags, logging
from clu import periodic_actions
from clu.data import dataset_iterator
from ml_collections import config_flags

from mofi_jax import (checkpoint_checks, checkpointing, cli_errors, inference,
                      periodic_evals, run_setup, sharding, telemetry, trainer, warm_start)
from mofi_jax.data import classification_input, device_feed, pipeline
from mofi_jax.models import mofi

FLAGS = flags.FLAGS
# Corpus recipes a config may name (input.recipe), as 'module:function'. Process 0
# calls function(data_dir, input.recipe_args) before the input reads data_dir; a
# recipe returns at once when its corpus is already there. Named here, at the entry
# point, so that the training library never learns how a corpus is built.
CORPUS_RECIPES = {'demo_world': 'data_prep.demo_world:ensure_corpus'}
config_flags.DEFINE_config_file('config', None, 'Config file[:variant].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and caches.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for jax.distributed (multi-process '
                    'CPU/GPU). On TPU pods leave unset: it is auto-detected.')
flags.DEFINE_integer('num_processes', None, 'For jax.distributed.')
flags.DEFINE_integer('process_id', None, 'For jax.distributed.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                  'with auto-detection (TPU pods).')
flags.DEFINE_string('job_id', '', 'Names this job in <workdir>/train.lock. A restart '
                    'of the same job (same id, e.g. the pod job name) takes over its '
                    'lock at once; another run using the workdir is refused.')
flags.DEFINE_bool('fresh_run', False, 'When the checkpoints in --workdir '
                  'cannot be resumed (another model config or tree, or all '
                  'corrupt), move them to <workdir>/superseded-<time>/ (never '
                  'deleted) and start at step 0. Resumable checkpoints are '
                  'resumed as usual, so a restart script may keep the flag.')


class _Preemption:
  """Single process: SIGTERM sets a flag; the loop saves and exits cleanly.

  With several processes every process must stop at the same step, so the
  signal is left to jax.distributed's preemption service, which Orbax's
  `reached_preemption(step)` consults in agreement across processes.
  """

  def __init__(self):
    self.requested = False
    # Signals reach the main thread only (a notebook may train in a worker thread).
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning('Received signal %d: saving a checkpoint, then exiting.',
                    signum)
    self.requested = True


def train_and_evaluate(config, workdir, fresh_run=False, job_id=''):
  """Trains and evaluates in `workdir`, which no other run may use meanwhile."""
  with run_setup.workdir_locked(workdir, job_id):
    return _train_and_evaluate(config, workdir, fresh_run)


def _train_and_evaluate(config, workdir, fresh_run):
  preemption = _Preemption()
  # ---------------------------------------------------------------- config
  run_setup.validate_config(config)
  warm_start.check_init_config(config)
  run_setup.enable_compile_cache(config.compile_cache, workdir)
  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  run_setup.check_attention_platform(config, mesh)
  sharding.activate(mesh)
  sharding.check_batch_divides(config.input.batch_size, mesh,
                              microbatches=config.optim.microbatches)
  logging.info('Mesh %s over %d devices, %d processes.', dict(mesh.shape),
               jax.device_count(), jax.process_count())
  # ----------------------------------------------------------------- input
  data_dir = run_setup.resolve_path(config.input.data_dir, workdir=workdir)
  dataset, config, input_fingerprint = _train_input(config, data_dir)
  inference.write_config(workdir, config, data_dir)
  data_iter = dataset_iterator.TfDatasetIterator(dataset, checkpoint=True)
  # -------------------------------------- model, optimizer and update step
  setup = trainer.build(config, mesh)
  # --------------------------------------------- sharded init, or restore
  ckpt = checkpointing.Checkpointer(workdir, config.ckpt)
  run_config = dict(checkpoint_checks.flat_config(config),
                    **{'input.corpus': input_fingerprint})
  restored = run_setup.restore_or_start_fresh(
      ckpt, run_setup.with_shardings(setup.abstract, setup.shardings),
      data_iter, run_config, fresh_run)
  if restored:
    first_step, state, saved_meta = restored
    restored_from = (first_step, ckpt.step_path(first_step),
                     'checksums' in saved_meta)
  else:
    first_step, state = 0, setup.init(mesh, config.seed)
    restored_from = None
    if config.init.hf_clip:   # foreign towers before step 0, never on resume
      from mofi_jax.interop import hf_import  # pylint: disable=g-import-not-at-top
      state = state.replace(params=hf_import.init_from_hf_clip(state.params, config))
    if config.init.get('workdir'):   # our own checkpoint's towers (and head), likewise
      state = state.replace(params=warm_start.init_from_workdir(state.params, config, mesh,
                                                                data_dir))
  run_setup.log_param_counts(state.params)
  # ------------------------------------------------------------ evaluators
  embed_images = trainer.make_embed_fn(setup.model, mofi.Mofi.encode_image,
                                       mesh, setup.shardings.params)
  embed_tokens = (trainer.make_embed_fn(setup.model, mofi.Mofi.encode_text,
                                        mesh, setup.shardings.params)
                  if mofi.uses_text(config.model.mode) else None)
  classify_images = (trainer.make_embed_fn(setup.model, mofi.Mofi.classify_image, mesh,
                                           setup.shardings.params, normalize=False)
                     if mofi.uses_head(config.model.mode) else None)   # compiled if used
  towers_at = periodic_evals.towers_factory(config, data_dir, embed_images,
                                            embed_tokens, classify_images=classify_images)
  evaluators = periodic_evals.from_config(config, data_dir=data_dir,
                                          workdir=workdir)
  # ------------------------------------------------- metrics and progress
  writer = telemetry.create_writer(workdir, first_step, config.get('log'))  # + jsonl, W&B
  writer.write_hparams(run_setup.flat_hparams(config))
  meter = telemetry.Throughput(config, jax.devices(), first_step)
  hooks = [periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer,
      every_steps=config.log_every)]
  if config.profile.enabled and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(
        logdir=workdir, first_profile=config.profile.first_step,
        num_profile_steps=config.profile.num_steps))
  meta = {'config_hash': checkpointing.config_hash(config), 'config': run_config}
  # ------------------------------------------------------------------ loop
  run_evals = lambda names, s: periodic_evals.run(
      evaluators, names, s, towers_at(state.params), writer, workdir)
  if first_step == 0 and config.get('eval_at_start', True):
    run_evals(periodic_evals.due(evaluators, 0), 0)
  feed = device_feed.DeviceFeed(
      data_iter, functools.partial(sharding.global_batch, mesh),
      config.input.device_prefetch, first_step=first_step,
      is_boundary=lambda s: ckpt.should_save(s) or s >= config.total_steps)
  acc, stopping = None, False
  step = first_step
  while step < config.total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      with meter.waiting_for_input():
        batch = feed.next()
      state, metrics = setup.train_step(state, batch)
    step += 1
    acc = metrics if acc is None else acc.merge(metrics)
    for hook in hooks:
      hook(step)
    last = step == config.total_steps
    # On a preemption, train through the batches already on the devices, so
    # that the saved data position matches the saved state.
    stopping = stopping or preemption.requested or ckpt.reached_preemption(step)
    if stopping:
      feed.close()
    stop = stopping and not feed.pending
    if step % config.log_every == 0 or last or stop:
      run_setup.check_finite(state, config, restored_from)
      train_scalars = {f'train/{k}': v for k, v in acc.compute().items()}
      writer.write_scalars(step, {**train_scalars, **meter.report(step)})
      acc = None
    evals_due = periodic_evals.due(evaluators, step, last)
    run_evals(evals_due, step)
    if ckpt.should_save(step) or last or stop:
      run_setup.check_finite(state, config, restored_from)
      ckpt.save(step, state, dict(meta, examples_seen=step *
                                  config.input.batch_size), data_iter,
                force=last or stop)
      meter.restart(step)   # throughput counts training steps, not saves or evals
    elif evals_due:
      meter.restart(step)
    if stop:
      logging.warning('Stopped at step %d after a preemption signal; re-run '
                      'the same command to resume.', step)
      break
  ckpt.close()
  writer.close()
  return state


def _train_input(config, data_dir):
  """(batches of this process, config resolved from the data, the data's fingerprint):
  an I2E corpus (built first by config.input.recipe, if set), or a labelled image set
  (config.input.dataset: fine-tuning, data/classification_input.py)."""
  per_process_batch = config.input.batch_size // jax.process_count()
  where = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               per_process_batch=per_process_batch)
  if classification_input.configured(config.input):
    records = classification_input.open_records(config.input, data_dir)
    config = classification_input.resolve(config, records)
    return (classification_input.make_train_dataset(records, config.input,
                                                    seed=config.input.seed, **where),
            config, classification_input.fingerprint(records))
  if config.input.get('recipe'):
    recipe = run_setup.corpus_recipe(config.input.recipe, CORPUS_RECIPES)
    run_setup.on_process_zero(
        lambda: recipe(data_dir, config.input.get('recipe_args')), 'corpus_recipe')
  # Validates the corpus (the first shards up front; every later record as it
  # is read) before anything reads the corpus metadata.
  dataset = pipeline.make_train_dataset(data_dir, config.input, seed=config.input.seed,
                                        **where)
  config = run_setup.resolve_from_corpus(config, data_dir)
  return dataset, config, run_setup.corpus_fingerprint(data_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  run_setup.quiet_libraries()
  run_setup.stacks_on_sigusr1()
  run_setup.init_processes(FLAGS)
  if FLAGS.workdir is None:
    sys.exit('mofi_jax.train: error: --workdir is required')
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir, fresh_run=FLAGS.fresh_run,
                       job_id=FLAGS.job_id)
  except run_setup.USER_ERRORS + cli_errors.input_errors() as e:
    logging.error('%s', e)
    cli_errors.exit_with('mofi_jax.train', e)


def _last_line(message):
  """A config file's own error, where absl wrapped it with the traceback that raised it."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  return lines[-1] if len(lines) > 1 else message


def parse_flags(argv):
  """absl parsing, with config-override errors as one line, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    what = (f'unknown config key {e}' if isinstance(e, (AttributeError, KeyError))
            else _last_line(f'{type(e).__name__}: {e}'))
    sys.exit(f'mofi_jax.train: error: bad command line ({what}); config '
             f'overrides given: {overrides}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=parse_flags)
