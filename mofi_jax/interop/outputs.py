"""Output folders that are never half-written and never overwrite good data.

What may be replaced follows mofi_jax/safe_outputs.py: `--overwrite` replaces only an
earlier export (our marker, or the export info file of older exports), never a folder that
overlaps the workdir, never through a link. Imports nothing heavy, so that the export
command refuses a bad --out at once.
"""
import json
import os

from mofi_jax import safe_outputs

TOOL = 'mofi_jax.export'
INFO_FILE = 'export_info.json'   # written by every export; older ones have no marker
OutputFolderError = safe_outputs.OutputFolderError


def _older_export(folder):
  try:
    with open(os.path.join(folder, INFO_FILE), encoding='utf-8') as f:
      return isinstance(json.load(f), dict)
  except (OSError, ValueError):
    return False


def check_output_folder(out, overwrite, inputs=()):
  """Refuses a non-empty `out` unless `overwrite` and an earlier export; an `out` that
  overlaps an input ((flag, path) pairs); a link (before any slow work)."""
  safe_outputs.check_output(out, TOOL, overwrite, inputs=inputs, legacy=_older_export)


def staged_folder(out, overwrite=False, inputs=()):
  """A temporary sibling of `out` to fill, renamed to `out` on success
  (safe_outputs.staged_output)."""
  return safe_outputs.staged_output(out, TOOL, overwrite, inputs=inputs, legacy=_older_export)
