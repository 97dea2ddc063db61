"""The one rule for every step that removes or replaces files: only what we wrote.

Every command that writes an output folder (build_i2e, build_kb, train_ner, export)
follows it, through these functions:
- **Ours by marker.** An output folder carries `.mofi_jax-output.json` ({"tool": ...}),
  written first into its staging folder, so that a folder cut short is still recognised.
  `--overwrite` replaces a non-empty folder only when its marker names the same tool
  (outputs of earlier versions are recognised by their own manifest: `legacy`).
- **Never through a link.** Local paths are checked with `os.lstat` and removed with
  `shutil.rmtree`, which refuses a link and never follows one inside the tree. Object
  stores have no links; there a path is removed only when it carries our marker.
- **Apart from the inputs.** `--out` may not equal, contain or sit inside an input
  (`--workdir`, `--kb`, `--pairs`, ...): replacing it would delete what the run reads.

Imports nothing heavy (TensorFlow only for object-store paths), so that commands refuse a
bad `--out` before their slow imports.
"""
import contextlib
import glob
import json
import logging
import os
import shutil
import socket
import stat

MARKER = '.mofi_jax-output.json'
_GLOB_CHARS = '*?[{'


class OutputFolderError(ValueError):
  """--out cannot be written or replaced as asked."""


def is_object_store(path):
  return '://' in str(path)


def _gfile():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.io.gfile


def canonical(path):
  """Local: the real absolute path (links resolved); object stores: no trailing '/'."""
  path = os.fspath(path)
  return path.rstrip('/') if is_object_store(path) else os.path.realpath(path)


def pattern_root(pattern):
  """The folder a file pattern can only match inside: the part before its first glob
  character, up to the last separator ('raw/*.tar' -> 'raw')."""
  pattern = os.fspath(pattern)
  cut = _first_glob(pattern)
  if cut == len(pattern):
    return pattern
  return pattern[:cut].rsplit('/', 1)[0] if '/' in pattern[:cut] else '.'


def _inside(child, parent):
  return child == parent or child.startswith(parent.rstrip('/') + '/')


def _first_glob(pattern):
  return min([pattern.find(c) for c in _GLOB_CHARS if c in pattern] or [len(pattern)])


def _may_match_inside(path):
  """Whether input `path` reaches into folders below its root: a plain folder does, and so
  does a pattern with wildcards in folder names; 'raw/*.tar' matches only files directly in
  'raw', so an output folder below 'raw' is apart from it."""
  path = os.fspath(path)
  cut = _first_glob(path)
  if cut == len(path):
    return True
  tail = path[path.rfind('/', 0, cut) + 1:]
  return '/' in tail or '**' in tail


def check_apart(out, inputs, flag='--out'):
  """Refuses an `out` that equals, contains or lies inside any input.

  inputs: (flag, path or file pattern) pairs; empty paths are skipped.
  """
  target = canonical(out)
  for name, path in inputs:
    if not path:
      continue
    src = canonical(pattern_root(path))
    if src == target:
      raise OutputFolderError(f'{flag} {out}: is the same folder as {name} {path}; write '
                              'the output somewhere else.')
    if _inside(src, target):
      raise OutputFolderError(f'{flag} {out}: contains {name} {path}; replacing it would '
                              'delete the input. Write the output somewhere else.')
    if _inside(target, src) and _may_match_inside(path):
      raise OutputFolderError(f'{flag} {out}: lies inside {name} {path}; write the output '
                              'outside the inputs.')


def read_marker(folder):
  """The marker's dict, or None (no marker, or one that is not ours to trust)."""
  path = os.path.join(os.fspath(folder), MARKER)
  try:
    if is_object_store(path):
      if not _gfile().exists(path):
        return None
      with _gfile().GFile(path) as f:
        text = f.read()
    else:
      if os.path.islink(path) or not os.path.isfile(path):
        return None
      with open(path, encoding='utf-8') as f:
        text = f.read(65536)
    marker = json.loads(text)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) and isinstance(marker.get('tool'), str) else None


def write_marker(folder, tool, **fields):
  text = json.dumps(dict(fields, tool=tool), sort_keys=True)
  path = os.path.join(os.fspath(folder), MARKER)
  if is_object_store(path):
    with _gfile().GFile(path, 'w') as f:
      f.write(text)
  else:
    with open(path, 'w', encoding='utf-8') as f:
      f.write(text)


def make_staging(folder, tool):
  """Creates the new staging folder `folder` with our marker in it (first, so that a
  folder left by a crash is recognised as ours and removed by the next run)."""
  if is_object_store(folder):
    _gfile().makedirs(folder)
  else:
    os.makedirs(folder)
  write_marker(folder, tool, host=socket.gethostname(), pid=os.getpid())
  return folder


def _in_use(marker):
  """Whether a staging folder's marker names a live process on this host (another run
  into the same output, still writing): never removed as stale."""
  pid = marker.get('pid') if marker else None
  if marker is None or marker.get('host') != socket.gethostname() or not isinstance(pid, int):
    return False
  if pid == os.getpid():
    return False   # this process's own leftover (an earlier call that failed)
  return process_alive(pid)


def process_alive(pid):
  """Whether a process `pid` runs on this host (in this pid namespace); False for junk."""
  try:
    os.kill(pid, 0)
  except PermissionError:
    return True   # alive, someone else's
  except (OSError, OverflowError, ValueError, TypeError):
    return False
  return True


def owned_by(folder, tool, legacy=None):
  """Whether `folder` is an output of `tool`: its marker says so, or `legacy(folder)`."""
  marker = read_marker(folder)
  if marker is not None:
    return marker['tool'] == tool
  return bool(legacy and legacy(folder))


def _lstat(path):
  try:
    return os.lstat(path)
  except FileNotFoundError:
    return None


def _listing(folder):
  if is_object_store(folder):
    gfile = _gfile()
    return gfile.listdir(folder) if gfile.isdir(folder) else []
  st = _lstat(folder)
  return os.listdir(folder) if st is not None and stat.S_ISDIR(st.st_mode) else []


def check_output(out, tool, overwrite, *, inputs=(), legacy=None, flag='--out'):
  """Before any work: `out` may be written by `tool` (module docstring).

  A missing or empty folder is fine; a non-empty one needs `overwrite` and must be an
  earlier output of the same tool.
  """
  out = os.fspath(out)
  check_apart(out, inputs, flag)
  if not is_object_store(out):
    st = _lstat(out)
    if st is not None and stat.S_ISLNK(st.st_mode):
      raise OutputFolderError(f'{flag} {out}: is a symbolic link; give the folder itself '
                              f'({os.path.realpath(out)}).')
    if st is not None and not stat.S_ISDIR(st.st_mode):
      raise OutputFolderError(f'{flag} {out}: exists and is not a folder.')
  if not _listing(out):
    return
  if not overwrite:
    raise OutputFolderError(f'{flag} {out}: folder is not empty; choose another folder or '
                            'pass --overwrite to replace it once the new output is complete.')
  if not owned_by(out, tool, legacy):
    found = read_marker(out)
    whose = f'an output of {found["tool"]}' if found else f'no {MARKER} marker'
    raise OutputFolderError(f'{flag} {out}: --overwrite replaces only an earlier output of '
                            f'{tool}, and this folder holds {whose}; remove it yourself or '
                            'choose another folder.')


def remove_tree(path, tool, legacy=None):
  """Removes the folder `path`, only if it is `tool`'s and not a link; else raises."""
  path = os.fspath(path).rstrip('/')
  if is_object_store(path):
    if not _gfile().exists(path):
      return
    if not owned_by(path, tool, legacy):
      raise OutputFolderError(f'{path}: holds no {MARKER} of {tool}; not removing it.')
    _gfile().rmtree(path)
    return
  st = _lstat(path)
  if st is None:
    return
  if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
    raise OutputFolderError(f'{path}: is {"a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"}; '
                            'not removing it (nor what it points to).')
  if not owned_by(path, tool, legacy):
    raise OutputFolderError(f'{path}: holds no {MARKER} of {tool}; not removing it.')
  if not shutil.rmtree.avoids_symlink_attacks:   # pragma: no cover (Linux has it)
    raise OutputFolderError(f'{path}: this platform cannot remove a tree without following '
                            'links; remove it yourself.')
  shutil.rmtree(path)


def swap_into_place(tmp, out, tool, old, legacy=None):
  """Local folders: the finished `tmp` becomes `out`. An existing `out` (checked by
  check_output before the run) is renamed to `old` first and removed only after, so a
  reader sees the old output or the new one. An empty `out` is simply replaced."""
  if os.path.isdir(out) and not os.path.islink(out):
    os.rename(out, old)
  os.rename(tmp, out)
  st = _lstat(old)
  if st is None:
    return
  if stat.S_ISDIR(st.st_mode) and not os.listdir(old):
    os.rmdir(old)
  else:
    remove_tree(old, tool, legacy)


def remove_stale(pattern, tool, keep=()):
  """Removes the folders matching `pattern` that are `tool`'s (temporaries of earlier
  runs); anything else that matches (a link, a folder without our marker) is left alone
  with a warning. Returns the removed paths."""
  keep = {os.fspath(k).rstrip('/') for k in keep}
  if is_object_store(pattern):
    paths = _gfile().glob(pattern)
  else:   # the folder part literally: '--out exp[1]' must not match 'exp1'
    folder, name = os.path.split(pattern)
    paths = glob.glob(os.path.join(glob.escape(folder), name))
  removed = []
  for path in sorted(p.rstrip('/') for p in paths):
    if path in keep or _in_use(read_marker(path)):
      continue
    try:
      remove_tree(path, tool)
    except OutputFolderError as e:
      logging.warning('%s: leaving it alone: %s', tool, e)
      continue
    removed.append(path)
  return removed


@contextlib.contextmanager
def staged_output(out, tool, overwrite=False, *, inputs=(), legacy=None):
  """Yields a temporary sibling of the local folder `out` to fill; renames it to `out` on
  success (check_output first). A failure leaves `out` as it was (the partial folder is
  removed); with `overwrite`, the old `out` is replaced only once the new one is complete."""
  out = os.path.abspath(out)
  check_output(out, tool, overwrite, inputs=inputs, legacy=legacy)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f'{out}.tmp-{os.getpid()}'
  # Earlier runs' leftovers (a crash): ours and not in use; never a link or another's.
  remove_stale(f'{out}.tmp-*', tool)
  make_staging(tmp, tool)
  try:
    yield tmp
  except BaseException:
    remove_tree(tmp, tool)
    raise
  swap_into_place(tmp, out, tool, f'{out}.old-{os.getpid()}', legacy)
