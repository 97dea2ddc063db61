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
