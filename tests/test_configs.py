"""Golden snapshots of every shipped config (axlearn-style): a change to a
default shows up as a diff of tests/golden/, reviewed like code.

Regenerate after an intended change:  UPDATE_GOLDENS=1 python -m pytest tests/test_configs.py
"""
import json
import os

import pytest

from configs import demo, mofi_b16, mofi_h14, mofi_l14

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')
CONFIGS = {f'{name}_{mode}': (module, mode)
           for name, module in [('mofi_b16', mofi_b16), ('mofi_l14', mofi_l14),
                                ('mofi_h14', mofi_h14)]
           for mode in ('supervised', 'contrastive', 'multitask')}
CONFIGS['demo_multitask'] = (demo, 'multitask')


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_config_matches_golden(name):
  module, mode = CONFIGS[name]
  got = json.loads(module.get_config(mode).to_json(sort_keys=True))
  path = os.path.join(GOLDEN_DIR, f'{name}.json')
  if os.environ.get('UPDATE_GOLDENS'):
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(got, f, indent=2, sort_keys=True)
      f.write('\n')
  with open(path) as f:
    assert got == json.load(f), f'{name} differs from {path}'


def test_variants_differ_only_in_mode_and_tower_sizes():
  b16 = {m: json.loads(mofi_b16.get_config(m).to_json()) for m in
         ('supervised', 'contrastive', 'multitask')}
  for mode, cfg in b16.items():
    assert cfg['model'].pop('mode') == mode
  assert b16['supervised'] == b16['contrastive'] == b16['multitask']


def test_transfer_config_takes_the_source_tower_or_says_why(tmp_path):
  """configs/transfer.py:SOURCE copies the source run's image tower and input size; the evals
  follow input.dataset/data_dir overrides; a missing or foreign config.json is named."""
  from configs import transfer   # pylint: disable=g-import-not-at-top
  source = demo.get_config('multitask')
  (tmp_path / 'config.json').write_text(source.to_json())
  c = transfer.get_config(str(tmp_path))
  assert c.model.image.to_dict() == source.model.image.to_dict()
  assert (c.model.embed_dim, c.input.image_size) == (source.model.embed_dim,
                                                      source.input.image_size)
  assert (c.model.mode, c.init.workdir, c.init.load) == ('supervised', str(tmp_path), 'image')
  c.input.update(dataset='cifar10', data_dir='/data')
  resolved = c.evals.classifier.copy_and_resolve_references()
  assert (resolved.dataset, resolved.data_dir) == ('cifar10', '/data')
  with pytest.raises(ValueError, match=r'cannot read .*nowhere/config.json'):
    transfer.get_config(str(tmp_path / 'nowhere'))
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
  with pytest.raises(ValueError, match='is not a training config'):
    transfer.get_config(str(tmp_path))
