"""Labelled image sets for classification evals: TFDS datasets by name, or an image folder.

  source = datasets.open_split('cifar10', data_dir='~/tensorflow_datasets', split='test')
  source = datasets.open_split('folder', data_dir='/corpus/retrieval', split='train')
  source = datasets.open_split('imagefolder', data_dir='/data/pets', split='test')

'folder' is the GPR1200 layout (image_folder.py); 'imagefolder' torchvision's ImageFolder
layout, class_name/*.jpg (class_folders.py).

TFDS datasets are read from `data_dir` and never downloaded: preparing them (`tfds build
NAME --data_dir DIR`, or the manual ImageNet download) is a separate, deliberate step.
Any TFDS dataset with an image feature and a `label` ClassLabel works; class names are
CLIP's curated ones where CLIP published them (classnames.py), else TFDS's.
Images go through the same eval preprocessing as everywhere else (resize the shorter side,
centre crop, CLIP mean/std) from their encoded bytes.
"""
import dataclasses
import os
import re
from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from mofi_jax.evals import class_folders, classnames, image_folder

FOLDER = 'folder'
_WNID = re.compile(r'^n\d{8}$')
# The labelled split CLIP reports on, where it is not 'test'.
_EVAL_SPLITS = {'imagenet2012': 'validation', 'imagenet_sketch': 'test', 'imagenet_a': 'test',
                'imagenet_r': 'test'}


class DatasetError(ValueError):
  """A dataset cannot be opened as asked (unknown name, missing data, no class names)."""


@dataclasses.dataclass
class Source:
  """One split of a labelled image set.

  batches(transform, batch_size) yields (images f32 [b,S,S,3], labels [b]) through a
  eval_transform.EvalTransform.
  """
  name: str
  split: str
  class_names: List[str]
  num_examples: Optional[int]
  batches: Callable
  paths_and_labels: Optional[tuple] = None   # folders: (paths, labels int64 [N])
  tfds_read: Optional[Callable] = None       # TFDS: see Records


def default_split(dataset, purpose='test'):
  if purpose == 'train':
    return 'train'
  if dataset == FOLDER:
    return 'test'
  return _EVAL_SPLITS.get(dataset.split('/')[0], 'test')


def open_split(dataset, data_dir, split=None, *, train_per_category=5, name_key='description',
               need_names=True):
  """The `split` of `dataset` ('folder' or a TFDS name) as a Source."""
  if not dataset:
    raise DatasetError(f'No dataset given: expected a TFDS name, {FOLDER!r} or '
                       f'{class_folders.DATASET!r}.')
  if not data_dir:
    raise DatasetError(f'{dataset}: no data_dir given; pass the folder that holds the data.')
  split = split or default_split(dataset)
  if dataset == FOLDER:
    return _folder_split(data_dir, split, train_per_category, name_key, need_names)
  if dataset == class_folders.DATASET:
    return _class_folder_split(data_dir, split, need_names)
  return _tfds_split(dataset, data_dir, split)


def open_from_config(cfg, split_key, purpose='test', **kw):
  """The split `cfg[split_key]` of `cfg.dataset` in `cfg.data_dir` (default: the dataset's
  usual split for `purpose`, 'train' or 'test'); see `open_split`."""
  dataset = cfg.get('dataset')
  split = cfg.get(split_key) or (default_split(dataset, purpose) if dataset else None)
  return open_split(dataset, cfg.get('data_dir'), split,
                    train_per_category=int(cfg.get('train_per_category', 5)), **kw)


def _folder_split(folder, split, train_per_category, name_key, need_names):
  paths, categories = image_folder.list_images(folder)
  rows = image_folder.split_indices(categories, split, train_per_category)
  num_classes = int(categories.max()) + 1
  names = (image_folder.class_names(folder, num_classes, name_key) if need_names
           else [str(c) for c in range(num_classes)])
  paths, labels = [paths[i] for i in rows], categories[rows]
  desc = f'{os.path.basename(os.path.normpath(folder))}:{split}'

  def batches(transform, batch_size):
    return image_folder.image_batches(paths, labels, transform, batch_size, desc=desc)
  return Source(FOLDER, split, names, len(paths), batches, (paths, labels))


def _class_folder_split(folder, split, need_names):
  paths, labels, classes = class_folders.list_split(folder, split)
  names = class_folders.class_names(folder, classes) if need_names else classes
  desc = f'{os.path.basename(os.path.normpath(folder))}:{split}'

  def batches(transform, batch_size):
    return image_folder.image_batches(paths, labels, transform, batch_size, desc=desc)
  return Source(class_folders.DATASET, split, names, len(paths), batches, (paths, labels))


def tfds_builder(dataset, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(data_dir) or not tf.io.gfile.listdir(data_dir):
    raise DatasetError(f'{dataset}: data_dir {data_dir} is missing or empty; it must hold '
                       f'the prepared TFDS data (tfds build {dataset} --data_dir {data_dir}).')
  try:
    return tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(f'Unknown dataset {dataset!r}: not a TFDS dataset name (e.g. '
                       f'imagenet2012, imagenet_v2, cifar10, cifar100, caltech101, '
                       f'oxford_iiit_pet) nor {FOLDER!r} / {class_folders.DATASET!r}.') from e


def _image_and_label_keys(dataset, features):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  label = features['label'] if 'label' in features.keys() else None
  if not images or not isinstance(label, tfds.features.ClassLabel):
    raise DatasetError(f'{dataset}: not an image classification dataset (expected an Image '
                       f'feature and a ClassLabel "label"; features: {sorted(features.keys())}).')
  return ('image' if 'image' in images else images[0]), 'label'


def _tfds_split(dataset, data_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds_builder(dataset, data_dir)
  image_key, label_key = _image_and_label_keys(dataset, builder.info.features)
  names = builder.info.features[label_key].names
  wnids = None
  if names and all(_WNID.match(n) for n in names):  # ImageNet or a subset: CLIP's names
    wnids = tfds.builder('imagenet2012', data_dir=data_dir).info.features['label'].names
  names = classnames.for_dataset(dataset, names, wnids)
  try:
    num_examples = builder.info.splits[split].num_examples if builder.info.splits else None
  except (KeyError, ValueError) as e:
    raise DatasetError(f'{dataset}: no split {split!r} (splits: {list(builder.info.splits)}).'
                       ) from e
  # Only the image (as encoded bytes) and the label are parsed.
  decoders = tfds.decode.PartialDecoding({image_key: True, label_key: True},
                                         decoders={image_key: tfds.decode.SkipDecoding()})

  def read(split_spec):
    try:  # Opening the files is what tells us the data is there; never download.
      return builder.as_dataset(split=split_spec, shuffle_files=False, decoders=decoders)
    except AssertionError as e:  # TFDS's "could not find data in ..."
      raise DatasetError(f'{dataset}: no prepared data in {data_dir} (looked for '
                         f'{builder.data_dir}); prepare it first with: tfds build {dataset} '
                         f'--data_dir {data_dir}.') from e
  ds = read(split)

  def tfds_read(process_index, process_count):
    part = tfds.even_splits(split, n=process_count)[process_index]
    return read(part).map(lambda ex: (ex[image_key], ex[label_key]))

  def batches(transform, batch_size):
    pipe = ds.map(lambda ex: (transform(ex[image_key]), ex[label_key]),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    pipe = pipe.batch(batch_size).prefetch(2)
    with tqdm(total=num_examples, desc=f'{dataset}:{split}', unit='img', disable=None) as bar:
      for images, labels in pipe.as_numpy_iterator():
        bar.update(len(images))
        yield images, labels
  return Source(dataset, split, names, num_examples, batches, tfds_read=tfds_read)


@dataclasses.dataclass
class Records:
  """One split as encoded images, for training (data/classification_input.py).

  Folders set `files`: (paths, labels int64 [N]) in listing order (sorted by class). TFDS
  sets `tfds_read(process_index, process_count)`: that process's even share of the split
  (tfds.even_splits), a tf.data.Dataset of (encoded image, label) in a fixed order.
  """
  name: str
  split: str
  class_names: List[str]
  num_examples: Optional[int]   # None: TFDS did not record it
  files: Optional[tuple] = None
  tfds_read: Optional[Callable] = None


def open_records(dataset, data_dir, split='train', *, train_per_category=5):
  """The `split` of `dataset` (as in open_split) as Records."""
  source = open_split(dataset, data_dir, split, train_per_category=train_per_category,
                      need_names=False)
  if source.paths_and_labels is None and source.num_examples == 0:
    raise DatasetError(f'{dataset}: split {split!r} has no examples.')
  return Records(dataset, split, source.class_names, source.num_examples,
                 files=source.paths_and_labels, tfds_read=source.tfds_read)


def holdout_indices(labels, fraction, seed=0):
  """(train, val) index arrays: a stratified random `fraction` of each class held out.

  CLIP tunes the probe's L2 strength on a validation split; where a dataset has none it
  holds one out of train. Classes with one example stay in train.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  val = []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    if len(members) > 1:
      val.extend(members[:max(1, int(round(fraction * len(members))))])
  val = np.sort(np.asarray(val, np.int64))
  return np.setdiff1d(np.arange(len(labels)), val), val
