"""Entry point of the demo world: a corpus generated once, atomically, into a folder."""
import json
import os
import shutil
import tempfile

from data_prep.demo_world import config as config_lib
from data_prep.demo_world import direct
from mofi_jax.data import schema


def ensure_corpus(out_dir, cfg=None, *, overwrite=False):
  """Returns `out_dir`, generating the demo corpus there unless an identical one exists.

  The corpus is written to a temporary sibling folder and renamed into place, so a
  killed run never leaves a half corpus. An existing corpus made with another config
  is an error unless `overwrite` (then it is replaced, only if it is a demo corpus).
  `cfg.builder='i2e'` needs the [prep] extras and takes minutes (i2e_build.py);
  'direct' takes seconds (direct.py).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  cfg = config_lib.resolve_config(cfg)
  wanted = config_lib.meta_stamp(cfg)
  existing = _existing_stamp(out_dir)
  if existing == wanted:
    return out_dir
  if existing is not None and not (overwrite and existing.get('source') == 'synthetic'):
    raise schema.CorpusError(
        f'{os.path.join(out_dir, schema.META_FILE)}: a corpus with a different config exists '
        f'here; delete it, choose another folder, or pass overwrite=True (--overwrite).')
  if existing is None and os.path.isdir(out_dir) and os.listdir(out_dir):
    raise schema.CorpusError(f'{out_dir}: folder is not empty and holds no {schema.META_FILE}; '
                             'refusing to write a demo corpus into it.')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp makes it private; a corpus is meant to be shared.
  try:
    if cfg.builder == 'i2e':
      # Runs the I2E pipeline's commands, which need the [prep] extras (Beam, spaCy).
      from data_prep.demo_world import i2e_build  # pylint: disable=g-import-not-at-top
      i2e_build.build_demo_corpus(tmp, cfg, wanted, final_dir=out_dir)
    else:
      direct.generate(tmp, cfg)
    _move_into_place(tmp, out_dir, replace=existing is not None, wanted=wanted)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _existing_stamp(out_dir):
  path = os.path.join(out_dir, schema.META_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError:
      return {}  # Present but unreadable: treated as "different", never overwritten silently.
  return {k: meta.get(k) for k in ('source', 'generator_version', 'synthetic_config')}


def _move_into_place(tmp, out_dir, replace, wanted):
  if replace:
    old = tmp + '.old'
    os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return
  try:
    os.rename(tmp, out_dir)  # Atomic; also replaces an empty folder.
  except OSError:
    # Fine if another process (e.g. another host of the same job) made the same corpus.
    if _existing_stamp(out_dir) != wanted:
      raise
