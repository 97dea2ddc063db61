"""A per-user cache that no one else can plant files in, keyed by what its files depend on.

Root: $MOFI_JAX_CACHE, else $XDG_CACHE_HOME/mofi_jax, else ~/.cache/mofi_jax. Each folder
is made mode 0700 and must be this user's own real folder (not a link, not writable by
others), so no other user can place or replace a file there, as they could under a fixed
/tmp path. A file's name is a hash of everything its content depends on (weights, entity
table, template, tokenizer; a remote file's path, size and time), so a changed input is a
new file, never a stale one. Files are written to an O_EXCL | O_NOFOLLOW temporary and
renamed into place: a reader sees a whole file or none.

Nothing is ever read from an input folder instead: a model folder you receive cannot
ship "cached" numbers.
"""
import hashlib
import io
import os
import stat

import numpy as np

ENV = 'MOFI_JAX_CACHE'


class CacheError(OSError):
  """The cache folder is not safe to use."""


def root():
  if os.environ.get(ENV):
    return os.path.abspath(os.environ[ENV])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'mofi_jax')


def _private_dir(path):
  """Creates `path` (0700) if needed and checks it is ours, real and private."""
  try:
    os.mkdir(path, 0o700)
  except FileExistsError:
    pass
  st = os.lstat(path)
  if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
    raise CacheError(f'{path}: the cache folder is a link or not a folder; remove it or set '
                     f'${ENV} to a folder of your own.')
  if st.st_uid != os.getuid():
    raise CacheError(f'{path}: the cache folder belongs to another user (uid {st.st_uid}); '
                     f'set ${ENV} to a folder of your own.')
  if st.st_mode & 0o077:
    os.chmod(path, 0o700)
  return path


def folder(kind):
  """The private folder for one kind of cached file ('entity_texts', 'kb', ...)."""
  base = root()
  os.makedirs(os.path.dirname(base), exist_ok=True)
  return _private_dir(os.path.join(_private_dir(base), kind))


def content_key(*parts):
  """sha256 (hex) over `parts`: bytes, str, numbers, NumPy arrays (dtype, shape, bytes),
  or lists/tuples/dicts of these."""
  h = hashlib.sha256()

  def add(x):
    if isinstance(x, (list, tuple)):
      h.update(b'[%d' % len(x))
      for y in x:
        add(y)
    elif isinstance(x, dict):
      add(sorted(x.items()))
    elif isinstance(x, np.ndarray) or hasattr(x, '__array__'):
      a = np.ascontiguousarray(np.asarray(x))
      h.update(f'A{a.dtype.str}{a.shape}'.encode())
      h.update(a.tobytes())
    else:
      data = x if isinstance(x, bytes) else repr(x).encode()
      h.update(b'%d:' % len(data))
      h.update(data)
  add(parts)
  return h.hexdigest()


def _open_existing(path):
  return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), 'rb')


def write_atomic(path, write):
  """Calls write(file) on a fresh private temporary beside `path`, then renames it."""
  tmp = f'{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}'
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise
  return path


def load_array(path):
  """The array cached at `path`, or None (absent, not ours, or not a plain .npy)."""
  try:
    with _open_existing(path) as f:
      if os.fstat(f.fileno()).st_uid != os.getuid():
        return None   # placed before the folder was made private: not ours to trust
      return np.load(io.BytesIO(f.read()), allow_pickle=False)
  except (OSError, ValueError):
    return None


def save_array(path, array):
  return write_atomic(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))
