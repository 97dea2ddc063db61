"""Output folders that are never half-written and never overwrite good data.

Imports nothing heavy, so that the export command refuses a bad --out at once.
"""
import contextlib
import os
import shutil


class OutputFolderError(ValueError):
  """--out cannot be written as asked."""


def check_output_folder(out, overwrite):
  """Refuses a non-empty `out` unless `overwrite` (before any slow work)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise OutputFolderError(f'{out}: exists and is not a folder.')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise OutputFolderError(f'{out}: folder is not empty; pass --overwrite to replace it.')


@contextlib.contextmanager
def staged_folder(out, overwrite=False):
  """Yields a temporary sibling of `out` to fill; renames it to `out` on success.

  A failure leaves `out` as it was (the partial folder is removed); with
  `overwrite`, the old `out` is replaced only once the new one is complete.
  """
  out = os.path.abspath(out)
  check_output_folder(out, overwrite)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f'{out}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = f'{out}.old-{os.getpid()}'
  if os.path.isdir(out):
    os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
