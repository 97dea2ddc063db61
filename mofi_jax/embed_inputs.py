"""What `python -m mofi_jax.embed` reads: inputs in one deterministic order, as `Item`s.

  images   a glob of image files (`**` recursive; a plain folder means every image under
           it), sorted by path. Bytes are read only when an item is embedded, so a process
           passes over the other processes' shards without reading their files.
  pairs    img2dataset / WebDataset tars, Parquet or TFRecord files (data_prep's readers,
           data_prep/i2e/read.py), files sorted by path, records in file order. A record
           the reader dead-letters (no image bytes, no caption, a failed download, a file
           that breaks off) is an item with `skip` set: it holds its place in the order.
  tfds     a prepared TFDS dataset (builder.as_dataset on --data_dir, never downloaded),
           in the split's order, images as encoded bytes.

Every item is one input position: shard i holds positions [i * shard_size, (i+1) * shard_size).
Files are the units of work: `Inputs.units` lists them in order and `Inputs.reader` (picklable,
so that a Beam worker can hold it: data_prep/embed_beam.py) gives one unit's items and count.
"""
import dataclasses
import glob
import itertools
import os
from typing import Optional

from mofi_jax import safe_outputs

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.gif', '.bmp')
MAX_FILE_BYTES = 64 << 20   # as data_prep's MAX_IMAGE_BYTES: never read more for one image


class InputError(ValueError):
  """An input flag that matches nothing or cannot be read."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input. image_path: the file (or the record's key); key: its id in the collection;
  data: encoded bytes, or None for a file read when embedded; skip: a reason it cannot be
  embedded, known before decoding; count: the records it stands for (a dead letter may
  stand for a whole unreadable file)."""
  image_path: str
  key: str
  url: Optional[str] = None
  caption: Optional[str] = None
  data: Optional[bytes] = None
  skip: str = ''
  count: int = 1


@dataclasses.dataclass(frozen=True)
class Inputs:
  """units: the input files in order, None for a TFDS split (one stream); reader: one
  unit's items (`reader.items(unit)`) and their number (`reader.count(unit)`); total: the
  number of items, None if unknown before reading; has_captions: whether items carry
  captions; spec: what was asked, for embed_info.json."""
  units: Optional[list]
  reader: object
  total: Optional[int]
  has_captions: bool
  spec: dict

  def items(self):
    """A fresh iterator over every item, in order."""
    if self.units is None:
      return self.reader.items(None)
    return itertools.chain.from_iterable(self.reader.items(u) for u in self.units)


def _matches(pattern, keep):
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, '**', '*')
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and keep(p))
  if not paths:
    raise InputError(f'{pattern}: matches no input file.')
  return [os.path.abspath(p) for p in paths]


class ImageFiles:
  """A unit is one image file: its item, keyed by its path under `root`."""

  def __init__(self, root):
    self.root = root

  def items(self, path):
    yield Item(image_path=path, key=os.path.relpath(path, self.root))

  def count(self, path):  # pylint: disable=unused-argument
    return 1


def image_files(pattern):
  paths = _matches(pattern, lambda p: p.lower().endswith(IMAGE_SUFFIXES))
  reader = ImageFiles(os.path.abspath(safe_outputs.pattern_root(pattern)))
  return Inputs(paths, reader, len(paths), False,
                dict(kind='images', pattern=os.path.abspath(pattern)))


def read_bytes(item):
  """(bytes, '') of an item, or (None, reason): files are read here, at most MAX_FILE_BYTES."""
  if item.data is not None:
    return item.data, ''
  try:
    with open(item.image_path, 'rb') as f:
      data = f.read(MAX_FILE_BYTES + 1)
  except OSError:
    return None, 'unreadable_file'
  return (None, 'file_too_large') if len(data) > MAX_FILE_BYTES else (data, '')


class PairFiles:
  """A unit is one tar, Parquet or TFRecord file of pairs: its records in file order."""

  def __init__(self):
    self._read_fn = None

  def items(self, path):
    from data_prep.i2e import read, types  # pylint: disable=import-outside-toplevel  # Beam
    if self._read_fn is None:
      self._read_fn = read.ReadPairs([path]).read_fn
    try:
      for _, record in self._read_fn.records(path):
        if isinstance(record, types.Pair):
          yield Item(image_path=record.key, key=record.key, url=record.url or None,
                     caption=record.text, data=record.image)
        else:
          yield Item(image_path=record.key, key=record.key, skip=record.reason,
                     count=getattr(record, 'count', 1))
    except Exception:  # pylint: disable=broad-except  # a file that breaks off is data
      yield Item(image_path=path, key=path, skip='unreadable_shard')

  def count(self, path):
    return sum(1 for _ in self.items(path))


def pairs(pattern):
  from data_prep.i2e import read  # pylint: disable=import-outside-toplevel  # Beam
  paths = _matches(pattern, lambda p: read.shard_format(p) is not None)
  return Inputs(paths, PairFiles(), None, True, dict(kind='pairs', pattern=os.path.abspath(pattern)))


def _tfds_keys(name, features):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
  texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text) and (
      'caption' in k or 'text' in k)]   # not a file name
  if not images:
    raise InputError(f'{name}: no Image feature (features: {sorted(features.keys())}).')
  return ('image' if 'image' in images else images[0]), (texts[0] if texts else None)


def tfds_split(name, data_dir, split):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from mofi_jax.evals import datasets  # pylint: disable=import-outside-toplevel
  builder = datasets.tfds_builder(name, data_dir)
  image_key, text_key = _tfds_keys(name, builder.info.features)
  wanted = [image_key] + ([text_key] if text_key else [])
  decoders = tfds.decode.PartialDecoding({k: True for k in wanted},
                                         decoders={image_key: tfds.decode.SkipDecoding()})
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  except (AssertionError, KeyError, ValueError) as e:  # no prepared data, unknown split
    raise InputError(f'{name}: cannot read split {split!r} from {data_dir} '
                     f'({str(e).splitlines()[0] if str(e) else type(e).__name__}).') from e
  total = builder.info.splits[split].num_examples if split in builder.info.splits else None
  spec = dict(kind='tfds', name=name, data_dir=os.path.abspath(data_dir), split=split)
  reader = _TfdsStream(ds, f'{name}/{split}', image_key, text_key)
  return Inputs(None, reader, total or None, text_key is not None, spec)


class _TfdsStream:
  """The split as one stream (not split into units: embed's processes share it by shard)."""

  def __init__(self, ds, prefix, image_key, text_key):
    self.ds, self.prefix, self.image_key, self.text_key = ds, prefix, image_key, text_key

  def items(self, unit):  # pylint: disable=unused-argument
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    for i, ex in enumerate(tfds.as_numpy(self.ds)):
      caption = ex[self.text_key].decode('utf-8', 'replace') if self.text_key else None
      key = f'{self.prefix}/{i}'
      yield Item(image_path=key, key=key, caption=caption, data=bytes(ex[self.image_key]))


def open_inputs(args):
  if args.images:
    return image_files(args.images)
  if args.pairs:
    return pairs(args.pairs)
  return tfds_split(args.tfds, args.data_dir, args.split)
