"""mofi_jax.interop against transformers' CLIPModel: parameters both ways,
embeddings on random images and texts, training init, refusals and bad input."""
import functools
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import traverse_util
from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers

from mofi_jax import losses, sharding
from mofi_jax.data import preprocess
from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.interop import (clip_config, clip_files, clip_params, clip_tokenizer,
                              hf_export, hf_import)
from mofi_jax.interop.clip_config import InteropError
from mofi_jax.models import mofi

TEXTS = ['a photo of a cat', 'hello world', 'wow!! a dog', '',
         'a very long text about a red moon and a cyan star that will not fit']
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------
# Helpers shared with test_export.py and test_savedmodel.py.


def tiny_config(mode='contrastive', patch=16, image_size=32, width=32, depth=2, heads=4,
                act='gelu', text_act='gelu', vocab_size=300, scan=False, embed_dim=24,
                text_len=12, **image_kw):
  return ml_collections.ConfigDict(dict(
      model=dict(mode=mode, embed_dim=embed_dim,
                 image=dict(variant=None, width=width, depth=depth, num_heads=heads,
                            mlp_dim=2 * width, patch=patch, pool='cls', act=act,
                            ln_pre=True, **image_kw),
                 text=dict(vocab_size=vocab_size, context=text_len, width=32, depth=2,
                           num_heads=4, mlp_dim=64, act=text_act),
                 head=dict(num_classes=20, kind='linear', pad_multiple=64),
                 logit_scale_init=1 / 0.07, logit_scale_max=100.0, dtype='float32',
                 scan=scan, remat='none'),
      input=dict(image_size=image_size, text_len=text_len, max_entities=2, data_dir=''),
      init=dict(hf_clip='')))


def random_params(config, seed=0):
  """Host params with every leaf random (biases and LayerNorms too), so that a
  conversion that confuses or drops any tensor changes the embeddings."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(hf_import.abstract_params(config))
  out = {}
  for path, leaf in flat.items():
    x = 0.1 * rng.standard_normal(leaf.shape)
    out[path] = (x + (1.0 if path[-1] == 'scale' else 0.0)).astype(np.float32)
  out[('log_logit_scale',)] = np.float32(math.log(1 / 0.07))
  return traverse_util.unflatten_dict(out)


@functools.lru_cache(maxsize=None)
def _jitted(model_json, method):
  model = mofi.build(ml_collections.ConfigDict(json.loads(model_json)))
  return jax.jit(lambda p, x: model.apply({'params': p}, x, method=getattr(mofi.Mofi, method)))


def jax_features(config, params, images=None, tokens=None):
  """Unnormalised image / text features of our model."""
  model_json = config.model.to_json()
  if images is not None:
    return np.asarray(_jitted(model_json, 'encode_image')(params, images))
  return np.asarray(_jitted(model_json, 'encode_text')(params, tokens))


def hf_features(model, pixels_nhwc=None, ids=None):
  with torch.no_grad():
    if pixels_nhwc is not None:
      x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
      return model.get_image_features(pixel_values=x).pooler_output.numpy()
    return model.get_text_features(input_ids=torch.as_tensor(ids).long()).pooler_output.numpy()


def random_images(n, size, seed=0):
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def write_clip_folder(folder, config, params, text_ids):
  """A CLIPModel folder (config.json + model.safetensors) of our params."""
  os.makedirs(folder, exist_ok=True)
  cfg = transformers.CLIPConfig(**clip_config.to_clip_config(config, text_ids))
  cfg.to_json_file(os.path.join(folder, 'config.json'))
  clip_files.write_safetensors(os.path.join(folder, 'model.safetensors'),
                               clip_params.to_hf(params, config.model))
  return folder


@pytest.fixture(scope='module')
def corpus_tokenizer():
  return tokenizer_lib.train_bpe(TEXTS * 5, 300)


# ----------------------------------------------------------------------------
# Ours -> HF.


@pytest.mark.parametrize('case', [
    dict(patch=14, image_size=28, width=32, depth=2, act='quick_gelu', scan=True),
    dict(patch=16, image_size=32, width=48, depth=3, heads=6, text_act='quick_gelu',
         act='gelu_pytorch_tanh', embed_dim=16),   # big_vision's tanh GELU
])
def test_ours_to_hf_embeddings_match_and_round_trip_is_identity(case, corpus_tokenizer):
  tok = corpus_tokenizer
  config = tiny_config(vocab_size=tok.get_vocab_size(), **case)
  params = random_params(config, seed=1)
  ids = clip_tokenizer.plan_text_ids(dict(config.model.text), tok, tok.get_vocab_size())
  assert ids.swap == (tokenizer_lib.eot_id(tok), tok.get_vocab_size() - 1)
  tensors = clip_params.swap_token_rows(clip_params.to_hf(params, config.model), ids.swap)
  hf = transformers.CLIPModel(transformers.CLIPConfig(
      **clip_config.to_clip_config(config, ids.hf_config_ids()))).eval()
  result = hf.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys

  images = random_images(3, config.input.image_size)
  ours_img, theirs_img = jax_features(config, params, images), hf_features(hf, images)
  np.testing.assert_allclose(theirs_img, ours_img, atol=1e-4, rtol=0)
  np.testing.assert_allclose(losses.l2_normalize(theirs_img), losses.l2_normalize(ours_img),
                             atol=1e-5, rtol=0)
  tokens = tokenizer_lib.tokenize(tok, TEXTS, config.input.text_len)
  a, b = ids.swap
  hf_ids = np.where(tokens == a, b, np.where(tokens == b, a, tokens))
  swapped = clip_tokenizer.swapped_tokenizer(tok, ids.swap).encode(TEXTS[0]).ids
  assert hf_ids[0, :len(swapped)].tolist() == swapped
  ours_txt, theirs_txt = jax_features(config, params, tokens=tokens), hf_features(hf, ids=hf_ids)
  np.testing.assert_allclose(theirs_txt, ours_txt, atol=1e-4, rtol=0)
  # Different texts give different embeddings (the comparison is not vacuous).
  assert np.abs(ours_txt[0] - ours_txt[1]).max() > 1e-2

  back = clip_params.from_hf(clip_params.to_hf(params, config.model), config.model,
                             hf_import.abstract_params(config))
  flat, flat_back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(back)
  assert set(flat_back) == {p for p in flat if p[0] != 'entity_head'}
  for path, x in flat_back.items():
    np.testing.assert_array_equal(x, flat[path], err_msg='/'.join(path))


@pytest.mark.parametrize('option,value,message', [
    ('pool', 'gap', "config.model.image.pool='gap'"),
    ('ln_pre', False, 'config.model.image.ln_pre=False'),
    ('act', 'relu', "config.model.image.act='relu'"),
])
def test_export_refuses_what_clip_cannot_express(option, value, message):
  config = tiny_config()
  config.model.image[option] = value
  with pytest.raises(InteropError, match=message.replace('(', r'\(')):
    clip_config.check_exportable(config)


def test_export_refuses_a_model_without_text_tower():
  with pytest.raises(InteropError, match="mode='supervised'.*needs a text tower"):
    clip_config.check_exportable(tiny_config(mode='supervised'))


# ----------------------------------------------------------------------------
# HF folder -> ours.


def clip_style_tokenizer(folder):
  """A tiny tokenizer built like OpenAI CLIP's (ids 0.. are real byte tokens such
  as '!', <|startoftext|> and <|endoftext|> last), saved by transformers."""
  tok = tokenizers.Tokenizer(models.BPE(end_of_word_suffix='</w>'))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior='removed',
                           invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, end_of_word_suffix='</w>',
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 5, trainer=trainer)
  spec = json.loads(tok.to_str())
  vocab = dict(spec['model']['vocab'])
  vocab.update({'<|startoftext|>': len(vocab), '<|endoftext|>': len(vocab) + 1})
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in spec['model']['merges']]
  hf_tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=12)
  hf_tok.save_pretrained(folder)
  return hf_tok


def save_random_clip(folder, cfg, seed):
  """A transformers CLIPModel of `cfg` with every tensor random, saved to `folder`."""
  torch.manual_seed(seed)
  model = transformers.CLIPModel(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():   # biases and LayerNorms start at 0 and 1: move them
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def write_hf_folder(folder, legacy_eos, mean, std, patch, image_size, width, act, seed=0,
                    projection_dim=16):
  """A random transformers CLIPModel saved like a hub folder, and the model."""
  hf_tok = clip_style_tokenizer(folder)
  vocab = len(hf_tok)
  eos = 2 if legacy_eos else hf_tok.eos_token_id
  cfg = transformers.CLIPConfig(
      projection_dim=projection_dim, logit_scale_init_value=2.0,
      text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                       hidden_act=act, eos_token_id=eos, bos_token_id=0 if legacy_eos else
                       hf_tok.bos_token_id, pad_token_id=1),
      vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, patch_size=patch, image_size=image_size,
                         hidden_act=act))
  model = save_random_clip(folder, cfg, seed)
  with open(os.path.join(folder, 'preprocessor_config.json'), 'w') as f:
    json.dump(dict(image_processor_type='CLIPImageProcessor', do_resize=True,
                   size=dict(shortest_edge=image_size + 4), do_center_crop=True,
                   crop_size=dict(height=image_size, width=image_size), do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean),
                   image_std=list(std)), f)
  return model, hf_tok


@pytest.mark.parametrize('legacy_eos,mean,std,patch,size,width,act', [
    (True, preprocess.CLIP_MEAN, preprocess.CLIP_STD, 14, 28, 32, 'quick_gelu'),
    (False, IMAGENET_MEAN, IMAGENET_STD, 16, 32, 48, 'gelu'),
])
def test_hf_folder_loads_as_an_encoder_matching_transformers(
    tmp_path, legacy_eos, mean, std, patch, size, width, act):
  folder = str(tmp_path / 'clip')
  hf, hf_tok = write_hf_folder(folder, legacy_eos, mean, std, patch, size, width, act)
  enc = hf_import.load_encoder(folder)
  text_cfg = dict(enc.config.model.text)
  assert text_cfg['pool'] == ('max_id' if legacy_eos else 'first_eot')
  assert enc.config.input.eval_resize == size + 4
  # Raw pixels in [0, 1]: HF normalises with the folder's mean/std, ours with CLIP's.
  raw = np.random.default_rng(2).uniform(size=(3, size, size, 3)).astype(np.float32)
  theirs = hf_features(hf, (raw - np.float32(mean)) / np.float32(std))
  ours_in = (raw - np.float32(preprocess.CLIP_MEAN)) / np.float32(preprocess.CLIP_STD)
  np.testing.assert_allclose(jax_features(enc.config, enc.params, ours_in), theirs,
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(enc.embed_images(ours_in), losses.l2_normalize(theirs),
                             atol=1e-5, rtol=0)

  texts = TEXTS + ['oh!?']   # '!' unmerged: id 0, a real token, not padding
  hf_ids = hf_tok(texts, padding='max_length', max_length=12, truncation=True)['input_ids']
  assert 0 in np.asarray(hf_ids)
  np.testing.assert_array_equal(enc.tokenize(texts), hf_ids)
  np.testing.assert_allclose(enc.embed_texts(texts),
                             losses.l2_normalize(hf_features(hf, ids=hf_ids)), atol=1e-5, rtol=0)
  assert enc.logit_scale() == pytest.approx(float(hf.logit_scale.detach().exp()), rel=1e-6)

  # And back out (HF -> ours -> HF): the same model, taking CLIP-normalised pixels.
  again = transformers.AutoModel.from_pretrained(
      hf_export.export_hf(enc, str(tmp_path / 'again'))).eval()
  np.testing.assert_allclose(hf_features(again, ours_in), theirs, atol=1e-4, rtol=0)
  np.testing.assert_allclose(hf_features(again, ids=hf_ids), hf_features(hf, ids=hf_ids),
                             atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Training init from a folder.


def sharded(config, params):
  boxed = jax.eval_shape(mofi.build(config.model).init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, config.input.image_size,
                                               config.input.image_size, 3), np.float32),
                         jax.ShapeDtypeStruct((1, config.input.text_len), np.int32))['params']
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1)))
  return jax.device_put(params, sharding.tree_shardings(mesh, nn.get_partition_spec(boxed)))


def test_init_from_hf_clip_replaces_towers_keeps_head_and_sharding(tmp_path):
  config = tiny_config(mode='multitask', scan=True)
  source = random_params(config, seed=3)
  folder = write_clip_folder(str(tmp_path / 'clip'), config, source,
                             dict(bos_token_id=1, eos_token_id=299, pad_token_id=0))
  fresh = sharded(config, random_params(config, seed=4))
  config.init.hf_clip = folder
  out = hf_import.init_from_hf_clip(fresh, config)
  flat_out, flat_fresh = traverse_util.flatten_dict(out), traverse_util.flatten_dict(fresh)
  flat_src = traverse_util.flatten_dict(source)
  assert set(flat_out) == set(flat_fresh)
  for path, x in flat_out.items():
    assert x.sharding == flat_fresh[path].sharding, path
    want = flat_fresh[path] if path[0] == 'entity_head' else flat_src[path]
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want), err_msg='/'.join(path))


@pytest.mark.parametrize('change,message', [
    (dict(image_size=48), 'vision_model.embeddings.position_embedding.weight has shape '
     r'\(5, 32\), but the model expects \(10, 32\)'),
    (dict(embed_dim=16), r'visual_projection.weight has shape \(24, 32\), but the model '
     r'expects \(16, 32\)'),
    (dict(heads=8), r"image tower num_heads=4 in the folder, but config.model.image.num_heads=8"),
    (dict(act='quick_gelu'), "image tower act='gelu' in the folder, but "
     "config.model.image.act='quick_gelu'"),
])
def test_init_refuses_a_folder_of_another_architecture(tmp_path, change, message):
  config = tiny_config(mode='multitask')
  folder = write_clip_folder(str(tmp_path / 'clip'), config, random_params(config),
                             dict(bos_token_id=1, eos_token_id=299, pad_token_id=0))
  other = tiny_config(mode='multitask', **change)
  with pytest.raises(InteropError, match=message):
    hf_import.init_from_hf_clip(hf_import.abstract_params(other), other, folder)


# ----------------------------------------------------------------------------
# Bad input.


@pytest.fixture(scope='module')
def good_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('hf') / 'clip')
  write_hf_folder(folder, True, preprocess.CLIP_MEAN, preprocess.CLIP_STD, 16, 32, 32, 'gelu')
  return folder


def _edit_config(folder, **changes):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, 'w') as f:
    json.dump(cfg, f)


def _edit_text_config(folder, **changes):
  with open(os.path.join(folder, 'config.json')) as f:
    text_config = json.load(f)['text_config']
  _edit_config(folder, text_config={**text_config, **changes})


def _rewrite_weights(folder, edit):
  path = os.path.join(folder, 'model.safetensors')
  tensors, _ = clip_files.read_safetensors(path)
  edit(tensors)
  clip_files.write_safetensors(path, tensors)


class _Marker:
  """Unpickling this creates a file: evidence that a pickle was loaded."""
  path = ''

  def __reduce__(self):
    return (open, (self.path, 'w'))


def _pickle_only(folder):
  os.remove(os.path.join(folder, 'model.safetensors'))
  _Marker.path = os.path.join(folder, 'UNPICKLED')
  torch.save({'x': _Marker()}, os.path.join(folder, 'pytorch_model.bin'))


def _truncate(folder):
  path = os.path.join(folder, 'model.safetensors')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


BAD_FOLDERS = {
    'missing tensors': (lambda d: _rewrite_weights(d, lambda t: [
        t.pop('vision_model.post_layernorm.weight'), t.pop('text_projection.weight')]),
                        r'2 tensor\(s\) missing: vision_model.post_layernorm.weight, '
                        'text_projection.weight'),
    'shape mismatch': (lambda d: _rewrite_weights(d, lambda t: t.update({
        'text_model.encoder.layers.1.mlp.fc1.weight': np.zeros((32, 32), np.float32)})),
                       r'text_model.encoder.layers.1.mlp.fc1.weight has shape \(32, 32\), '
                       r'but the model expects \(64, 32\)'),
    'unknown architecture': (lambda d: _edit_config(d, model_type='siglip',
                                                    architectures=['SiglipModel']),
                             "unknown architecture.*model_type='siglip'"),
    'truncated file': (_truncate, 'model.safetensors: cannot read as safetensors, the file '
                       'may be truncated'),
    'pickle only': (_pickle_only, 'weights are only in pytorch_model.bin.*safetensors only'),
    'layer norm eps': (lambda d: _edit_text_config(d, layer_norm_eps=1e-6),
                       r'text_config.layer_norm_eps=1e-06; our LayerNorm uses 1e-05'),
    'no config': (lambda d: os.remove(os.path.join(d, 'config.json')),
                  'config.json not found'),
    'other activation': (lambda d: _edit_config(d, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        patch_size=16, image_size=32, hidden_act='relu')), "hidden_act='relu'"),
}


@pytest.mark.parametrize('case', sorted(BAD_FOLDERS))
def test_bad_folders_are_refused_with_a_clear_message(good_folder, tmp_path, case):
  folder = str(tmp_path / 'bad')
  shutil.copytree(good_folder, folder)
  damage, message = BAD_FOLDERS[case]
  damage(folder)
  with pytest.raises(InteropError, match=message):
    hf_import.load_encoder(folder)
  assert not os.path.exists(os.path.join(folder, 'UNPICKLED'))


def test_a_sharded_bfloat16_folder_saved_by_transformers_loads_as_transformers_reads_it(tmp_path):
  """Hub folders of big models come sharded (model.safetensors.index.json) and in bfloat16:
  transformers' own save_pretrained writes one, and our encoder must give what transformers
  computes from it (its bf16 weights read back as float32)."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  folder, shards = str(tmp_path / 'clip'), str(tmp_path / 'sharded')
  write_hf_folder(folder, False, preprocess.CLIP_MEAN, preprocess.CLIP_STD, 16, 32, 48, 'gelu')
  model = transformers.AutoModel.from_pretrained(folder).to(torch.bfloat16)
  model.save_pretrained(shards, max_shard_size='40KB')
  for name in os.listdir(folder):   # the tokenizer and preprocessor files
    if not name.endswith('.safetensors') and not os.path.exists(os.path.join(shards, name)):
      shutil.copyfile(os.path.join(folder, name), os.path.join(shards, name))
  files = clip_files.weight_files(shards)
  assert len(files) > 2 and os.path.exists(os.path.join(shards, clip_files.WEIGHTS_INDEX))
  with safe_open(files[0], framework='pt') as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'BF16'}
  hf = transformers.AutoModel.from_pretrained(shards, dtype=torch.float32).eval()
  enc = hf_import.load_encoder(shards)
  pixels = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(jax_features(enc.config, enc.params, pixels),
                             hf_features(hf, pixels), atol=1e-4, rtol=0)
  ids = enc.tokenize(TEXTS)
  np.testing.assert_allclose(enc.embed_texts(TEXTS),
                             losses.l2_normalize(hf_features(hf, ids=ids)), atol=1e-5, rtol=0)
  # The bf16 rounding is really there: the float32 folder's weights differ from these.
  full = clip_files.read_weights(folder)
  half = clip_files.read_weights(shards)
  assert set(full) == set(half)
  assert any(not np.array_equal(full[k], half[k]) for k in full)
