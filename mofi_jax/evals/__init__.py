"""Evaluators, chosen by name from the config (`evals.<name>.type`): adding one is adding a module.

A module `mofi_jax.evals.<type>` that defines `Evaluator(cfg, *, image_size)` serves that
type. An Evaluator lists and checks its data in the constructor (so that a bad config fails
at start-up), says with `needs_text` whether it needs a text tower, keeps what it evaluated
on in `info` (a dict), and `run(towers)` (see embedding.Towers) returns a dict of floats.
The same evaluators run inside training (periodic_evals.py) and from the command line
(mofi_jax/evaluate.py). Modules without an Evaluator are the helpers they share.
"""
import importlib
import pkgutil


def known_types():
  """Names of the modules here that define an Evaluator, i.e. the valid `type` values."""
  names = []
  for m in pkgutil.iter_modules(__path__):
    if not m.name.startswith('_') and hasattr(importlib.import_module(f'{__name__}.{m.name}'),
                                              'Evaluator'):
      names.append(m.name)
  return sorted(names)


def get_evaluator(type_name):
  """Imports `mofi_jax.evals.<type_name>` and returns its `Evaluator` class."""
  if type_name not in known_types():
    raise ValueError(f'Unknown evaluator type {type_name!r}; expected one of {known_types()}.')
  return importlib.import_module(f'{__name__}.{type_name}').Evaluator
