"""data_prep/calibrate_select.py: the precision/recall curve against a hand-computed table,
the recomputed choice against select.choose, the written threshold and plot, and one-line
errors for bad labels and corpora."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import calibrate_select
from data_prep.i2e import metadata, select, types
from mofi_jax.data import schema

LINK_WEIGHT = 0.1


def mention(text, ids, link, clip):
  return dict(mention=text, entity_ids=ids, link_scores=link, clip_scores=clip, chosen=0,
              text_bias=[0.0] * len(ids))


# With link_weight 0.1: k1 picks Q167646 (0.35 + 0.05 > 0.30 + 0.09), k5 picks Q312
# (0.20 + 0.09 > 0.22 + 0.02). Kept per threshold, and right against LABELS:
#   0.05: 6 kept, 4 right -> P 4/6, R 4/6      0.20: 3 kept, 2 right -> P 2/3, R 2/6
#   0.12: 5 kept, 4 right -> P 4/5, R 4/6      0.25: 2 kept, 2 right -> P 1,   R 2/6
#   0.15: 4 kept, 3 right -> P 3/4, R 3/6      0.35: 1 kept, 1 right -> P 1,   R 1/6
ROWS = {
    'k1': [mention('Paris', ['Q90', 'Q167646'], [0.9, 0.5], [0.30, 0.35])],
    'k2': [mention('Eiffel Tower', ['Q243'], [0.8], [0.25])],
    'k3': [mention('he', ['Q560'], [0.4], [0.05])],
    'k4': [mention('Tokyo', ['Q1490'], [0.9], [0.15]), mention('Fuji', ['Q39231'], [0.9], [0.12])],
    'k5': [mention('Apple', ['Q312', 'Q89'], [0.9, 0.2], [0.20, 0.22])],
    'k6': [],
}
LABELS = {'k1': ['Q167646'], 'k2': ['Q243'], 'k3': [], 'k4': ['Q1490', 'Q39231'],
          'k5': ['Q89'], 'k6': ['Q5']}
HAND = {0.05: (4 / 6, 4 / 6), 0.12: (4 / 5, 4 / 6), 0.15: (3 / 4, 3 / 6),
        0.20: (2 / 3, 2 / 6), 0.25: (1.0, 2 / 6), 0.35: (1.0, 1 / 6)}


def write_corpus(folder, rows=ROWS, build_threshold=-1.0, select_config=None):
  os.makedirs(folder, exist_ok=True)
  select_config = select_config or dict(link_weight=LINK_WEIGHT, threshold=build_threshold)
  with open(os.path.join(folder, schema.META_FILE), 'w') as f:
    json.dump(dict(i2e_config=dict(select=select_config)), f)
  lines = [json.dumps(dict(key=k, url='', alt_text=k, entity_ids=[], scores=[],
                           mentions=m)).encode() for k, m in sorted(rows.items())]
  metadata.write_shard(metadata.shard_path(folder, 0, 1), lines)
  return folder


def write_labels(path, labels=LABELS, extra_lines=()):
  with open(path, 'w') as f:
    for key, ids in labels.items():
      f.write(json.dumps(dict(key=key, entity_ids=ids)) + '\n')
    for line in extra_lines:
      f.write(line + '\n')
  return path


@pytest.fixture
def inputs(tmp_path):
  return (write_corpus(str(tmp_path / 'corpus')),
          write_labels(str(tmp_path / 'labels.jsonl')), str(tmp_path / 'out'))


def test_curve_equals_the_hand_computed_table(inputs):
  corpus, labels_path, _ = inputs
  labels = calibrate_select.read_labels(labels_path)
  mentions = calibrate_select.read_mentions(corpus, labels)
  chosen = calibrate_select.best_candidates(mentions, LINK_WEIGHT)
  points = calibrate_select.curve(chosen, labels, floor=-1.0)
  got = {round(p['threshold'], 4): (p['precision'], p['recall']) for p in points}
  assert got.keys() == HAND.keys()
  for t, (precision, recall) in HAND.items():
    assert got[t] == pytest.approx((precision, recall)), t
  # The build's threshold cuts the curve: below it the corpus lost pairs.
  assert [round(p['threshold'], 2) for p in calibrate_select.curve(chosen, labels, 0.2)] == [
      0.2, 0.25, 0.35]


@pytest.mark.parametrize('min_precision, step, written', [
    (None, 0.12, 0.1),     # max F1: 0.727 at 0.12; halfway down to 0.05 is 0.085
    (0.9, 0.25, 0.24),     # highest recall at P >= 0.9: 2/6 at 0.25 (and at 0.35: 1/6)
    (0.8, 0.12, 0.1),
])
def test_the_rule_and_the_written_threshold(inputs, capsys, min_precision, step, written):
  corpus, labels_path, out = inputs
  argv = ['--metadata', corpus, '--labels', labels_path, '--out', out]
  argv += ['--min_precision', str(min_precision)] if min_precision else []
  assert calibrate_select.main(argv) == 0
  with open(os.path.join(out, 'select_threshold.json')) as f:
    record = json.load(f)
  assert record['threshold'] == written
  assert (record['precision'], record['recall']) == pytest.approx(HAND[step])
  assert record['flag'] == f'--config.select.threshold={written}'
  printed = capsys.readouterr().out
  assert '<- chosen' in printed and f'--config.select.threshold={written}' in printed
  with Image.open(os.path.join(out, 'select_threshold.png')) as image:
    assert image.format == 'PNG' and image.size[0] > 100


def test_recomputed_choice_equals_select_choose():
  """calibrate's re-decision from stored scores against the pipeline's own select.choose."""
  rng = np.random.default_rng(0)
  for _ in range(50):
    n = int(rng.integers(1, 4))
    m = types.Mention(0, 1, 'm', 'kb')
    cands = [types.Candidate(f'Q{i}', m, float(rng.random())) for i in range(n)]
    clip = rng.normal(0.1, 0.1, n)
    (choice,) = select.choose(cands, clip, threshold=-9, link_weight=LINK_WEIGHT)
    stored = {'k': [(choice.entity_ids, choice.link_scores, choice.clip_scores)]}
    (got,) = calibrate_select.best_candidates(stored, LINK_WEIGHT)['k']
    assert got == (choice.entity_ids[choice.chosen], choice.clip_scores[choice.chosen])


def test_the_default_threshold_is_stated_once():
  from configs import i2e  # pylint: disable=import-outside-toplevel
  assert select.default_threshold() == i2e.get_config().select.threshold


def error_of(argv):
  with pytest.raises(SystemExit) as e:
    calibrate_select.main(argv)
  return str(e.value.code)


@pytest.mark.parametrize('line, words', [
    ('{"entity_ids": ["Q1"]}', ["line 7", "missing field 'key'"]),
    ('{"key": "k9", "entity_ids": "Q1"}', ['line 7', '"entity_ids" must be a list of strings']),
    ('{"key": 5, "entity_ids": []}', ['line 7', '"key" must be a non-empty string']),
    ('{"key": "k1", "entity_ids": []}', ['line 7', "'k1' is labelled twice"]),
    ('not json', ['line 7', 'not JSON']),
    ('{"key": "elsewhere", "entity_ids": []}', ['field "key"', "'elsewhere'", 'not in the']),
])
def test_bad_labels_end_in_one_line_naming_file_and_field(inputs, line, words):
  corpus, labels_path, out = inputs
  write_labels(labels_path, extra_lines=[line])
  message = error_of(['--metadata', corpus, '--labels', labels_path, '--out', out])
  assert message.startswith(f'{calibrate_select.PROG}: error: {labels_path}')
  assert '\n' not in message and all(w in message for w in words), message


def test_bad_corpora_and_flags_end_in_one_line(tmp_path, inputs):
  _, labels_path, out = inputs
  bad = write_corpus(str(tmp_path / 'bad'), select_config=dict(threshold=0.1))
  message = error_of(['--metadata', bad, '--labels', labels_path, '--out', out])
  assert 'corpus.json' in message and 'i2e_config.select.link_weight' in message
  message = error_of(['--metadata', str(tmp_path / 'none'), '--labels', labels_path])
  assert message.startswith(f'{calibrate_select.PROG}: error: ') and 'none' in message
  message = error_of(['--metadata', bad, '--labels', labels_path, '--min_precision', '2'])
  assert '--min_precision must be in (0, 1]' in message
  corpus = write_corpus(str(tmp_path / 'c2'))
  wrong = write_labels(str(tmp_path / 'wrong.jsonl'), labels={'k1': ['Q90']})
  message = error_of(['--metadata', corpus, '--labels', wrong, '--min_precision', '0.5',
                      '--out', out])
  assert 'no threshold reaches it on these labels (the best precision is 0.000)' in message


def test_the_command_line_exits_non_zero_without_a_traceback(tmp_path, inputs):
  corpus, labels_path, _ = inputs
  write_labels(labels_path, extra_lines=['{"key": "k9"}'])
  proc = subprocess.run([sys.executable, '-m', 'data_prep.calibrate_select', '--metadata',
                         corpus, '--labels', labels_path, '--out', str(tmp_path / 'o')],
                        capture_output=True, text=True, check=False,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"{calibrate_select.PROG}: error: {labels_path} line 7: missing field 'entity_ids'")
