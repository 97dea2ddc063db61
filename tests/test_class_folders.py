"""`--dataset imagefolder` (torchvision's class_name/*.jpg layout) through the evaluate CLI: the
held-out set rearranged into class folders whose sorted order is not the category order,
scored against the same images' features computed independently (test_evaluate.heldout),
with CLIP_benchmark's metric names checked against scikit-learn."""
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from mofi_jax.evals import class_folders, knn
from test_evaluate import (STEP, cli_error, encoder, heldout, loaded_once, run_cli,  # pylint: disable=unused-import
                           tiny_run)


def class_dir(c):
  """Folder names whose sorted order reverses the categories (class i = category R-1-i)."""
  return f'{chr(ord("z") - c)}_class{c}'


def files_by_category(folder, categories):
  files = sorted(f for f in os.listdir(folder) if f.endswith('.jpg'))
  files.sort(key=lambda n: (int(n.split('_')[0]), n))
  return {c: [os.path.join(folder, f) for f, k in zip(files, categories) if k == c]
          for c in sorted(set(categories.tolist()))}


def make_flat(root, heldout_set):
  """root/<class>/[sub/]<file>, plus what a real folder holds besides images."""
  folder, categories, names, _ = heldout_set
  for c, paths in files_by_category(folder, categories).items():
    for i, path in enumerate(paths):
      target = root / class_dir(c) / ('sub' if i % 3 == 0 else '')
      target.mkdir(parents=True, exist_ok=True)
      shutil.copy(path, target / f'IMG_{i:03d}.JPG')
  (root / 'README.txt').write_text('not a class')
  (root / '.ipynb_checkpoints').mkdir()
  (root / class_dir(0) / '.DS_Store').write_bytes(b'\0junk')
  (root / class_dir(0) / 'notes.txt').write_text('not an image')
  order = sorted(range(len(names)), key=class_dir)
  (root / class_folders.CLASSNAMES_FILE).write_text('\n'.join(names[c] for c in order) + '\n')
  return order


def test_zeroshot_on_class_folders_matches_independent_computation(
    tiny_run, encoder, heldout, loaded_once, capsys, tmp_path):
  _, categories, names, features = heldout
  order = make_flat(tmp_path, heldout)
  out = run_cli(capsys, 'zeroshot', '--workdir', tiny_run, '--dataset', 'imagefolder',
                '--data_dir', str(tmp_path), '--split', 'all', '--templates', 'identity')
  class_emb = encoder.embed_texts(names).astype(np.float64)
  predicted = np.argmax(features @ class_emb.T, axis=1)
  m = out['metrics']
  assert m['num_examples'] == len(categories)
  assert m['acc1'] == m['top1'] == pytest.approx(np.mean(predicted == categories), abs=1e-9)
  assert m['mean_per_class_recall'] == pytest.approx(
      balanced_accuracy_score(categories, predicted), abs=1e-9)
  assert os.path.basename(out['results_file']).startswith('zeroshot_imagefolder-')
  assert out['results_file'].endswith(f'_step{STEP}.json')
  # Without classnames.txt the names are the folders', '_' read as a space.
  os.remove(tmp_path / class_folders.CLASSNAMES_FILE)
  assert class_folders.class_names(str(tmp_path)) == [
      class_dir(c).replace('_', ' ') for c in order]


def test_knn_on_train_and_test_folders(tiny_run, heldout, loaded_once, capsys, tmp_path):
  folder, categories, _, features = heldout
  by_category = files_by_category(folder, categories)
  for c, paths in by_category.items():
    for i, path in enumerate(paths):   # images 0-5 train, 6-9 test
      split = 'train' if i < 6 else 'val'
      (tmp_path / split / class_dir(c)).mkdir(parents=True, exist_ok=True)
      shutil.copy(path, tmp_path / split / class_dir(c) / os.path.basename(path))
  out = run_cli(capsys, 'knn', '--workdir', tiny_run, '--dataset', 'imagefolder',
                '--data_dir', str(tmp_path), '--k', '4')
  position = np.concatenate([np.arange(len(p)) for p in by_category.values()])
  train = position < 6
  votes = knn.knn_votes(features[train], categories[train], features[~train], 5, k=4)
  m = out['metrics']
  assert (m['num_train'], m['num_test']) == (train.sum(), (~train).sum())
  assert m['acc1'] == m['top1'] == pytest.approx(
      np.mean(votes.argmax(1) == categories[~train]), abs=1e-9)


def test_folders_that_do_not_fit_are_named(tiny_run, heldout, loaded_once, tmp_path):
  make_flat(tmp_path / 'flat', heldout)
  (tmp_path / 'flat' / class_folders.CLASSNAMES_FILE).write_text('one\ntwo\n')
  message = cli_error('zeroshot', '--workdir', tiny_run, '--dataset', 'imagefolder',
                      '--data_dir', str(tmp_path / 'flat'))
  assert 'classnames.txt: 2 names for 5 class folders' in message
  (tmp_path / 'split' / 'train' / 'a').mkdir(parents=True)
  (tmp_path / 'split' / 'test' / 'b').mkdir(parents=True)
  message = cli_error('knn', '--workdir', tiny_run, '--dataset', 'imagefolder',
                      '--data_dir', str(tmp_path / 'split'))
  assert "classes not in" in message and "['b']" in message
  (tmp_path / 'empty').mkdir()
  message = cli_error('zeroshot', '--workdir', tiny_run, '--dataset', 'imagefolder',
                      '--data_dir', str(tmp_path / 'empty'))
  assert 'no class folders' in message
