"""Committing a finished corpus into `--out`: safe to retry, never half visible.

A run writes everything into a temporary sibling, `.{name}.tmp-{run_id}`, whose
`corpus.json` is the manifest: it names the run (`commit.run_id`) and every other file with
its size (`commit.files`; all but corpus.json and the stats.json report), and
schema.validate_corpus checks the folder against it. Then:

  local folder   the old `--out` (if any, with --overwrite) is renamed aside to
                 `{out}.old-{run_id}`, the temporary folder renamed to `--out`, the old one
                 removed. A reader sees the old corpus or the new one.
  object store   (no folder rename): the old manifest is deleted first, so that a reader
                 refuses the folder while it changes; every file but the manifest is copied
                 in; files of an earlier run that the new one does not have (shards of
                 another shard count, old dead letters) are deleted; the manifest is
                 written last. A copy cut short leaves a folder without a manifest, which
                 readers refuse ("no corpus.json") and a rerun replaces.

Retries: a runner may run the commit again (a worker lost after it finished). If `--out`
already holds this run's manifest, the commit is done and succeeds again; every step
before that repeats without harm (renames check what exists, copies overwrite).

Temporary folders of earlier runs into the same `--out` (a crash, or a run where nothing
survived, whose stats.json is kept for inspection) are removed when the next run starts
(`remove_stale_temporaries`), so they never pile up. One run per `--out` at a time.

What may be removed or replaced follows mofi_jax/safe_outputs.py: a temporary folder is
made with our marker in it and removed only if it still holds it (never through a link);
`--overwrite` replaces only an earlier corpus (our marker, or an older corpus.json manifest).
"""
import json
import os

import tensorflow as tf
from absl import logging

from mofi_jax import safe_outputs
from mofi_jax.data import schema

TMP_INFIX = '.tmp-'
STATS_FILE = 'stats.json'
TOOL = 'data_prep.build_i2e'


class OutputExistsError(safe_outputs.OutputFolderError):
  """The output folder holds something that this run may not replace."""


def check_out_dir(out_dir, overwrite, inputs=(), tool=TOOL):
  """Refuses an `out_dir` that is not empty (unless `overwrite` and an earlier output of
  `tool`), is a link, or overlaps an input ((flag, path) pairs)."""
  try:
    legacy = (lambda f: committed_run(f) is not None) if tool == TOOL else None
    safe_outputs.check_output(out_dir, tool, overwrite, inputs=inputs, legacy=legacy)
  except safe_outputs.OutputFolderError as e:
    raise OutputExistsError(str(e).replace('folder is not empty', 'output folder is not '
                                           'empty', 1)) from e


def temporary_dir(out_dir, run_id):
  parent, name = os.path.split(out_dir)
  return os.path.join(parent, f'.{name}{TMP_INFIX}{run_id}')


def make_temporary_dir(tmp, tool=TOOL):
  """Creates this run's temporary folder, marked as ours (so a crash leaves it removable)."""
  return safe_outputs.make_staging(tmp, tool)


def remove_stale_temporaries(out_dir, keep='', tool=TOOL):
  """Deletes `.{name}.tmp-*` siblings of `out_dir` left by earlier runs (not `keep`): only
  folders that hold our marker, never a link or what it points to."""
  parent, name = os.path.split(out_dir)
  if not tf.io.gfile.isdir(parent or '.'):
    return []
  removed = safe_outputs.remove_stale(os.path.join(parent, f'.{name}{TMP_INFIX}*'), tool,
                                      keep=[keep] if keep else ())
  for path in removed:
    logging.info('build_i2e: removed the temporary folder of an earlier run: %s', path)
  return removed


def manifest(folder, run_id):
  """The `commit` entry of corpus.json: the run and {relative path: bytes} of every file."""
  files = {}
  for root, _, names in tf.io.gfile.walk(folder):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), folder).replace(os.sep, '/')
      if rel not in (schema.META_FILE, STATS_FILE):   # stats.json: a report, re-written by the demo
        files[rel] = tf.io.gfile.stat(os.path.join(root, n)).length
  return dict(run_id=run_id, files=dict(sorted(files.items())))


def committed_run(out_dir):
  """The run_id of the corpus committed in `out_dir`, or None."""
  path = os.path.join(out_dir, schema.META_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      meta = json.loads(f.read())
  except (ValueError, tf.errors.OpError):
    return None
  entry = meta.get('commit') if isinstance(meta, dict) else None
  run_id = entry.get('run_id') if isinstance(entry, dict) else None
  return run_id if isinstance(run_id, str) else None


def commit(tmp, out_dir, overwrite, run_id, by_copy=None):
  """Makes the finished corpus in `tmp` the content of `out_dir` (module docstring);
  `by_copy` (default: for object stores) picks the copy-and-manifest path."""
  if committed_run(out_dir) == run_id:   # A retry of a commit that completed.
    safe_outputs.remove_tree(tmp, TOOL)
    return
  check_out_dir(out_dir, overwrite)
  if not tf.io.gfile.isdir(tmp):
    raise FileNotFoundError(f'{tmp}: the finished corpus to commit into {out_dir} is gone.')
  if safe_outputs.is_object_store(out_dir) if by_copy is None else by_copy:
    _commit_by_copy(tmp, out_dir)
  else:
    rename_into_place(tmp, out_dir, run_id)


def rename_into_place(tmp, out_dir, run_id, tool=TOOL):
  """Local folders: `tmp` becomes `out_dir`; an old `out_dir` is removed only after."""
  legacy = (lambda f: committed_run(f) is not None) if tool == TOOL else None
  safe_outputs.swap_into_place(tmp, out_dir, tool, f'{out_dir}.old-{run_id}', legacy)


def _commit_by_copy(tmp, out_dir):
  meta = os.path.join(out_dir, schema.META_FILE)
  if tf.io.gfile.exists(meta):
    tf.io.gfile.remove(meta)   # From here until the last copy, readers refuse the folder.
  new = set()
  for folder, _, files in tf.io.gfile.walk(tmp):
    dest = out_dir + folder[len(tmp):]
    tf.io.gfile.makedirs(dest)
    for name in files:
      if folder == tmp and name == schema.META_FILE:
        continue
      tf.io.gfile.copy(f'{folder}/{name}', f'{dest}/{name}', overwrite=True)
      new.add(f'{dest}/{name}')
  for folder, _, files in tf.io.gfile.walk(out_dir):
    for name in files:
      path = f'{folder.rstrip("/")}/{name}'
      if path not in new and path != meta:
        tf.io.gfile.remove(path)   # A stale file of an earlier run.
  tf.io.gfile.copy(os.path.join(tmp, schema.META_FILE), meta, overwrite=True)  # The commit.
  safe_outputs.remove_tree(tmp, TOOL)
