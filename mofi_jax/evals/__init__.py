"""Evaluators, chosen by name from the config (`evals.<name>.type`): adding one is adding a module.

A module `mofi_jax.evals.<type>` provides `Evaluator(cfg, **kw)` with `run(embed_fn) -> dict`.
"""
import importlib
import pkgutil


def known_types():
  """Names of the modules in this package, i.e. the valid `type` values."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))


def get_evaluator(type_name):
  """Imports `mofi_jax.evals.<type_name>` and returns its `Evaluator` class."""
  if type_name not in known_types():
    raise ValueError(f'Unknown evaluator type {type_name!r}; expected one of {known_types()}.')
  module = importlib.import_module(f'{__name__}.{type_name}')
  if not hasattr(module, 'Evaluator'):
    raise ValueError(f'{module.__name__} defines no Evaluator class; expected one to serve '
                     f'evaluator type {type_name!r}.')
  return module.Evaluator
