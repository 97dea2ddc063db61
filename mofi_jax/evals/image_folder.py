"""Labelled image folders in the GPR1200 layout: listing, validation, splits, streaming.

Layout: one file per image named `{category}_{name}.jpg` (also .jpeg/.png), categories
0..R-1, exactly 10 images each; the official GPR1200 benchmark has R = 1,200 (12,000 files).
Files are ordered as the benchmark orders them: by integer category, then by file name, so
row i of any features array has category i // 10.

An optional `categories.json` names the categories (zero-shot needs names): a list whose
entry i is either a string or a dict with "category": i and a name field (the synthetic
demo writes "description", "shape", "color", "background").

Splits, for evaluations that train on part of the folder (kNN, linear probe): 'train' is
the first `train_per_category` images of each category in file order and 'test' the rest;
'all' is every image. File names carry no meaning, so this is a fixed, seedless split.
"""
import json
import os
import re

import numpy as np
import tensorflow as tf
from tqdm import tqdm


IMAGES_PER_CATEGORY = 10
GPR1200_CATEGORIES = 1200
CATEGORIES_FILE = 'categories.json'
SPLITS = ('all', 'train', 'test')
_NAME_RE = re.compile(r'^(\d+)_(.+)\.(jpe?g|png)$', re.IGNORECASE)
_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


class FolderError(ValueError):
  """An image folder is not in the GPR1200 layout, or one of its images is unreadable."""


def _short_list(values, limit=8):
  values = list(values)
  more = f' ... ({len(values)} in all)' if len(values) > limit else ''
  return f'{values[:limit]}{more}'


def list_images(folder, *, official=False):
  """(paths, categories int64 [N]) in the official order; raises FolderError on bad layout.

  official=True also demands the benchmark's size: 1,200 categories, 12,000 images.
  """
  folder = os.fspath(folder)
  if not tf.io.gfile.isdir(folder):
    raise FolderError(f'{folder}: image folder not found.')
  rows, misnamed = [], []
  for name in tf.io.gfile.listdir(folder):
    if not name.lower().endswith(_IMAGE_EXTENSIONS):
      continue  # categories.json, READMEs, ...
    match = _NAME_RE.match(name)
    if match:
      rows.append((int(match.group(1)), name))
    else:
      misnamed.append(name)
  if misnamed:
    raise FolderError(f'{folder}: {len(misnamed)} image file(s) not named '
                      f'{{category}}_{{name}}.jpg with an integer category: '
                      f'{_short_list(sorted(misnamed), 3)}.')
  if not rows:
    raise FolderError(f'{folder}: no images named {{category}}_{{name}}.jpg.')
  rows.sort()
  _check_category_range(folder, rows)
  categories = np.array([c for c, _ in rows], np.int64)
  _check_layout(folder, categories, official)
  return [os.path.join(folder, n) for _, n in rows], categories


def _check_category_range(folder, rows):
  """Categories run 0..R-1 with R <= the number of images: a larger one (a timestamp such as
  20240101123000_photo.png) is refused here, before any array is sized by it."""
  category, name = rows[-1]
  if category >= len(rows):
    raise FolderError(f'{os.path.join(folder, name)}: category {category} in the file name, '
                      f'but the folder has {len(rows)} images (expected categories '
                      f'0..R-1 with {IMAGES_PER_CATEGORY} images each).')


def _check_layout(folder, categories, official):
  """Categories 0..R-1 with 10 images each (and R = 1200 when official)."""
  counts = np.bincount(categories)
  expected_categories = GPR1200_CATEGORIES if official else len(counts)
  problems = []
  if official and len(categories) != GPR1200_CATEGORIES * IMAGES_PER_CATEGORY:
    problems.append(f'{len(categories)} images, expected {GPR1200_CATEGORIES * IMAGES_PER_CATEGORY} '
                    f'({GPR1200_CATEGORIES} categories x {IMAGES_PER_CATEGORY})')
  counts = np.pad(counts, (0, max(0, expected_categories - len(counts))))
  missing = np.flatnonzero(counts[:expected_categories] == 0)
  if missing.size:
    problems.append(f'missing categories {_short_list(missing.tolist())} '
                    f'(expected 0..{expected_categories - 1})')
  extra = np.flatnonzero(counts[expected_categories:]) + expected_categories
  if extra.size:
    problems.append(f'unexpected categories {_short_list(extra.tolist())} '
                    f'(expected 0..{expected_categories - 1})')
  wrong = [c for c in np.flatnonzero(counts) if counts[c] != IMAGES_PER_CATEGORY]
  if wrong:
    problems.append('categories with a wrong number of images (expected '
                    f'{IMAGES_PER_CATEGORY}): ' + ', '.join(
                        f'{c}: {counts[c]}' for c in wrong[:8]) + (
                            f' ... ({len(wrong)} in all)' if len(wrong) > 8 else ''))
  if problems:
    what = 'the official GPR1200 layout' if official else 'GPR1200 layout'
    raise FolderError(f'{folder}: not in {what}: ' + '; '.join(problems) + '.')


def split_indices(categories, split, train_per_category):
  """Indices of `split` ('all' | 'train' | 'test') into the official order."""
  if split not in SPLITS:
    raise FolderError(f'Unknown folder split {split!r}; expected one of {SPLITS}.')
  if split == 'all':
    return np.arange(len(categories))
  if not 0 < train_per_category < IMAGES_PER_CATEGORY:
    raise FolderError(f'train_per_category must be in 1..{IMAGES_PER_CATEGORY - 1}, '
                      f'got {train_per_category}.')
  # Files are sorted by category, 10 per category: the position within the category is i % 10.
  in_train = np.arange(len(categories)) % IMAGES_PER_CATEGORY < train_per_category
  return np.flatnonzero(in_train if split == 'train' else ~in_train)


def class_names(folder, num_categories, name_key='description'):
  """Names of categories 0..R-1 from `categories.json` (see the module docstring)."""
  path = os.path.join(os.fspath(folder), CATEGORIES_FILE)
  if not tf.io.gfile.exists(path):
    raise FolderError(f'{path} not found: zero-shot on an image folder needs category names.')
  try:
    with tf.io.gfile.GFile(path) as f:
      entries = json.load(f)
  except json.JSONDecodeError as e:
    raise FolderError(f'{path}: not valid JSON ({e}).') from e
  if not isinstance(entries, list) or len(entries) != num_categories:
    got = f'a list of {len(entries)}' if isinstance(entries, list) else type(entries).__name__
    raise FolderError(f'{path}: expected a list of {num_categories} category entries, got '
                      f'{got}.')
  names = []
  for i, entry in enumerate(entries):
    if isinstance(entry, dict):
      if entry.get('category', i) != i or not isinstance(entry.get(name_key), str):
        raise FolderError(f'{path}: entry {i} must have "category": {i} and a string '
                          f'{name_key!r}, got {entry}.')
      entry = entry[name_key]
    if not isinstance(entry, str) or not entry.strip():
      raise FolderError(f'{path}: entry {i} has no usable name ({entry!r}).')
    names.append(entry)
  return names


def image_batches(paths, labels, transform, batch_size, *, desc='images'):
  """Yields (images f32 [b, S, S, 3], labels [b]) in order, decoding on the fly.

  Only a few batches are ever decoded at once (tf.data prefetch), so folders of any size
  stream. An unreadable image raises FolderError naming its file.
  """
  ds = tf.data.Dataset.from_tensor_slices((list(paths), np.asarray(labels)))
  ds = ds.map(lambda p, y: (transform(tf.io.read_file(p)), y),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size).prefetch(2)
  start = 0
  with tqdm(total=len(paths), desc=desc, unit='img', disable=None) as bar:
    it = ds.as_numpy_iterator()
    while True:
      try:
        images, batch_labels = next(it)
      except StopIteration:
        return
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise _unreadable(paths[start:], transform, e) from None
      start += len(images)
      bar.update(len(images))
      yield images, batch_labels


def _unreadable(paths, transform, error):
  """The FolderError for the first of `paths` that cannot be read and decoded."""
  for path in paths:
    try:
      transform(tf.io.read_file(path))
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, ValueError) as e:
      # Eagerly, the 'mofi' transform's PIL decoder raises ValueError itself.
      message = getattr(e, 'message', None) or str(e)
      return FolderError(f'{path}: unreadable image ({message.splitlines()[0]}).')
  return FolderError(f'reading images failed ({error.message.splitlines()[0]}).')
