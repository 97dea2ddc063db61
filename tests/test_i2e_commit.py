"""data_prep/i2e/commit.py: the commit into --out is safe to retry, --overwrite leaves no stale
file, a copy cut short is refused by readers, old temporary folders do not pile up; and the
manifest check of schema.validate_corpus on a corpus that WriteCorpus wrote."""
import json
import os

import pytest
import tensorflow as tf

from data_prep.i2e import commit, kb as kb_lib, write
from mofi_jax import safe_outputs
from mofi_jax.data import schema
from test_i2e_write import ENTITIES, make_pairs, run_write

gfile = tf.io.gfile


def finished(tmp, run_id, num_shards):
  """A finished temporary corpus folder, made as WriteCorpus makes it (our marker first):
  shards, a dead letter file and the manifest."""
  commit.make_temporary_dir(tmp)
  gfile.makedirs(f'{tmp}/dead_letter')
  for i in range(num_shards):
    with gfile.GFile(f'{tmp}/{schema.shard_name(i, num_shards)}', 'w') as f:
      f.write(f'{run_id} shard {i}')
  with gfile.GFile(f'{tmp}/dead_letter/dead_letter-00000-of-00001.jsonl', 'w') as f:
    f.write(run_id)
  with gfile.GFile(f'{tmp}/{schema.META_FILE}', 'w') as f:
    f.write(json.dumps(dict(num_shards=num_shards, commit=commit.manifest(tmp, run_id))))


@pytest.fixture(scope='module')
def kb_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kb'))
  kb_lib.write_small_kb(path, ENTITIES)
  return path


def tree(folder):
  """{relative path: contents} of every file under `folder`."""
  out = {}
  for root, _, names in gfile.walk(folder):
    for n in names:
      with gfile.GFile(f'{root.rstrip("/")}/{n}') as f:
        out[f'{root.rstrip("/")}/{n}'[len(folder) + 1:]] = f.read()
  return out


# The object-store path (copy, manifest last) runs on local folders through tf.io.gfile, the
# API it uses on gs://; TensorFlow's ram:// filesystem appends on overwrite, so it cannot stand in.
@pytest.mark.parametrize('by_copy', [False, True], ids=['rename', 'copy'])
def test_retry_overwrite_and_no_stale_shard(tmp_path, by_copy):
  root = str(tmp_path)
  out = f'{root}/corpus'
  first = commit.temporary_dir(out, 'run1')
  finished(first, 'run1', 3)
  want1 = tree(first)
  commit.commit(first, out, False, 'run1', by_copy)
  assert tree(out) == want1 and not gfile.exists(first)
  commit.commit(first, out, False, 'run1', by_copy)   # the runner retries: done, succeeds
  assert tree(out) == want1 and commit.committed_run(out) == 'run1'

  second = commit.temporary_dir(out, 'run2')
  finished(second, 'run2', 2)
  want2 = tree(second)
  with pytest.raises(commit.OutputExistsError, match='pass --overwrite'):
    commit.commit(second, out, False, 'run2', by_copy)
  assert tree(out) == want1                       # refused: nothing touched
  commit.commit(second, out, True, 'run2', by_copy)
  assert tree(out) == want2                       # 2 shards, none of the 3 of run1
  assert [n.rstrip("/") for n in gfile.listdir(root)] == ["corpus"]   # nothing left beside it


def test_copy_cut_short_is_refused_then_completed_by_a_retry(monkeypatch, tmp_path):
  out = str(tmp_path / 'corpus')
  finished(commit.temporary_dir(out, 'old'), 'old', 3)
  commit.commit(commit.temporary_dir(out, 'old'), out, False, 'old', True)
  tmp = commit.temporary_dir(out, 'new')
  finished(tmp, 'new', 2)
  want = tree(tmp)
  real_copy, calls = gfile.copy, []

  def flaky_copy(src, dst, overwrite=False):
    calls.append(dst)
    if len(calls) == 2:
      raise tf.errors.UnavailableError(None, None, 'connection reset')
    real_copy(src, dst, overwrite=overwrite)
  monkeypatch.setattr(gfile, 'copy', flaky_copy)
  with pytest.raises(tf.errors.UnavailableError):
    commit.commit(tmp, out, True, 'new', True)
  # Half copied: no manifest, so readers refuse the folder instead of mixing two runs.
  assert commit.committed_run(out) is None
  with pytest.raises(schema.CorpusError, match='corpus metadata not found'):
    schema.load_corpus_meta(out)
  monkeypatch.setattr(gfile, 'copy', real_copy)
  commit.commit(tmp, out, True, 'new', True)    # the retry completes it
  assert tree(out) == want


def test_crash_between_the_two_renames_is_retried(tmp_path):
  out = str(tmp_path / 'corpus')
  finished(commit.temporary_dir(out, 'a'), 'a', 1)
  commit.commit(commit.temporary_dir(out, 'a'), out, False, 'a')
  tmp = commit.temporary_dir(out, 'b')
  finished(tmp, 'b', 2)
  want = tree(tmp)
  os.rename(out, f'{out}.old-b')                  # the first rename happened, then a crash
  commit.commit(tmp, out, True, 'b')
  assert tree(out) == want and sorted(os.listdir(tmp_path)) == ['corpus']


def test_stale_temporary_folders_are_removed_at_the_next_run(tmp_path, kb_dir):
  out = str(tmp_path / 'corpus')
  for run in ('dead1', 'dead2'):
    finished(commit.temporary_dir(out, run), run, 1)
  other = commit.temporary_dir(str(tmp_path / 'other'), 'x')
  finished(other, 'x', 1)
  # Planted beside --out by someone who can write to its parent: a link to another
  # folder, and a folder without our marker. Neither is ours to remove.
  victim = tmp_path / 'victim'
  victim.mkdir()
  (victim / 'thesis.tex').write_text('years of work')
  os.symlink(victim, commit.temporary_dir(out, '999'))
  foreign = commit.temporary_dir(out, '888')
  os.makedirs(foreign)
  open(os.path.join(foreign, 'notes.txt'), 'w').close()
  run_write(out, make_pairs(4), kb_dir)
  assert (victim / 'thesis.tex').read_text() == 'years of work'
  assert sorted(os.listdir(tmp_path)) == ['.corpus.tmp-888', '.corpus.tmp-999', '.other.tmp-x',
                                          'corpus', 'victim']   # only its own were removed
  assert os.path.islink(commit.temporary_dir(out, '999'))
  meta, _ = schema.validate_corpus(out)
  assert set(meta['commit']['files']) >= {schema.ENTITIES_FILE, schema.TOKENIZER_FILE} | {
      os.path.basename(p) for p in schema.list_shards(out)}


def test_validate_checks_the_manifest(tmp_path, kb_dir):
  out = str(tmp_path / 'corpus')
  run_write(out, make_pairs(8), kb_dir, num_shards=2)
  schema.validate_corpus(out)
  shards = schema.list_shards(out)
  with open(shards[0], 'ab') as f:
    f.write(b'x')
  with pytest.raises(schema.CorpusError, match=r'00000-of-00002.tfrecord: \d+ bytes, but .*'
                     'commit.files says'):
    schema.validate_corpus(out)
  with open(shards[0], 'rb+') as f:
    f.truncate(os.path.getsize(shards[0]) - 1)
  os.remove(os.path.join(out, write.metadata.FOLDER, os.listdir(os.path.join(
      out, write.metadata.FOLDER))[0]))
  with pytest.raises(schema.CorpusError, match='listed in .* commit.files but missing'):
    schema.validate_corpus(out)


def test_overwrite_replaces_only_an_earlier_corpus(tmp_path):
  out = tmp_path / 'corpus'
  out.mkdir()
  (out / 'precious.txt').write_text('keep me')
  tmp = commit.temporary_dir(str(out), 'r')
  finished(tmp, 'r', 1)
  with pytest.raises(commit.OutputExistsError,
                     match=r'replaces only an earlier output of data_prep.build_i2e.*no '
                     r'\.mofi_jax-output.json marker'):
    commit.commit(tmp, str(out), True, 'r')
  assert os.listdir(out) == ['precious.txt']
  # An earlier output of another of our tools is not a corpus either.
  safe_outputs.write_marker(str(out), 'mofi_jax.export')
  with pytest.raises(commit.OutputExistsError, match='holds an output of mofi_jax.export'):
    commit.check_out_dir(str(out), True)
  # A corpus of an older version (a corpus.json manifest, no marker) is recognised.
  os.remove(out / safe_outputs.MARKER)
  (out / schema.META_FILE).write_text(json.dumps(dict(commit=dict(run_id='old', files={}))))
  commit.commit(tmp, str(out), True, 'r')
  assert commit.committed_run(str(out)) == 'r' and not (out / 'precious.txt').exists()


@pytest.mark.parametrize('where', ['same', 'contains', 'inside'])
def test_out_may_not_overlap_an_input(tmp_path, where):
  kb = tmp_path / 'data' / 'kb'
  kb.mkdir(parents=True)
  (kb / 'kb.json').write_text('{}')
  out = {'same': kb, 'contains': tmp_path / 'data', 'inside': kb / 'corpus'}[where]
  words = {'same': 'is the same folder as', 'contains': 'contains', 'inside': 'lies inside'}
  for overwrite in (False, True):
    with pytest.raises(commit.OutputExistsError, match=f'{words[where]} --kb'):
      commit.check_out_dir(str(out), overwrite, [('--kb', str(kb))])
  pattern = str(tmp_path / 'data' / 'raw' / '{00000..00009}.tar')
  with pytest.raises(commit.OutputExistsError, match='contains --pairs'):
    commit.check_out_dir(str(tmp_path / 'data'), True, [('--pairs', pattern)])
  commit.check_out_dir(str(tmp_path / 'corpus'), False, [('--kb', str(kb)), ('--pairs', pattern)])


def test_a_link_as_out_is_refused(tmp_path):
  (tmp_path / 'real').mkdir()
  os.symlink(tmp_path / 'real', tmp_path / 'out')
  with pytest.raises(commit.OutputExistsError, match='is a symbolic link'):
    commit.check_out_dir(str(tmp_path / 'out'), True)
