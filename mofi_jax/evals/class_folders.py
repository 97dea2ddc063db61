"""Labelled images in torchvision's ImageFolder layout: one sub-folder of images per class.

  D/<class>/*.jpg                         no split folders: 'all' is every image, and each
                                          class is cut in two for 'train' (the first half of
                                          its files, sorted by name) and 'test' (the rest)
  D/train/<class>/*.jpg + D/test/<class>/ split folders ('val' or 'validation' also serve
                                          as 'test'); 'all' is both

Classes are the sub-folder names sorted (torchvision's `find_classes`), so class i is the
i-th name in that order in every split; a test class missing from train is an error. Names
for zero-shot: `D/classnames.txt`, one per line in class order (CLIP_benchmark's file),
else the folder names with '_' read as spaces. Image files are .jpg/.jpeg/.png/.bmp/.gif,
any case, at any depth under their class folder; hidden files and folders are skipped, as
are other files (a README, a .txt).
"""
import os

import numpy as np
import tensorflow as tf

DATASET = 'imagefolder'
CLASSNAMES_FILE = 'classnames.txt'
TRAIN_DIRS, TEST_DIRS = ('train',), ('test', 'val', 'validation')
SPLITS = ('all', 'train', 'test')
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


class ClassFolderError(ValueError):
  """A folder that is not in the ImageFolder layout, or a classnames.txt that does not fit."""


def _visible(names):
  return sorted(n for n in names if not n.startswith('.'))


def _class_dirs(folder):
  return [n for n in _visible(tf.io.gfile.listdir(folder))
          if tf.io.gfile.isdir(os.path.join(folder, n))]


def _images_under(folder):
  found = []
  for root, dirs, files in tf.io.gfile.walk(folder):
    dirs[:] = _visible(dirs)
    found += [os.path.join(root, f) for f in _visible(files)
              if f.lower().endswith(_IMAGE_EXTENSIONS)]
  return sorted(found)


def _find(folder, names):
  for name in names:
    if tf.io.gfile.isdir(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def layout(folder):
  """(class names in order, {split: folder or None}) of `folder`; None means 'the whole
  folder, cut in two'."""
  folder = os.fspath(folder)
  if not tf.io.gfile.isdir(folder):
    raise ClassFolderError(f'{folder}: image folder not found.')
  train, test = _find(folder, TRAIN_DIRS), _find(folder, TEST_DIRS)
  if train and test:
    classes = _class_dirs(train)
    unknown = sorted(set(_class_dirs(test)) - set(classes))
    if unknown:
      raise ClassFolderError(f'{test}: classes not in {train}: {unknown[:8]}; every test '
                             'class needs training images.')
    return classes, dict(train=train, test=test)
  classes = _class_dirs(folder)
  if not classes:
    raise ClassFolderError(f'{folder}: no class folders; expected the ImageFolder layout '
                           f'{folder}/<class>/<image>.jpg (or train/ and test/ folders of it).')
  return classes, dict(train=None, test=None)


def list_split(folder, split):
  """(paths, labels int64 [N], class folder names) of `split`, classes in layout()'s order."""
  if split not in SPLITS:
    raise ClassFolderError(f'Unknown split {split!r} of an image folder; expected one of '
                           f'{SPLITS}.')
  classes, splits = layout(folder)
  if splits['train'] is None:
    paths, labels = _cut(folder, classes, split)
  else:
    roots = [splits[split]] if split != 'all' else [splits['train'], splits['test']]
    paths, labels = [], []
    for root in roots:
      for label, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        files = _images_under(class_dir) if tf.io.gfile.isdir(class_dir) else []
        paths += files
        labels += [label] * len(files)
  if not paths:
    raise ClassFolderError(f'{folder}: no images in split {split!r} (extensions '
                           f'{", ".join(_IMAGE_EXTENSIONS)}).')
  return paths, np.asarray(labels, np.int64), classes


def _cut(folder, classes, split):
  """A folder without split folders: each class's sorted files, the first half 'train'."""
  paths, labels = [], []
  for label, name in enumerate(classes):
    files = _images_under(os.path.join(folder, name))
    half = len(files) // 2
    part = dict(all=files, train=files[:half], test=files[half:])[split]
    paths += part
    labels += [label] * len(part)
  return paths, labels


def class_names(folder, classes=None):
  """Zero-shot names of the classes (layout()'s folder names, listed again when not given):
  classnames.txt, else the folder names."""
  classes = layout(folder)[0] if classes is None else classes
  path = os.path.join(os.fspath(folder), CLASSNAMES_FILE)
  if not tf.io.gfile.exists(path):
    return [c.replace('_', ' ') for c in classes]
  with tf.io.gfile.GFile(path, 'rb') as f:
    try:
      lines = f.read().decode('utf-8-sig').splitlines()
    except UnicodeDecodeError as e:
      raise ClassFolderError(f'{path}: not UTF-8 text ({e}).') from e
  names = [line.strip() for line in lines if line.strip()]
  if len(names) != len(classes):
    raise ClassFolderError(f'{path}: {len(names)} names for {len(classes)} class folders '
                           f'({classes[:3]}...); expected one per line, in sorted folder order.')
  return names
