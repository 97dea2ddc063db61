"""A Hugging Face CLIP folder on local disk -> our model.

  enc = hf_import.load_encoder('/models/clip-vit-base-patch16')   # an inference.Encoder
  enc.embed_images(x); enc.embed_texts(['a photo of a cat'])

The folder is a transformers CLIPModel: OpenAI CLIP's layout, a released MOFI
folder or our own export (whose entity head, if any, is loaded too). It needs
config.json and model.safetensors (or an index of safetensors shards). Texts are
tokenised by the folder's own transformers AutoTokenizer, as `tok(texts, padding=True,
return_attention_mask=False)` does (ml-mofi's usage), and pooled by CLIPTextModel's rule.
Image sizes and mean/std come from preprocessor_config.json; a folder without one (the
released MOFI folders) is evaluated with ml-mofi's transform (preprocess 'mofi').

Our preprocessing normalises with CLIP's mean/std. A folder that normalises
otherwise gets that difference folded into its patch embedding (a per-channel
kernel scale, and a constant added to the patch position embeddings), so every
consumer that feeds CLIP-normalised images gets the folder's embeddings.

`init_from_hf_clip` puts a folder's towers into a freshly initialised, sharded
training parameter tree (config.init.hf_clip).
"""
import json
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from mofi_jax import inference, trainer
from mofi_jax.data import preprocess, schema
from mofi_jax.interop import (clip_config, clip_files, clip_params, clip_tokenizer,
                              preprocessor_file)
from mofi_jax.interop.clip_config import InteropError
from mofi_jax.interop.hf_export import HEAD_FILE
from mofi_jax.models import mofi

PREPROCESSOR_FILE = 'preprocessor_config.json'
PADDED_BIAS = -1e9   # padded head classes: never predicted


def load_encoder(folder, mesh=None):
  """The inference.Encoder of a Hugging Face CLIP folder."""
  folder = os.path.abspath(folder)
  model_cfg, image_size = clip_config.model_config(clip_config.read_clip_config(folder), folder)
  images = _read_preprocessor(folder, image_size)
  tok = clip_tokenizer.load_auto_tokenizer(folder)
  text_len = _text_len(folder, int(model_cfg.text['context']))
  config = _encoder_config(model_cfg, folder, image_size, text_len, images)
  tensors = clip_files.read_weights(folder)
  head = _read_entity_head(folder, config, mesh)
  params = _params_from_tensors(tensors, folder, config)
  # Our model caps the scale at logit_scale_max; theirs is uncapped.
  with config.unlocked():
    config.model.logit_scale_max = max(100.0, float(np.exp(params['log_logit_scale'])))
  if head:
    params['entity_head'] = head
  tokenize = None if tok is None else _folder_tokenize(tok, config, folder)
  entities = (schema.load_entities(folder) if head and os.path.isfile(
      os.path.join(folder, schema.ENTITIES_FILE)) else None)
  return inference.Encoder(config=config, params=params, tokenize=tokenize,
                           entities=entities, step=0, source=folder, mesh=mesh)


def params_from_hf(folder, config, towers=('image', 'text')):
  """Host params (a partial tree: the towers, and the logit scale with text) of a
  folder's CLIPModel for our `config` (shapes checked against config.model)."""
  folder = os.path.abspath(folder)
  folder_model, _ = clip_config.model_config(clip_config.read_clip_config(folder), folder)
  clip_config.check_same_towers(folder_model, config, folder)
  if mofi.uses_text(config.model.mode) and 'text' in towers and (
      folder_model.text['pool'] != config.model.text.get('pool', 'last_nonpad')):
    logging.warning('%s: the text tower was trained with this folder\'s tokenizer; it only '
                    'makes sense with a corpus tokenizer that gives the same ids.', folder)
  return _params_from_tensors(clip_files.read_weights(folder), folder, config, towers)


def init_from_hf_clip(state_params, config, folder=None):
  """`state_params` with the image/text towers (and logit scale) from a HF folder.

  state_params: a freshly initialised (sharded) parameter tree; the entity head
  keeps its initialisation. Each new leaf gets the sharding and dtype of the
  leaf it replaces. folder: default config.init.hf_clip.
  """
  folder = folder or config.init.hf_clip
  towers = ('image', 'text') if mofi.uses_text(config.model.mode) else ('image',)
  new = traverse_util.flatten_dict(params_from_hf(folder, config, towers))
  flat = traverse_util.flatten_dict(state_params)
  for path, host in new.items():
    old = flat[path]
    host = np.asarray(host, old.dtype)
    flat[path] = jax.make_array_from_callback(old.shape, old.sharding,
                                              lambda idx, h=host: h[idx])
  logging.info('Initialised %d parameters from %s.', len(new), folder)
  return traverse_util.unflatten_dict(flat)


def _params_from_tensors(tensors, folder, config, towers=('image', 'text')):
  abstract = abstract_params(config)
  params = clip_params.from_hf(tensors, config.model, abstract, towers, where=folder)
  unused = clip_params.unused_tensors(tensors, config.model)
  if unused and len(towers) == 2:
    logging.warning('%s: %d tensor(s) not used: %s', folder, len(unused), unused[:5])
  norm = _read_preprocessor(folder, int(config.input.image_size))
  return fold_normalization(params, norm['mean'], norm['std'])


def abstract_params(config):
  """Our parameter tree's shapes (ShapeDtypeStructs) for `config`."""
  batch = trainer.dummy_batch(config, batch_size=1)
  model = mofi.build(config.model)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch['image'],
                                 batch['text'])['params'])


def fold_normalization(params, mean, std):
  """Makes the image tower take CLIP-normalised input for weights trained on
  input normalised with `mean`/`std` (per channel); identity when they agree.

  Their patch input (img - m) / s equals x * (s_c / s) + (m_c - m) / s for our
  x = (img - m_c) / s_c: a kernel scale per input channel, plus the kernel
  applied to the constant image (m_c - m) / s, which is one vector per output
  channel added to every patch token (not the CLS token).
  """
  mean_c, std_c = np.asarray(preprocess.CLIP_MEAN), np.asarray(preprocess.CLIP_STD)
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if np.allclose(mean, mean_c, rtol=0, atol=1e-7) and np.allclose(std, std_c, rtol=0,
                                                                   atol=1e-7):
    return params
  tower = dict(params['image_tower'])
  kernel = np.asarray(tower['patch_embed']['kernel'], np.float64)    # [p, p, 3, W]
  offset = np.einsum('hwco,c->o', kernel, (mean_c - mean) / std)
  tower['patch_embed'] = {'kernel': (kernel * (std_c / std)[:, None]).astype(np.float32)}
  pos = np.asarray(tower['pos_embedding'], np.float64).copy()
  pos[1:] += offset
  tower['pos_embedding'] = pos.astype(np.float32)
  return {**params, 'image_tower': tower}


def _read_preprocessor(folder, image_size):
  """{resize, mean, std, preprocess} from preprocessor_config.json.

  Without one (the released MOFI folders), CLIP's mean/std and ml-mofi's eval transform
  (preprocess 'mofi'), with which those models were scored.
  """
  path = os.path.join(folder, PREPROCESSOR_FILE)
  if not os.path.isfile(path):
    return dict(resize=image_size, mean=preprocess.CLIP_MEAN, std=preprocess.CLIP_STD,
                preprocess='mofi')
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f'{path}: not a readable JSON file ({e}).') from e
  return dict(preprocessor_file.parse(cfg, path, image_size), preprocess='tf')


def _folder_tokenize(tok, config, folder):
  text_cfg = dict(config.model.text)
  tokenize = clip_tokenizer.make_tokenize(tok, text_cfg, int(config.input.text_len))
  if clip_tokenizer.batch_dependent(tokenize, text_cfg):
    logging.warning('%s: with this tokenizer (padding_side=%r, pad id %s) and pooling rule '
                    '(%s), a text\'s features depend on the longest text of its batch, in '
                    'transformers as here; embed the same batches to compare.', folder,
                    tok.padding_side, tok.pad_token_id, text_cfg['pool'])
  return tokenize


def _text_len(folder, context):
  """The tokenizer's model_max_length, capped at the text tower's context."""
  path = os.path.join(folder, 'tokenizer_config.json')
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError):
    return context   # no file; a broken one is refused by the tokenizer check
  limit = raw.get('model_max_length', context) if isinstance(raw, dict) else context
  # transformers writes a huge float (1e30) for "no limit".
  ok = isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit >= 1
  return min(context, int(limit)) if ok and limit < context else context


def _encoder_config(model_cfg, folder, image_size, text_len, images):
  return ml_collections.ConfigDict(dict(
      model=model_cfg,
      input=dict(data_dir=folder, image_size=image_size, text_len=text_len,
                 eval_resize=images['resize'], eval_preprocess=images['preprocess'],
                 max_entities=1),
      mesh=dict(data=1, fsdp=-1, model=1),
      init=dict(hf_clip=folder)))


def _read_entity_head(folder, config, mesh):
  """Our entity_head params from entity_head.safetensors (our export), or None.

  Sets config.model to multitask with a head of the file's classes, padded to
  split over the devices.
  """
  path = os.path.join(folder, HEAD_FILE)
  if not os.path.isfile(path):
    return None
  tensors, meta = clip_files.read_safetensors(path)
  kind = meta.get('kind', 'cosine' if 'scale' in tensors else 'linear')
  need = ('kernel', 'scale') if kind == 'cosine' else ('kernel', 'bias')
  missing = [n for n in need if n not in tensors]
  if missing or tensors['kernel'].ndim != 2:
    raise InteropError(f'{path}: a {kind} head needs tensors {need} with a [D, C] kernel; '
                       f'missing {missing}.')
  dim, classes = tensors['kernel'].shape
  if dim != config.model.embed_dim:
    raise InteropError(f'{path}: tensor kernel has shape {tensors["kernel"].shape}, but the '
                       f'model expects ({config.model.embed_dim}, C).')
  devices = mesh.size if mesh is not None else jax.device_count()
  pad = -classes % devices
  head = {'kernel': np.pad(tensors['kernel'], ((0, 0), (0, pad)))}
  if kind == 'cosine':
    head['log_scale'] = np.log(np.asarray(tensors['scale'], np.float32))
  else:
    head['bias'] = np.pad(tensors['bias'], (0, pad), constant_values=PADDED_BIAS)
  with config.unlocked():
    config.model.mode = 'multitask'
    config.model.head = dict(num_classes=classes, kind=kind, pad_multiple=devices)
  return head
