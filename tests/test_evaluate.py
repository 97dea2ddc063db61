"""`python -m mofi_jax.evaluate gpr1200 --features F.npy`: JSON out, clear errors."""
import json

import numpy as np
import pytest

from mofi_jax import evaluate
from mofi_jax.evals import gpr1200


def features_file(tmp_path, features):
  path = tmp_path / 'features.npy'
  np.save(path, features)
  return str(path)


def test_perfect_features_score_one_everywhere(tmp_path, capsys):
  # One direction per category (rows in official order: category i // 10),
  # so every query ranks its own 10 images first: AP 1 by hand.
  categories = np.arange(12000) // 10
  feats = np.zeros((12000, 1200), np.float32)
  feats[np.arange(12000), categories] = 1.0
  evaluate.main(['gpr1200', '--features', features_file(tmp_path, feats)])
  printed = json.loads(capsys.readouterr().out)
  assert set(printed) == {'all', 'landmarks', 'inat', 'sketch', 'instre', 'sop', 'faces'}
  assert all(v == pytest.approx(1.0) for v in printed.values())


def test_printed_json_is_the_library_result(tmp_path, capsys):
  feats = np.random.default_rng(0).normal(size=(12000, 8)).astype(np.float32)
  evaluate.main(['gpr1200', '--features', features_file(tmp_path, feats)])
  printed = json.loads(capsys.readouterr().out)
  expected = gpr1200.mean_average_precision(feats, np.arange(12000) // 10)
  assert printed == pytest.approx(expected, abs=1e-12)
  # Random features sit at the exact chance level, not at 1.
  assert printed['all'] == pytest.approx(gpr1200.chance_map(np.arange(12000) // 10), abs=0.01)


@pytest.mark.parametrize('case,expect', [
    ('nan', 'NaN or Inf'), ('shape', 'expected GPR1200 features'), ('missing', 'No such file')])
def test_bad_features_exit_with_one_clear_line(tmp_path, case, expect):
  if case == 'missing':
    path = str(tmp_path / 'nowhere.npy')
  elif case == 'shape':
    path = features_file(tmp_path, np.zeros((100, 8), np.float32))
  else:
    feats = np.random.default_rng(0).normal(size=(12000, 8)).astype(np.float32)
    feats[5, 3] = np.nan
    path = features_file(tmp_path, feats)
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(['gpr1200', '--features', path])
  message = str(exit_info.value.code)
  assert message.startswith('mofi_jax.evaluate: error:')
  assert path in message and expect.lower() in message.lower(), message
