"""Folders laid out like the released MOFI models (an OPT-style tokenizer, no
preprocessor_config.json) against transformers and ml-mofi's own eval recipe:
texts as `tok(texts, padding=True, return_attention_mask=False)` -> get_text_features,
images as get_mofi_transform() -> get_image_features, GPR1200 in ml-mofi's file order."""
import io
import os

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mofi_jax import evaluate, losses
from mofi_jax.evals import gpr1200
from mofi_jax.interop import clip_tokenizer, hf_import
from mofi_jax.models import text as text_lib
from test_interop_hf import save_random_clip
from test_mofi_transform import encoded, torchvision_transform

LINES = ['a photo of a poodle', 'a photo of a husky', 'a photo of a cat',
         'the Eiffel Tower at night', 'Ada Lovelace, English mathematician']
TEXTS = ['a photo of a cat', 'poodle', 'the Eiffel Tower at night, a photo', 'a', 'husky!']
CONTEXT = 40
OPT_SPECIALS = ['<s>', '<pad>', '</s>', '<unk>']   # OPT's ids 0..3
CUSTOM = ('<|bos|>', '<|eos|>', '<|pad|>')         # appended, in this order

# name: (bos, eos, pad) token names, whether the tokenizer appends <eos>, padding side,
# text_config.eos_token_id ('eos' = the eos token's id; 2 selects transformers' argmax rule).
VARIANTS = {
    'custom specials at the end': (CUSTOM, True, 'right', 'eos'),
    'eos_token_id 2 (argmax)': (CUSTOM, True, 'right', 2),
    'no eos, pad is eos': (('<|bos|>', '<|eos|>', '<|eos|>'), False, 'right', 'eos'),
    'left padding': (CUSTOM, True, 'left', 'eos'),
    'OPT ids, eos 2': (('</s>', '</s>', '<pad>'), True, 'right', 2),
}


def opt_style_tokenizer(folder, specials, add_eos, padding_side):
  """A byte-level BPE trained on a few lines with OPT's special tokens first, custom
  ones appended at the end of the vocabulary, saved by transformers."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(LINES * 3, trainer=trainers.BpeTrainer(
      vocab_size=400, special_tokens=OPT_SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens([t for t in CUSTOM if t in specials])
  bos, eos, pad = specials
  template = f'{bos} $A {eos}' if add_eos else f'{bos} $A'
  tok.post_processor = processors.TemplateProcessing(
      single=template, special_tokens=[(t, tok.token_to_id(t)) for t in {bos, eos}])
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
      padding_side=padding_side, model_max_length=CONTEXT)
  hf_tok.save_pretrained(folder)
  return hf_tok


def write_released_folder(folder, variant, seed=0):
  """A random CLIPModel at 224 px with an OPT-style tokenizer and no preprocessor config."""
  specials, add_eos, side, config_eos = VARIANTS[variant]
  hf_tok = opt_style_tokenizer(folder, specials, add_eos, side)
  eos = hf_tok.eos_token_id if config_eos == 'eos' else config_eos
  cfg = transformers.CLIPConfig(
      projection_dim=16,
      text_config=dict(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=CONTEXT, eos_token_id=eos,
                       bos_token_id=hf_tok.bos_token_id, pad_token_id=hf_tok.pad_token_id),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, patch_size=32, image_size=224))
  return save_random_clip(folder, cfg, seed)


def apple_text_features(folder, model, texts):
  """ml-mofi's text recipe (README, zero_shot_cifar100.py), L2-normalised."""
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  ids = tok(texts, return_tensors='pt', padding=True, return_attention_mask=False)['input_ids']
  with torch.no_grad():
    emb = model.get_text_features(input_ids=ids).pooler_output
  return (emb / emb.norm(dim=-1, keepdim=True)).numpy(), ids.numpy()


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def released(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('released') / 'mofi-hf')
  model = write_released_folder(folder, request.param)
  return request.param, folder, model, hf_import.load_encoder(folder)


def test_text_features_equal_ml_mofis_recipe(released):
  variant, folder, model, enc = released
  theirs, ids = apple_text_features(folder, model, TEXTS)
  np.testing.assert_array_equal(enc.tokenize(TEXTS)[:, :ids.shape[1]], ids)
  np.testing.assert_allclose(enc.embed_texts(TEXTS), theirs, atol=1e-5, rtol=0)
  # The variants pool where they should: at the <eos>, or elsewhere by transformers' rule.
  text_cfg = dict(enc.config.model.text)
  pooled = np.asarray(text_lib.eot_positions(ids, text_cfg['pool'], text_cfg.get('eot_id', -1)))
  at_eos = ids[np.arange(len(ids)), pooled] == transformers.AutoTokenizer.from_pretrained(
      folder).eos_token_id
  depends = variant in ('eos_token_id 2 (argmax)', 'no eos, pad is eos', 'left padding')
  assert at_eos.all() == (variant in ('custom specials at the end', 'left padding'))
  assert clip_tokenizer.batch_dependent(enc.tokenize, text_cfg) == depends   # logged at load


def test_single_texts_match_too(released):
  # A batch of one has no padding: where features depend on the batch, this differs
  # from the batch above, in transformers as here.
  _, folder, model, enc = released
  for text in TEXTS[:3]:
    theirs, _ = apple_text_features(folder, model, [text])
    np.testing.assert_allclose(enc.embed_texts([text]), theirs, atol=1e-5, rtol=0)


def test_long_texts_are_cut_to_the_context_keeping_the_eos(tmp_path):
  folder = str(tmp_path / 'mofi-hf')
  write_released_folder(folder, 'custom specials at the end')
  enc = hf_import.load_encoder(folder)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  long_text = ' '.join(LINES * 2)
  assert len(tok(long_text)['input_ids']) > CONTEXT
  ids = enc.tokenize([long_text, 'a'])
  assert ids.shape == (2, CONTEXT) and ids[0, -1] == tok.eos_token_id
  np.testing.assert_array_equal(ids[0, :-1], tok(long_text)['input_ids'][:CONTEXT - 1])


def gpr1200_folder(folder, categories=2, per_category=10):
  """A GPR1200-layout folder ({category}_{name}.jpg) of awkward sizes and modes."""
  os.makedirs(folder)
  shapes = [(301, 457, 'RGB', 'JPEG'), (640, 223, 'RGB', 'PNG'), (100, 151, 'RGB', 'JPEG'),
            (500, 497, 'CMYK', 'JPEG'), (225, 333, 'P', 'PNG')]
  for c in range(categories):
    for i in range(per_category):
      h, w, mode, fmt = shapes[(c + i) % len(shapes)]
      with open(os.path.join(folder, f'{c}_img{i:02d}.jpg'), 'wb') as f:
        f.write(encoded(h, w, mode, fmt, seed=10 * c + i))


def apple_gpr1200_features(model_dir, images_dir):
  """ml-mofi eval/gpr1200.py: files sorted by the integer before the first '_', PIL
  RGB, get_mofi_transform(), get_image_features, L2-normalised. Returns (files, features)."""
  names = sorted(os.listdir(images_dir), key=lambda name: int(name.split('_')[0]))
  model = transformers.AutoModel.from_pretrained(model_dir).eval()
  transform = torchvision_transform()
  out = []
  for name in names:
    img = Image.open(os.path.join(images_dir, name)).convert('RGB')
    with torch.no_grad():
      emb = model.get_image_features(transform(img)[None]).pooler_output
    out.append((emb / emb.norm(dim=-1, keepdim=True)).numpy()[0])
  return names, np.stack(out)


def test_evaluate_gpr1200_on_a_released_folder_embeds_as_ml_mofi_does(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # results go to ./eval_results/<folder>, never into it
  folder, images = str(tmp_path / 'mofi-hf'), str(tmp_path / 'images')
  write_released_folder(folder, 'custom specials at the end', seed=1)
  gpr1200_folder(images)
  assert hf_import.load_encoder(folder).config.input.eval_preprocess == 'mofi'
  features = str(tmp_path / 'features.npy')
  out = evaluate.main(['gpr1200', '--hf_clip', folder, '--images', images,
                       '--save_features', features, '--batch_size', '8'])
  names, theirs = apple_gpr1200_features(folder, images)
  # Within a category ml-mofi keeps listdir's order; ours sorts by name. Align by file.
  ours = dict(zip(sorted(os.listdir(images), key=lambda n: (int(n.split('_')[0]), n)),
                  np.load(features)))
  np.testing.assert_allclose(np.stack([ours[n] for n in names]), theirs, atol=1e-4, rtol=0)
  # The same mAP as the official protocol on ml-mofi's features.
  categories = np.array([int(n.split('_')[0]) for n in names])
  expected = gpr1200.mean_average_precision(theirs, categories)['all']
  assert out['metrics']['map'] == pytest.approx(expected, abs=1e-6)
  assert out['results_file'].startswith(str(tmp_path / 'eval_results' / 'mofi-hf') + '/')
  assert not os.path.exists(os.path.join(folder, 'eval'))


def test_ours_equal_apples_image_features_for_each_image(tmp_path):
  folder = str(tmp_path / 'mofi-hf')
  model = write_released_folder(folder, 'left padding', seed=2)
  enc = hf_import.load_encoder(folder)
  data = [encoded(h, w, seed=s) for s, (h, w) in enumerate([(333, 517), (224, 224), (90, 700)])]
  with torch.no_grad():
    pixels = torch.stack([torchvision_transform()(Image.open(io.BytesIO(d)).convert('RGB'))
                          for d in data])
    theirs = model.get_image_features(pixels).pooler_output.numpy()
  np.testing.assert_allclose(enc.embed_images(enc.preprocess(data)),
                             losses.l2_normalize(theirs), atol=1e-5, rtol=0)


ML_MOFI_CIFAR100_PROMPTS = [   # apple/ml-mofi eval/zero_shot_cifar100.py
    'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
    'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
    'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.',
    'a photo of the {}.', 'a blurry photo of the {}.', 'a black and white photo of the {}.',
    'a low contrast photo of the {}.', 'a high contrast photo of the {}.',
    'a bad photo of the {}.', 'a good photo of the {}.', 'a photo of the small {}.',
    'a photo of the big {}.']


ML_MOFI_CIFAR_LABELS = [   # apple/ml-mofi eval/zero_shot_cifar100.py, in label order
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle',
    'bottle', 'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle',
    'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch',
    'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish', 'forest', 'fox',
    'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
    'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom',
    'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck', 'pine_tree',
    'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road',
    'rocket', 'rose', 'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake',
    'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank',
    'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle',
    'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm']


def apple_cifar100_predictions(folder, images, labels_text=tuple(ML_MOFI_CIFAR_LABELS),
                               batch_size=16):
  """ml-mofi's zero_shot_cifar100.py on uint8 [N, 32, 32, 3] images: argmax classes."""
  model = transformers.AutoModel.from_pretrained(folder).eval()
  texts = [t.format(name.replace('_', ' ')) for name in labels_text
           for t in ML_MOFI_CIFAR100_PROMPTS]
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  emb = []
  for i in range(0, len(texts), batch_size):
    ids = tok(texts[i:i + batch_size], return_tensors='pt', padding=True,
              return_attention_mask=False)['input_ids']
    with torch.no_grad():
      e = model.get_text_features(input_ids=ids).pooler_output
    emb.append(e / e.norm(dim=-1, keepdim=True))
  classes = torch.cat(emb).reshape(len(labels_text), len(ML_MOFI_CIFAR100_PROMPTS), -1).mean(1)
  classes /= classes.norm(dim=-1, keepdim=True)
  pixels = torch.stack([torchvision_transform()(Image.fromarray(x)) for x in images])
  with torch.no_grad():
    logits = model.get_image_features(pixels).pooler_output @ classes.T
  top2 = logits.topk(2, dim=-1).values
  return logits.argmax(-1).numpy(), (top2[:, 0] - top2[:, 1]).numpy()


def test_zeroshot_cifar100_predicts_what_ml_mofis_script_predicts(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  from mofi_jax.evals import templates   # pylint: disable=g-import-not-at-top
  import tensorflow as tf   # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top
  assert list(templates.resolve(None, 'cifar100')) == ML_MOFI_CIFAR100_PROMPTS
  folder = str(tmp_path / 'mofi-hf')
  write_released_folder(folder, 'custom specials at the end', seed=3)
  rng = np.random.default_rng(4)   # solid colours plus noise: images the model tells apart
  candidates = np.clip(rng.integers(0, 256, (40, 1, 1, 3)) + rng.normal(0, 20, (40, 32, 32, 3)),
                       0, 255).astype(np.uint8)
  predicted, margin = apple_cifar100_predictions(folder, candidates)
  keep = np.argsort(-margin)[:12]   # clear winners: no near-ties to flip on rounding
  assert margin[keep].min() > 1e-4
  images, labels = candidates[keep], predicted[keep]

  def examples(self, split, decoders=None, read_config=None, shuffle_files=False, shift=0):
    del self, split, decoders, read_config, shuffle_files
    png = [tf.io.encode_png(x).numpy() for x in images]
    return tf.data.Dataset.from_tensor_slices(
        {'id': [f'x{i}' for i in range(len(png))], 'image': png,
         'label': ((labels + shift) % 100).astype(np.int64),
         'coarse_label': np.zeros(len(png), np.int64)})

  argv = ['zeroshot', '--hf_clip', folder, '--dataset', 'cifar100', '--data_dir', str(tmp_path),
          '--batch_size', '5', '--text_batch_size', '16']
  with tfds.testing.mock_data(as_dataset_fn=examples):
    right = evaluate.main(argv)['metrics']
  with tfds.testing.mock_data(as_dataset_fn=lambda *a, **k: examples(*a, **k, shift=1)):
    wrong = evaluate.main(argv + ['--results_dir', str(tmp_path / 'shifted')])['metrics']
  assert len(set(labels)) > 1   # more than one class predicted
  assert right['top1'] == 1.0 and wrong['top1'] == 0.0 and right['num_examples'] == 12
