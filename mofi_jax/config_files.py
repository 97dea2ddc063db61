"""Config files, big_vision style, and typed `key=value` overrides: the one loader.

  config = config_files.load('configs/mofi_b16.py:multitask',
                             ['input.batch_size=16384', 'model.remat=dots'], flag='--set ')

A config file is a Python file whose `get_config(arg)` returns a ConfigDict;
'FILE:arg' passes `arg`. An override names an existing entry and is parsed to that
entry's type, so a typo or a wrong type is an error that names the key, never a
silently added field. `flag` is how the command line spells an override ('--set ',
'--config.'), so that every error reads the way the user typed it.
Used by mofi_jax.aot and data_prep.build_i2e; mofi_jax.train parses its flags with
ml_collections' config_flags, which checks types the same way.
"""
import ast
import importlib.util
import os


class ConfigFileError(ValueError):
  """A config file or an override is wrong; the message names the file or the key."""


def load(spec, overrides=(), *, flag=''):
  """get_config(arg) of 'path/to/file.py[:arg]', with `overrides` ('a.b=value') applied."""
  return apply_overrides(load_file(spec), overrides, flag=flag)


def load_file(spec):
  path, _, arg = os.fspath(spec).partition(':')
  if not os.path.isfile(path):
    raise ConfigFileError(f'config file {path!r}: no such file')
  module_spec = importlib.util.spec_from_file_location(
      f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigFileError(f'config file {path}: defines no get_config()')
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (KeyError, ValueError) as e:
    raise ConfigFileError(f'config file {spec}: {e}') from e


def apply_overrides(config, overrides, *, flag=''):
  """Applies 'a.b.c=value' strings in place; returns `config`."""
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep or not key:
      raise ConfigFileError(f'{flag}{item}: expected key=value, e.g. '
                            f'{flag}input.batch_size=4096')
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node:
        raise ConfigFileError(f'{flag}{key}: config has no entry '
                              f'{".".join(parts[:i + 1])!r}')
      if i < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    if hasattr(old, 'keys'):
      raise ConfigFileError(f'{flag}{key}: that is a section, not a value')
    node[parts[-1]] = parse_value(text, old, f'{flag}{key}')
  return config


def parse_value(text, old, name):
  """`text` as a value of the type of the entry's current value `old`.

  bool: true/false/1/0 (any case); int, float (an int is a float); str: the text;
  tuple/list: a Python literal, or comma-separated strings ('/a,/b'); an entry that
  is None: a Python literal, else the text.
  """
  try:
    return _parse(text, old)
  except (ValueError, SyntaxError, TypeError) as e:
    expected = type(old).__name__
    article = 'an' if expected[0] in 'aeiou' else 'a'
    raise ConfigFileError(f'{name}={text!r}: expected {article} {expected}, like the '
                          f'current value {old!r}') from e


def _parse(text, old):
  if isinstance(old, bool):
    if text.lower() not in ('true', 'false', '1', '0'):
      raise ValueError(text)
    return text.lower() in ('true', '1')
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  if isinstance(old, str):
    return text
  if old is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if isinstance(old, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = [t for t in text.split(',') if t]
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (tuple, list)):
      raise ValueError(text)
    return type(old)(value)
  value = ast.literal_eval(text)
  if type(value) is not type(old):  # pylint: disable=unidiomatic-typecheck
    raise TypeError(text)
  return value
