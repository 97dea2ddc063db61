"""Fine-tuning input (data/classification_input.py) and the head's evaluator
(evals/classifier.py): batches carry each image's own class (told by its pixels), one pass
is a permutation of the split, the stream is a function of position (two builds agree,
processes split the images), bad files are skipped and named; the jitted head scores
(Mofi.classify_image) equal a float64 NumPy head on the same features, for linear and
cosine heads."""
import io
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from clu.data import dataset_iterator
from flax import linen as nn
from PIL import Image

from mofi_jax import trainer
from mofi_jax.data import classification_input
from mofi_jax.evals import classifier, embedding
from mofi_jax.models import mofi
from test_trainer import small_config
from test_zeroshot import PALETTE, colour_coded_examples

NUM_CLASSES, PER_CLASS, SIZE = 3, 7, 16


def write_folder(root):
  """root/<class>/<i>.png: class c's images are one flat colour, (80 c + 40) in red."""
  for c in range(NUM_CLASSES):
    (root / f'class_{c}').mkdir(parents=True)
    for i in range(PER_CLASS):
      pixels = np.full((20 + i, 24, 3), (80 * c + 40, 10 * i, 0), np.uint8)
      Image.fromarray(pixels).save(root / f'class_{c}' / f'{i:02d}.png')
  return root


def cfg_input(root, **kw):
  return ml_collections.ConfigDict({**dict(
      dataset='imagefolder', data_dir=str(root), split='all', image_size=SIZE, text_len=5,
      shuffle_buffer=1000, rrc_scale=(0.9, 1.0), max_bad_record_rate=0.5, threads=2), **kw})


def batches(cfg, n, process_index=0, process_count=1, batch=4, seed=0):
  records = classification_input.open_records(cfg)
  ds = classification_input.make_train_dataset(
      records, cfg, process_index=process_index, process_count=process_count,
      per_process_batch=batch, seed=seed)
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def class_of(images):
  """The class each flat-colour image was drawn from (its mean red channel)."""
  return np.rint((images[..., 0].astype(np.float64).mean(axis=(1, 2)) - 40) / 80).astype(int)


def test_batches_carry_each_images_class_and_one_pass_is_a_permutation(tmp_path):
  cfg = cfg_input(write_folder(tmp_path))
  got = batches(cfg, 12)   # 48 examples: 2 passes over 21 images and 6 more
  images = np.concatenate([b['image'] for b in got])
  labels = np.concatenate([b['labels'] for b in got])
  assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(labels[:, 0], class_of(images))
  first_pass = labels[:NUM_CLASSES * PER_CLASS, 0]
  assert np.bincount(first_pass).tolist() == [PER_CLASS] * NUM_CLASSES
  assert not np.array_equal(first_pass, np.sort(first_pass))   # shuffled
  assert (got[0]['label_weights'] == 1).all() and (got[0]['text'] == 0).all()
  again = batches(cfg, 12)
  for a, b in zip(got, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_batches_mix_classes_of_a_class_sorted_folder(tmp_path):
  """A folder lists its images class by class; the first batches must not."""
  cfg = cfg_input(write_folder(tmp_path), shuffle_buffer=2)
  first = np.concatenate([b['labels'][:, 0] for b in batches(cfg, 2)])   # 8 of 21 images
  assert len(set(first.tolist())) == NUM_CLASSES


def test_resumed_iterator_equals_the_uninterrupted_stream(tmp_path):
  cfg = cfg_input(write_folder(tmp_path / 'data'))
  records = classification_input.open_records(cfg)

  def iterator():
    return dataset_iterator.TfDatasetIterator(classification_input.make_train_dataset(
        records, cfg, process_index=0, process_count=1, per_process_batch=4, seed=0),
                                              checkpoint=True)
  before, after = 6, 6   # the checkpoint inside the second pass over the 21 images
  uninterrupted = [next(it) for it in [iterator()] for _ in range(before + after)]
  first = iterator()
  for _ in range(before):
    next(first)
  first.save(tmp_path / 'ckpt')
  resumed = iterator()
  resumed.restore(tmp_path / 'ckpt')
  for step in range(after):
    got, want = next(resumed), uninterrupted[before + step]
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'step {step} {k}')


def test_tfds_split_trains_with_its_labels(tmp_path):
  """A TFDS split (mock CIFAR-10, 30 images coloured by label): every image's label is its
  colour's, one pass holds each image once."""
  (tmp_path / 'placeholder').write_text('')
  cfg = cfg_input(tmp_path, dataset='cifar10', split='train', shuffle_buffer=30)
  with tfds.testing.mock_data(num_examples=30, as_dataset_fn=colour_coded_examples):
    records = classification_input.open_records(cfg)
    got = batches(cfg, 15, batch=2)   # exactly one pass of the 30 images
  assert records.files is None and len(records.class_names) == 10
  images = np.concatenate([b['image'] for b in got]).astype(np.float64)
  labels = np.concatenate([b['labels'][:, 0] for b in got])
  nearest = np.argmin(np.abs(images.mean(axis=(1, 2))[:, None] - np.asarray(PALETTE)[None]).sum(-1),
                      axis=1)
  np.testing.assert_array_equal(labels, nearest)
  assert np.bincount(labels, minlength=10).tolist() == [3] * 10


def test_two_processes_read_disjoint_halves(tmp_path):
  cfg = cfg_input(write_folder(tmp_path))
  seen = []
  for p in range(2):
    images = np.concatenate([b['image'] for b in batches(cfg, 5, p, 2, batch=2)])[:10]
    seen.append({(c, int(img[..., 1].mean().round())) for c, img in
                 zip(class_of(images), images)})
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 20   # of the 21 images (each process reads 10 of its 10/11)


def test_bad_images_are_skipped_and_named(tmp_path, caplog):
  root = write_folder(tmp_path)
  (root / 'class_1' / 'zz_broken.png').write_bytes(b'\x89PNG not really')
  cfg = cfg_input(root)
  with caplog.at_level(logging.WARNING):
    got = batches(cfg, 6)
  labels = np.concatenate([b['labels'] for b in got])[:, 0]
  images = np.concatenate([b['image'] for b in got])
  np.testing.assert_array_equal(labels, class_of(images))
  assert 'zz_broken.png' in caplog.text and 'not a decodable image' in caplog.text


def test_resolve_takes_the_class_count_and_refuses_a_text_tower(tmp_path):
  config = small_config('supervised')
  config.model.head.num_classes = -1
  config.input.update(cfg_input(write_folder(tmp_path)))
  records = classification_input.open_records(config.input)
  assert classification_input.resolve(config, records).model.head.num_classes == NUM_CLASSES
  config.model.head.num_classes = 5
  with pytest.raises(ValueError, match='has 3 classes'):
    classification_input.resolve(config, records)
  config.model.mode = 'multitask'
  with pytest.raises(ValueError, match="mode must be 'supervised'"):
    classification_input.resolve(config, records)


@pytest.mark.parametrize('kind', ['linear', 'cosine'])
def test_classify_image_equals_a_float64_head(kind):
  c = small_config('supervised')
  c.model.head.update(kind=kind, num_classes=11, pad_multiple=16)
  model = mofi.build(c.model)
  batch = trainer.dummy_batch(c, batch_size=1)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros(batch['image'].shape),
                               jnp.ones(batch['text'].shape, jnp.int32))['params'])
  rng = np.random.default_rng(0)
  params['entity_head'] = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params['entity_head'])
  images = rng.normal(size=(5, c.input.image_size, c.input.image_size, 3)).astype(np.float32)
  got = model.apply({'params': params}, images, method=mofi.Mofi.classify_image)
  raw = model.apply({'params': params}, images, method=mofi.Mofi.encode_image)
  head = jax.device_get(params['entity_head'])
  want = embedding.head_logits(raw, head['kernel'][:, :11], head.get('bias', [None] * 11)[:11]
                               if kind == 'linear' else None, kind)
  assert got.shape == (5, 11)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_classifier_evaluator_scores_a_head_on_the_test_split(tmp_path):
  """A 'head' that reads each image's colour scores 1.0; one that swaps two classes
  scores by hand."""
  root = write_folder(tmp_path)
  cfg = ml_collections.ConfigDict(dict(dataset='imagefolder', data_dir=str(root),
                                       test_split='test', batch_size=4))
  evaluator = classifier.Evaluator(cfg, image_size=SIZE)

  def colour_head(images):   # images: CLIP-normalised; red channel mean orders the classes
    red = images[..., 0].mean(axis=(1, 2))
    centres = np.array([(80 * c + 40) / 255 for c in range(NUM_CLASSES)])
    centres = (centres - 0.48145466) / 0.26862954
    return -np.abs(red[:, None] - centres[None])
  right = embedding.Towers(embed_images=None, classify_images=colour_head)
  metrics = evaluator.run(right)
  assert metrics['acc1'] == metrics['mean_per_class_recall'] == 1.0
  assert metrics['num_examples'] == NUM_CLASSES * (PER_CLASS - PER_CLASS // 2)
  swapped = embedding.Towers(embed_images=None,
                             classify_images=lambda x: colour_head(x)[:, [1, 0, 2]])
  assert evaluator.run(swapped)['acc1'] == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match='no head'):
    evaluator.run(embedding.Towers(embed_images=None))
