"""Tests for mofi_jax/config_files.py: config files and typed overrides, the one loader that
mofi_jax.aot (--set key=value) and data_prep.build_i2e (--config.key=value) share."""
import textwrap

import pytest

from configs import mofi_b16
from mofi_jax import config_files


def test_overrides_take_the_type_of_the_entry():
  c = config_files.apply_overrides(mofi_b16.get_config('multitask'), [
      'input.batch_size=16384', 'model.remat=dots', 'model.scan=false', 'optim.lr=3',
      'input.rrc_scale=(0.5, 1.0)', 'loss.head_dtype=bfloat16', 'optim.eps=1e-8'])
  assert c.input.batch_size == 16384 and c.model.remat == 'dots'
  assert c.model.scan is False and c.optim.lr == 3.0 and isinstance(c.optim.lr, float)
  assert c.input.rrc_scale == (0.5, 1.0) and c.loss.head_dtype == 'bfloat16'
  assert c.optim.eps == 1e-8


@pytest.mark.parametrize('text, old, expected', [
    ('True', False, True), ('0', True, False), ('7', 1, 7), ('7', 0.5, 7.0),
    ('/a,/b', (), ('/a', '/b')), ("('txt',)", ('x',), ('txt',)), ('jpg', ('x',), ('jpg',)),
    ('[1, 2]', [0], [1, 2]), ('3', None, 3), ('abc', None, 'abc'), ('1e-3', 1.0, 0.001)])
def test_parse_value(text, old, expected):
  got = config_files.parse_value(text, old, 'k')
  assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize('item, message', [
    ('input.batch_size=big', r"^--set input.batch_size='big': expected an int, like the "
                             r"current value \d+$"),
    ('input.batch_size=1.5', 'expected an int'),
    ('model.scan=maybe', 'expected a bool'),
    ('model.no_such=1', r"^--set model.no_such: config has no entry 'model.no_such'$"),
    ('nope.deeper=1', r"config has no entry 'nope'$"),
    ('model=3', r'^--set model: that is a section, not a value$'),
    ('input.batch_size', r'^--set input.batch_size: expected key=value')])
def test_bad_overrides_name_the_key_as_typed(item, message):
  with pytest.raises(config_files.ConfigFileError, match=message):
    config_files.apply_overrides(mofi_b16.get_config('multitask'), [item], flag='--set ')


def test_config_file_with_an_argument_and_its_errors(tmp_path):
  path = tmp_path / 'cfg.py'
  path.write_text(textwrap.dedent('''
      import ml_collections
      def get_config(arg='small'):
        if arg not in ('small', 'big'):
          raise ValueError(f'unknown variant {arg!r}')
        return ml_collections.ConfigDict(dict(width=8 if arg == 'small' else 64, name=arg))
      '''))
  assert config_files.load(str(path)).width == 8
  c = config_files.load(f'{path}:big', ['name=other'], flag='--config.')
  assert (c.width, c.name) == (64, 'other')
  with pytest.raises(config_files.ConfigFileError, match=r"cfg.py:huge: unknown variant 'huge'"):
    config_files.load(f'{path}:huge')
  with pytest.raises(config_files.ConfigFileError, match=r"^--config.width='x': expected an int"):
    config_files.load(str(path), ['width=x'], flag='--config.')
  with pytest.raises(config_files.ConfigFileError, match=r"config file '.*none.py': no such file"):
    config_files.load(str(tmp_path / 'none.py'))
  (tmp_path / 'empty.py').write_text('X = 1\n')
  with pytest.raises(config_files.ConfigFileError, match=r'empty.py: defines no get_config\(\)'):
    config_files.load(str(tmp_path / 'empty.py'))
