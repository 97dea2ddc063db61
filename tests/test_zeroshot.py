"""Zero-shot classification: CLIP's templates and class names, prompt ensembling, top-k,
and the whole evaluator on TFDS mock data and image folders with known answers."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mofi_jax.data import eval_transform
from mofi_jax.evals import classnames, datasets, embedding, templates, zeroshot

# ----------------------------------------------------------------------------------------
# Templates and class names, as published.


def test_template_sets_are_clips():
  assert (len(templates.IMAGENET), len(templates.CIFAR), len(templates.CALTECH101)) == (80, 18, 34)
  for name, tpl in templates.TEMPLATE_SETS.items():
    assert all(t.count('{}') == 1 for t in tpl) and len(set(tpl)) == len(tpl), name
  # Spot checks against the published lists (first, last and a few in between).
  assert templates.IMAGENET[0] == 'a bad photo of a {}.'
  assert templates.IMAGENET[35] == 'a {} in a video game.'
  assert templates.IMAGENET[-1] == 'a tattoo of the {}.'
  assert templates.CIFAR[0] == 'a photo of a {}.' and templates.CIFAR[-1] == 'a photo of the big {}.'
  assert templates.PETS == ('a photo of a {}, a type of pet.',)
  assert templates.resolve(None, 'cifar100') is templates.CIFAR
  assert templates.resolve(None, 'imagenet_v2/matched-frequency') is templates.IMAGENET
  assert templates.resolve(None, 'oxford_flowers102') is templates.IMAGENET
  assert templates.resolve('itap of a {}.') == ('itap of a {}.',)
  with pytest.raises(ValueError, match=r"Unknown templates 'photo'"):
    templates.resolve('photo')


def test_imagenet_names_follow_the_wordnet_label_order():
  assert len(classnames.IMAGENET) == 1000 and len(classnames.CIFAR100) == 100
  wnids = [f'n{i:08d}' for i in range(1000)]  # stand-ins in label order
  subset = [wnids[0], wnids[409], wnids[999]]  # e.g. a 200-class subset like imagenet_r
  assert classnames.for_dataset('imagenet_r', subset, wnids) == ['tench', 'analog clock',
                                                                 'toilet paper']
  # CIFAR: CLIP's names, whether TFDS knows the names (prepared) or only '0'..'9' (not yet).
  assert classnames.for_dataset('cifar10', [str(i) for i in range(10)])[0] == 'airplane'
  tfds_names = ['apple', 'aquarium_fish'] + list(classnames.CIFAR100[2:])
  assert classnames.for_dataset('cifar100', tfds_names)[1] == 'aquarium fish'
  with pytest.raises(ValueError, match="disagree with CLIP's curated list"):
    classnames.for_dataset('cifar10', list(reversed(classnames.CIFAR10)))
  assert classnames.for_dataset('oxford_iiit_pet', ['Abyssinian', 'american_bulldog']) == [
      'Abyssinian', 'american bulldog']


# ----------------------------------------------------------------------------------------
# Scoring.


def test_class_embeddings_average_normalised_templates():
  rng = np.random.default_rng(0)
  table = {}

  def embed_texts(texts):  # any fixed vector per text, deliberately not unit length
    return np.stack([table.setdefault(t, rng.normal(size=4) * rng.uniform(0.5, 3)) for t in texts])

  names, tpl = ['cat', 'dog', 'cow'], ('a {}.', 'the {}!')
  got = embedding.class_embeddings(embed_texts, names, tpl, batch_size=4)
  for c, name in enumerate(names):
    vecs = np.stack([table[t.format(name)] / np.linalg.norm(table[t.format(name)]) for t in tpl])
    np.testing.assert_allclose(got[c], vecs.mean(0) / np.linalg.norm(vecs.mean(0)), atol=1e-6)
  with pytest.raises(ValueError, match='needs a text tower'):
    embedding.class_embeddings(None, names, tpl)


def test_topk_accuracy_by_hand():
  scores = np.array([[0.1, 0.9, 0.0, 0.5],     # label 1: top-1
                     [0.8, 0.1, 0.7, 0.6],     # label 3: third
                     [0.5, 0.5, 0.2, 0.1],     # label 1 ties label 0, which has the lower index
                     [0.3, 0.3, 0.3, 0.3]])    # label 0 wins the four-way tie
  labels = np.array([1, 3, 1, 0])
  assert zeroshot.topk_accuracy(scores, labels, ks=(1, 2, 3)) == {
      'top1': 0.5, 'top2': 0.75, 'top3': 1.0}
  with pytest.raises(ValueError, match=r'Labels must be in \[0, 4\)'):
    zeroshot.topk_accuracy(scores, np.array([1, 3, 1, 4]))


@pytest.mark.parametrize('num_classes, n', [(4, 9), (12, 200)])
def test_classification_metrics_match_scikit_learn(num_classes, n):
  """CLIP_benchmark's names and its mean per-class recall (scikit-learn's balanced accuracy
  of the top-1 predictions), on unbalanced classes with one class absent."""
  from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(num_classes)
  labels = rng.choice(num_classes - 1, size=n, p=np.arange(1, num_classes) / np.arange(
      1, num_classes).sum())   # class num_classes - 1 never appears
  scores = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  m = zeroshot.classification_metrics(scores, labels, num_classes)
  assert m['mean_per_class_recall'] == pytest.approx(
      balanced_accuracy_score(labels, scores.argmax(1)), abs=1e-12)
  ks = (1, 5) if num_classes > 5 else (1,)
  assert sorted(m) == sorted([f'top{k}' for k in ks] + [f'acc{k}' for k in ks]
                             + ['mean_per_class_recall'])
  for k in ks:
    assert m[f'acc{k}'] == m[f'top{k}'] == pytest.approx(top_k_accuracy_score(
        labels, scores, k=k, labels=np.arange(num_classes)), abs=1e-12)


# ----------------------------------------------------------------------------------------
# End to end on TFDS mock data.

PALETTE = np.array([[i * 25, 255 - i * 20, (i * 97) % 256] for i in range(10)], np.uint8)


def colour_coded_examples(self, split, decoders=None, read_config=None, shuffle_files=False):
  """Mock CIFAR-10 split: 30 images, image i of label i % 10 filled with PALETTE[label]."""
  del self, split, read_config, shuffle_files
  labels = np.arange(30) % 10
  png = [tf.io.encode_png(np.full((32, 32, 3), PALETTE[y], np.uint8)).numpy() for y in labels]
  ds = tf.data.Dataset.from_tensor_slices(
      {'id': [f'x{i}' for i in range(30)], 'image': png, 'label': labels.astype(np.int64)})
  wanted = getattr(decoders, 'decoders', decoders) or {}  # plain or inside PartialDecoding
  if 'image' not in wanted:  # callers that did not ask for encoded images get pixels
    ds = ds.map(lambda ex: dict(ex, image=tf.io.decode_png(ex['image'], channels=3)))
  return ds


def palette_tower(batch):
  """One-hot of the palette colour nearest each image's mean pixel (undoing CLIP's norm)."""
  from mofi_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  rgb = (batch.mean(axis=(1, 2)) * preprocess.CLIP_STD + preprocess.CLIP_MEAN) * 255
  nearest = np.argmin(((rgb[:, None] - PALETTE[None]) ** 2).sum(-1), axis=1)
  return np.eye(10, dtype=np.float32)[nearest]


def prompt_tower(names, tpl, shift=0):
  """Texts -> one-hot of their class (shifted by `shift`); unknown texts raise KeyError,
  so the evaluator must build exactly CLIP's prompts from exactly these names."""
  lookup = {t.format(n): (c + shift) % len(names) for c, n in enumerate(names) for t in tpl}
  return lambda texts: np.eye(len(names), dtype=np.float32)[[lookup[t] for t in texts]]


@pytest.fixture
def data_dir(tmp_path):
  (tmp_path / 'placeholder').write_text('')  # the evaluator insists on a non-empty data_dir
  return str(tmp_path)


def test_zeroshot_on_mock_cifar10_known_answer(data_dir):
  cfg = ml_collections.ConfigDict(dict(dataset='cifar10', data_dir=data_dir, batch_size=8))
  with tfds.testing.mock_data(as_dataset_fn=colour_coded_examples):
    evaluator = zeroshot.Evaluator(cfg, image_size=16)
    assert evaluator.source.class_names == list(classnames.CIFAR10)
    assert evaluator.templates is templates.CIFAR and evaluator.source.split == 'test'
    right = embedding.Towers(palette_tower, prompt_tower(classnames.CIFAR10, templates.CIFAR))
    wrong = embedding.Towers(palette_tower, prompt_tower(classnames.CIFAR10, templates.CIFAR, 1))
    assert evaluator.run(right) == dict(top1=1.0, top5=1.0, acc1=1.0, acc5=1.0,
                                     mean_per_class_recall=1.0, chance_top1=0.1, num_examples=30)
    # Each prompt points at the next class: an image of label y scores 1 for class y - 1 and
    # ties at 0 with every other class, lower indices first, so y ranks y-th (label 0: 1st).
    # Labels 0-4 are within the top 5, labels 5-9 are not.
    assert evaluator.run(wrong) == dict(top1=0.0, top5=0.5, acc1=0.0, acc5=0.5,
                                     mean_per_class_recall=0.0, chance_top1=0.1, num_examples=30)


def test_tfds_source_reads_mock_pets_in_order(data_dir):
  with tfds.testing.mock_data(num_examples=7):
    source = datasets.open_split('oxford_iiit_pet', data_dir)
    batches = list(source.batches(eval_transform.EvalTransform(16), batch_size=3))
    # The mock draws its random examples from the features read, so read the same two.
    only_image_and_label = tfds.decode.PartialDecoding({'image': True, 'label': True})
    expected = [int(ex['label']) for ex in tfds.as_numpy(tfds.load(
        'oxford_iiit_pet', split='test', data_dir=data_dir, decoders=only_image_and_label))]
  assert [len(b[0]) for b in batches] == [3, 3, 1]
  assert batches[0][0].shape == (3, 16, 16, 3) and batches[0][0].dtype == np.float32
  assert np.concatenate([b[1] for b in batches]).tolist() == expected
  assert len(source.class_names) == 37 and source.class_names[1] == 'american bulldog'


def test_imagenet_source_uses_clips_names(data_dir):
  with tfds.testing.mock_data(num_examples=2):
    source = datasets.open_split('imagenet_v2', data_dir)
  assert source.class_names == list(classnames.IMAGENET)


def test_dataset_errors_are_clear(tmp_path, data_dir):
  with pytest.raises(datasets.DatasetError, match=r"Unknown dataset 'imagenet3000'"):
    datasets.open_split('imagenet3000', data_dir)
  with pytest.raises(datasets.DatasetError, match=r'data_dir .*nowhere is missing or empty'):
    datasets.open_split('cifar10', str(tmp_path / 'nowhere'))
  with pytest.raises(datasets.DatasetError, match='no data_dir given'):
    datasets.open_split('cifar10', '')
  with pytest.raises(datasets.DatasetError, match=r'cifar10: no prepared data in .*tfds build'):
    datasets.open_split('cifar10', data_dir)  # not mocked: the data is really not there
  with pytest.raises(datasets.DatasetError, match='not an image classification dataset'):
    datasets.open_split('glue/cola', data_dir)


# ----------------------------------------------------------------------------------------
# End to end on an image folder (the demo's held-out set).


def test_zeroshot_on_a_folder_with_categories_json(tmp_path):
  names = ['red', 'green', 'blue']
  colours = {'red': (255, 0, 0), 'green': (0, 255, 0), 'blue': (0, 0, 255)}
  for c, name in enumerate(names):
    for j in range(10):
      Image.fromarray(np.full((8, 8, 3), colours[name], np.uint8)).save(tmp_path / f'{c}_{j}.png')
  (tmp_path / 'categories.json').write_text(json.dumps(
      [dict(category=c, description=f'a {n} square') for c, n in enumerate(names)]))

  def rgb_tower(batch):
    return batch.mean(axis=(1, 2)) * np.array([1.0, 1.0, 1.0])

  def text_tower(texts):  # 'a red square' -> the normalised red image feature
    probe = np.stack([np.full((2, 2, 3), colours[t.split()[1]], np.uint8) for t in texts])
    from mofi_jax.data import preprocess  # pylint: disable=g-import-not-at-top
    return ((probe / 255.0 - preprocess.CLIP_MEAN) / preprocess.CLIP_STD).mean(axis=(1, 2))

  cfg = ml_collections.ConfigDict(dict(dataset='folder', data_dir=str(tmp_path), split='all',
                                       batch_size=4))
  evaluator = zeroshot.Evaluator(cfg, image_size=8)
  assert evaluator.templates == ('{}',) and evaluator.source.class_names[0] == 'a red square'
  assert evaluator.run(embedding.Towers(rgb_tower, text_tower)) == dict(
      top1=1.0, acc1=1.0, mean_per_class_recall=1.0, chance_top1=1 / 3, num_examples=30)
  (tmp_path / 'categories.json').write_text(json.dumps([{'category': 0}]))
  with pytest.raises(ValueError, match=r'categories.json: expected a list of 3 category entries'):
    zeroshot.Evaluator(cfg, image_size=8)
