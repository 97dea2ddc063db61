"""Malformed input files end a command with one line naming the file and field, never a
traceback (issue 31): a table of bad files, each given to its real command or loader.

Most cases call the entry point's main() in-process (its SystemExit carries the line); a
few run `python -m ...` as users do, to check the exit status and that stderr is that one
line. Hypothesis feeds random JSON to the JSON parsers: each must return a well-formed
result or raise its module's error, never another exception.
"""
import json
import os
import subprocess
import sys
import tempfile

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from mofi_jax import cli_errors
from mofi_jax.data import schema
from mofi_jax.evals import image_folder
from mofi_jax.interop import clip_files, clip_tokenizer, hf_import
from mofi_jax.interop.clip_config import InteropError
from test_evaluate import cli_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorFlow's C++ runtime prints these two lines while it loads, before any Python code of
# ours can silence it (TF_CPP_MIN_LOG_LEVEL, which evaluate.py sets, does not cover them).
HARMLESS = ('All log messages before absl::InitializeLog() is called',
            'oneDNN custom operations are on')


def run_command(*argv):
  """(exit status, stderr lines other than HARMLESS ones) of `python -m argv...`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('TF_CPP_MIN_LOG_LEVEL', None)   # conftest sets it; users do not
  proc = subprocess.run([sys.executable, '-m', *argv], cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=300, check=False)
  lines = [l for l in proc.stderr.splitlines()
           if l.strip() and not any(h in l for h in HARMLESS)]
  return proc.returncode, lines, proc.stderr


# ----------------------------------------------------------------------------------------
# The bad files.


def npz_features(tmp_path):
  path = str(tmp_path / 'features.npz')
  np.savez(path, features=np.zeros((12000, 4), np.float32))
  return path


def lying_npy_header(tmp_path):
  """An .npy whose header claims [12000, 2^31] float32 (96 TiB) over 64 bytes of data."""
  path = str(tmp_path / 'features.npy')
  with open(path, 'wb') as f:
    np.lib.format.write_array_header_1_0(
        f, dict(descr='<f4', fortran_order=False, shape=(12000, 2 ** 31)))
    f.write(b'\0' * 64)
  return path


def truncated_npy(tmp_path):
  path = str(tmp_path / 'features.npy')
  np.save(path, np.zeros((12000, 4), np.float32))
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 7)
  return path


def object_npy(tmp_path):
  path = str(tmp_path / 'features.npy')
  np.save(path, np.array([[{'a': 1}]] * 12000, dtype=object), allow_pickle=True)
  return path


def workdir_with_config(tmp_path, text):
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  (workdir / 'config.json').write_text(text)
  return str(workdir)


def timestamp_folder(tmp_path):
  """A 1-category folder plus one image whose 'category' is a timestamp."""
  folder = tmp_path / 'images'
  folder.mkdir()
  for i in range(10):
    (folder / f'0_{i}.jpg').write_bytes(b'not decoded before the layout check')
  (folder / '20240101123000_photo.png').write_bytes(b'')
  return str(folder)


def clip_folder(tmp_path, **files):
  """A HF CLIP folder's config.json (no weights: every case fails before they are read),
  plus `files` ({name: JSON value}) written beside it."""
  import transformers  # pylint: disable=import-outside-toplevel
  folder = tmp_path / 'clip'
  transformers.CLIPConfig(
      projection_dim=16,
      text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=12),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, patch_size=16, image_size=32),
  ).save_pretrained(str(folder))
  for name, value in files.items():
    (folder / name).write_text(json.dumps(value))
  return str(folder)


def string_config_folder(tmp_path):
  folder = tmp_path / 'hf'
  folder.mkdir()
  (folder / 'config.json').write_text('"clip"')
  return str(folder)


GOOD_PREPROCESSOR = dict(do_resize=True, size=dict(shortest_edge=36), do_center_crop=True,
                         crop_size=dict(height=32, width=32), do_rescale=True,
                         rescale_factor=1 / 255, do_normalize=True,
                         image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])


def hf_folder_case(name, content):
  """build(tmp_path) for a --hf_clip folder whose file `name` holds `content` (JSON): the
  gpr1200 command, and that file as the path its error must name."""
  def build(tmp_path):
    folder = clip_folder(tmp_path, **{name: content})
    return ['gpr1200', '--hf_clip', folder, '--images', str(tmp_path)], os.path.join(
        folder, name)
  return build


def preprocessor_case(**changes):
  return hf_folder_case('preprocessor_config.json', dict(GOOD_PREPROCESSOR, **changes))


# name: (build(tmp_path) -> (evaluate argv, the path the line must name), words it must say)
EVALUATE_CASES = {
    'npz features': (lambda t: (['gpr1200', '--features', p := npz_features(t)], p),
                     'not an .npy'),
    'header larger than the file': (
        lambda t: (['gpr1200', '--features', p := lying_npy_header(t)], p), 'got shape'),
    'truncated npy': (lambda t: (['gpr1200', '--features', p := truncated_npy(t)], p),
                      'truncated'),
    'object npy': (lambda t: (['gpr1200', '--features', p := object_npy(t)], p),
                   'real-valued'),
    'timestamp as category': (
        lambda t: (['gpr1200', '--workdir', workdir_with_config(
            t, json.dumps(dict(model={}, input=dict(image_size=32)))),
                    '--images', p := timestamp_folder(t)],
                   os.path.join(p, '20240101123000_photo.png')), 'category 20240101123000'),
    'config.json not JSON': (
        lambda t: (['knn', '--workdir', w := workdir_with_config(t, '{model: 1'),
                    '--dataset', 'folder', '--data_dir', str(t)],
                   os.path.join(w, 'config.json')), 'not valid JSON'),
    'config.json a list': (
        lambda t: (['knn', '--workdir', w := workdir_with_config(t, '[1, 2]'),
                    '--dataset', 'folder', '--data_dir', str(t)],
                   os.path.join(w, 'config.json')), 'expected a JSON object'),
    'config.json without input.image_size': (
        lambda t: (['knn', '--workdir', w := workdir_with_config(
            t, json.dumps(dict(model={}, input=dict(image_size='224')))),
                    '--dataset', 'folder', '--data_dir', str(t)],
                   os.path.join(w, 'config.json')), 'input.image_size'),
    'weight_map a list': (hf_folder_case(
        'model.safetensors.index.json', dict(weight_map=['a.safetensors'])), 'weight_map'),
    'weight_map leaving the folder': (hf_folder_case(
        'model.safetensors.index.json', dict(weight_map={'w': '../../model.safetensors'})),
                                      'inside the folder'),
    'crop_size a string': (preprocessor_case(crop_size='big'), 'crop_size'),
    'shortest_edge null': (preprocessor_case(size=dict(shortest_edge=None)),
                           'size.shortest_edge'),
    'image_std zero': (preprocessor_case(image_std=[0, 0, 0]), 'image_std'),
    'image_mean two channels': (preprocessor_case(image_mean=[0.5, 0.5]), 'image_mean'),
    'do_rescale a string': (preprocessor_case(do_rescale='no'), 'do_rescale'),
    'tokenizer class not allowed': (hf_folder_case(
        'tokenizer_config.json', dict(tokenizer_class='EvilTokenizer')), 'tokenizer_class'),
    'tokenizer custom code': (hf_folder_case('tokenizer_config.json', dict(
        tokenizer_class='CLIPTokenizer',
        auto_map={'AutoTokenizer': ['evil.EvilTokenizer', None]})), 'auto_map'),
    'HF config.json a string': (
        lambda t: (['gpr1200', '--hf_clip', f := string_config_folder(t), '--images', str(t)],
                   os.path.join(f, 'config.json')), 'expected a JSON object'),
}


@pytest.mark.parametrize('case', sorted(EVALUATE_CASES))
def test_evaluate_refuses_bad_files_with_one_line(case, tmp_path):
  build, words = EVALUATE_CASES[case]
  argv, path = build(tmp_path)
  message = cli_error(*argv)   # one line, 'mofi_jax.evaluate: error: ...', a SystemExit
  assert path in message and words in message, message


@pytest.mark.parametrize('build,words', [(npz_features, 'not an .npy'),
                                         (lying_npy_header, 'got shape (12000, 2147483648)')])
def test_the_command_exits_non_zero_with_one_stderr_line(build, words, tmp_path):
  path = build(tmp_path)
  status, lines, stderr = run_command('mofi_jax.evaluate', 'gpr1200', '--features', path)
  assert status != 0 and 'Traceback' not in stderr, stderr
  assert len(lines) == 1 and lines[0].startswith('mofi_jax.evaluate: error: '), stderr
  assert path in lines[0] and words in lines[0], lines


def test_a_corrupt_workdir_config_as_a_command(tmp_path):
  workdir = workdir_with_config(tmp_path, '{"model": {}, "input": {"image_size": 3')
  status, lines, stderr = run_command('mofi_jax.evaluate', 'knn', '--workdir', workdir,
                                      '--dataset', 'folder', '--data_dir', str(tmp_path))
  assert status != 0 and 'Traceback' not in stderr, stderr
  assert len(lines) == 1 and os.path.join(workdir, 'config.json') in lines[0], stderr


def test_hf_tokenizers_load_without_remote_code(tmp_path, monkeypatch):
  import transformers  # pylint: disable=import-outside-toplevel
  calls = []
  monkeypatch.setattr(transformers.AutoTokenizer, 'from_pretrained',
                      lambda *a, **k: calls.append(k) or 'tok')
  folder = clip_folder(tmp_path, **{'tokenizer_config.json': dict(
      tokenizer_class='CLIPTokenizer')})
  assert clip_tokenizer.load_auto_tokenizer(folder) == 'tok'
  assert calls == [dict(trust_remote_code=False)]


# ----------------------------------------------------------------------------------------
# Loaders that a command reaches only after a long run (a corpus, a KB): called directly.


def corpus_meta(**changes):
  meta = dict(schema_version=schema.SCHEMA_VERSION, num_entities=2, num_train_examples=4,
              num_shards=1, text_len=12)
  return {k: v for k, v in dict(meta, **changes).items() if v is not ...}


# name: (corpus.json content, words the error must say)
CORPUS_CASES = {
    'bare string': ('"a corpus"', 'expected a JSON object'),
    'commit a list': (json.dumps(corpus_meta(commit=[])), "'commit' must be an object"),
    'files a list': (json.dumps(corpus_meta(commit=dict(run_id='1', files=['a']))),
                     "'commit.files' must be an object"),
    'files leave the corpus': (json.dumps(corpus_meta(commit=dict(
        run_id='1', files={'../outside.tfrecord': 3}))), "'../outside.tfrecord'"),
    'files absolute': (json.dumps(corpus_meta(commit=dict(
        run_id='1', files={'/etc/passwd': 3}))), "'/etc/passwd'"),
    'size a string': (json.dumps(corpus_meta(commit=dict(files={'a.tfrecord': '3'}))),
                      'non-negative integer'),
    'num_shards a string': (json.dumps(corpus_meta(num_shards='1')), "'num_shards'"),
    'kind a list': (json.dumps(corpus_meta(kind=['i2e'])), "'kind'"),
    'not UTF-8': (b'{"kind": "\xff"}', 'not valid JSON'),
}


@pytest.mark.parametrize('case', sorted(CORPUS_CASES))
def test_corpus_json_is_type_checked(case, tmp_path):
  content, words = CORPUS_CASES[case]
  path = tmp_path / schema.META_FILE
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content)
  with pytest.raises(schema.CorpusError) as error:
    schema.load_corpus_meta(str(tmp_path))
  assert str(path) in str(error.value) and words in str(error.value), error.value


@pytest.mark.parametrize('line,words', [
    ('"Q1"', 'expected a JSON object'),
    ('{"index": "0", "id": "Q1", "name": "a", "description": "", "count": 1}', "'index'"),
    ('{"index": 0, "id": 1, "name": "a", "description": "", "count": 1}', "'id'"),
])
def test_entity_rows_are_type_checked(line, words, tmp_path):
  (tmp_path / schema.ENTITIES_FILE).write_text(line + '\n')
  with pytest.raises(schema.CorpusError, match=words) as error:
    schema.load_entities(str(tmp_path), allow_empty=False)
  assert f'{tmp_path / schema.ENTITIES_FILE}:1' in str(error.value)


@pytest.mark.parametrize('meta,words', [
    ([1], 'expected a JSON object'),
    (dict(entity_files=[], alias_files=[], language='en', index_shards=1,
          index_files=dict(entities=['../x.marisa'], aliases=['a'], surface=['s'])),
     'index_files.entities'),
    (dict(entity_files=[], alias_files=[], language='en', index_shards='1', index_files={}),
     'index_shards'),
])
def test_kb_json_is_type_checked(meta, words, tmp_path):
  from data_prep.i2e import kb  # pylint: disable=import-outside-toplevel
  (tmp_path / kb.KB_FILE).write_text(json.dumps(meta))
  with pytest.raises(kb.KBError, match=words) as error:
    kb.KnowledgeBase.load(str(tmp_path))
  assert str(tmp_path / kb.KB_FILE) in str(error.value)


def test_one_line_names_the_type_where_the_message_would_not():
  assert cli_errors.one_line(KeyError('weight_map')) == "KeyError: 'weight_map'"
  assert cli_errors.one_line(MemoryError()) == 'MemoryError'
  assert cli_errors.one_line(ValueError('f.json: bad\nmore')) == 'f.json: bad'


# ----------------------------------------------------------------------------------------
# Property-based: random JSON never escapes as another exception type.

SETTINGS = hypothesis.settings(max_examples=200, deadline=None, derandomize=True,
                               suppress_health_check=list(hypothesis.HealthCheck))
SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
PATHS = st.sampled_from(['a.tfrecord', 'x/y', '../a', '/abs', 'a/../b', './a', 'a\\b', '',
                         'a//b', '..', 'dead_letter/00000.tfrecord']) | st.text(max_size=10)


def _write(folder, name, value):
  with open(os.path.join(folder, name), 'w', encoding='utf-8') as f:
    json.dump(value, f)


def _some_fields(fields):
  """Objects with some of `fields` (each of any JSON value, or one of its plausible ones),
  or any JSON value at all."""
  return st.fixed_dictionaries({}, optional={k: JSON | v for k, v in fields.items()}) | JSON


CORPUS_FIELDS = dict(
    schema_version=st.just(schema.SCHEMA_VERSION), num_entities=st.integers(-1, 3),
    num_train_examples=st.integers(0, 3), num_shards=st.integers(0, 3),
    text_len=st.integers(0, 3), kind=st.sampled_from(['i2e', 'pairs', 'x']),
    commit=st.fixed_dictionaries({}, optional=dict(
        run_id=JSON, files=st.dictionaries(PATHS, st.integers(-1, 9) | JSON, max_size=3))))


@SETTINGS
@hypothesis.given(meta=_some_fields(CORPUS_FIELDS))
def test_corpus_json_parses_or_raises_corpus_error(meta):
  with tempfile.TemporaryDirectory() as folder:
    _write(folder, schema.META_FILE, meta)
    try:
      loaded = schema.load_corpus_meta(folder)
    except schema.CorpusError as e:
      assert os.path.join(folder, schema.META_FILE) in str(e)
      return
  # Accepted: every field that readers use has its type, and no listed file leaves.
  assert all(type(loaded[k]) is int and loaded[k] >= 0 for k in schema.REQUIRED_META_KEYS)
  assert schema.corpus_kind(loaded) in schema.CORPUS_KINDS
  for rel in loaded.get('commit', {}).get('files', {}):
    resolved = os.path.normpath(os.path.join('/corpus', rel))
    assert resolved.startswith('/corpus/') and os.path.relpath(resolved, '/corpus') == rel


PREPROCESSOR_FIELDS = dict(
    do_rescale=st.booleans(), rescale_factor=st.just(1 / 255), do_center_crop=st.booleans(),
    do_normalize=st.booleans(),
    crop_size=st.sampled_from([32, 33, dict(height=32, width=32), dict(height=32)]),
    size=st.integers(-1, 64) | st.fixed_dictionaries({}, optional=dict(
        shortest_edge=st.integers(-1, 64) | JSON)),
    image_mean=st.lists(st.floats(-2, 2), min_size=2, max_size=4),
    image_std=st.lists(st.floats(-1, 2), min_size=2, max_size=4))


@SETTINGS
@hypothesis.given(cfg=_some_fields(PREPROCESSOR_FIELDS))
def test_preprocessor_config_parses_or_raises_interop_error(cfg):
  with tempfile.TemporaryDirectory() as folder:
    _write(folder, hf_import.PREPROCESSOR_FILE, cfg)
    try:
      images = hf_import._read_preprocessor(folder, 32)  # pylint: disable=protected-access
    except InteropError as e:
      assert os.path.join(folder, hf_import.PREPROCESSOR_FILE) in str(e)
      return
  assert type(images['resize']) is int and images['resize'] > 0
  mean, std = np.asarray(images['mean']), np.asarray(images['std'])
  assert mean.shape == std.shape == (3,) and np.isfinite(mean).all() and (std > 0).all()
  # Folding these into the patch embedding keeps it finite (hf_import.fold_normalization).
  assert np.isfinite(np.float32(0.3 / std)).all() and np.isfinite(np.float32(mean / std)).all()


@SETTINGS
@hypothesis.given(index=_some_fields(dict(weight_map=st.dictionaries(
    st.text(max_size=4), PATHS | st.sampled_from(['model-1.safetensors', '../m.safetensors',
                                                   'm.bin']) | JSON, max_size=3))))
def test_safetensors_index_parses_or_raises_interop_error(index):
  with tempfile.TemporaryDirectory() as folder:
    _write(folder, clip_files.WEIGHTS_INDEX, index)
    try:
      files = clip_files.weight_files(folder)
    except InteropError as e:
      assert os.path.join(folder, clip_files.WEIGHTS_INDEX) in str(e)
      return
  assert files and all(os.path.dirname(f) == folder and f.endswith('.safetensors')
                       for f in files)


@SETTINGS
@hypothesis.given(raw=_some_fields(dict(
    tokenizer_class=st.sampled_from(list(clip_tokenizer.SUPPORTED_TOKENIZERS) + ['Evil']),
    model_max_length=st.integers(-3, 10 ** 40) | st.floats()))
    | st.lists(JSON, max_size=2))
def test_tokenizer_config_checks_raise_interop_error_only(raw):
  with tempfile.TemporaryDirectory() as folder:
    _write(folder, 'tokenizer_config.json', raw)
    try:
      clip_tokenizer.check_tokenizer_config(folder)
    except InteropError as e:
      assert os.path.join(folder, 'tokenizer_config.json') in str(e)
    else:
      assert raw.get('tokenizer_class') in (None,) + clip_tokenizer.SUPPORTED_TOKENIZERS
    length = hf_import._text_len(folder, 12)  # pylint: disable=protected-access
  assert type(length) is int and 1 <= length <= 12


@SETTINGS
@hypothesis.given(entries=st.lists(
    st.text(max_size=5) | st.fixed_dictionaries({}, optional=dict(
        category=st.integers(0, 3) | JSON, description=st.text(max_size=5) | JSON)),
    max_size=4) | JSON)
def test_categories_json_parses_or_raises_folder_error(entries):
  with tempfile.TemporaryDirectory() as folder:
    _write(folder, image_folder.CATEGORIES_FILE, entries)
    try:
      names = image_folder.class_names(folder, 3)
    except image_folder.FolderError as e:
      assert os.path.join(folder, image_folder.CATEGORIES_FILE) in str(e)
      return
  assert len(names) == 3 and all(isinstance(n, str) and n.strip() for n in names)
