"""An Encoder (a training checkpoint) -> a Hugging Face CLIPModel folder.

  python -m mofi_jax.export --workdir W --format hf --out OUT

OUT holds:
  config.json, model.safetensors   a CLIPModel in float32: `AutoModel.from_pretrained(OUT)`
  tokenizer.json, tokenizer_config.json
                                   the corpus tokenizer as a fast tokenizer (ids 2 and
                                   V-1 swapped, see clip_tokenizer)
  preprocessor_config.json         CLIPImageProcessor: shorter side to S, centre crop S,
                                   CLIP mean/std (bilinear; ours is TF's antialiased
                                   bilinear, so pixels differ slightly from ours)
  entity_head.safetensors          the entity head (modes with one): `kernel` [D, C] and
                                   `bias` [C] (linear) or `scale` [] (cosine)
  entities.jsonl                   the entity table: line i is class i
  export_info.json                 where the weights came from

Image-to-entity prediction in PyTorch (the head reads the unnormalised image
features, as in training):

    import json
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(OUT).eval()
    processor = AutoImageProcessor.from_pretrained(OUT)
    head = load_file(f'{OUT}/entity_head.safetensors')
    with open(f'{OUT}/entities.jsonl') as f:
      entities = [json.loads(line) for line in f]
    inputs = processor(images=[Image.open(path).convert('RGB')], return_tensors='pt')
    with torch.no_grad():
      features = model.get_image_features(**inputs).pooler_output     # [N, D]
    if 'scale' in head:   # cosine head: normalised features and class vectors
      logits = head['scale'] * torch.nn.functional.normalize(features, dim=-1) @ (
          torch.nn.functional.normalize(head['kernel'], dim=0))
    else:                 # linear head
      logits = features @ head['kernel'] + head['bias']
    top = logits.topk(5, dim=-1)
    print([entities[i]['name'] for i in top.indices[0].tolist()])
"""
import json
import math
import os
import shutil

import jax
import numpy as np

from mofi_jax.data import preprocess, schema
from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.interop import clip_config, clip_files, clip_params, clip_tokenizer, outputs
from mofi_jax.interop.clip_config import InteropError

HEAD_FILE = 'entity_head.safetensors'
INFO_FILE = outputs.INFO_FILE
PIL_BILINEAR = 2


def export_hf(encoder, out, overwrite=False, inputs=()):
  """Writes `encoder` as a CLIPModel folder at `out` (see the module docstring).

  The tokenizer and entity table come from the model's corpus folder
  (config.input.data_dir). `out` appears only once complete; it may not overlap
  `inputs` ((flag, path) pairs; outputs.check_output_folder).
  """
  config = encoder.config
  tok, ids, tensors = clip_tensors(encoder)
  import transformers  # pylint: disable=g-import-not-at-top  (slow; only here)
  hf_config = transformers.CLIPConfig(**clip_config.to_clip_config(config, ids.hf_config_ids()))
  with outputs.staged_folder(out, overwrite, inputs) as tmp:
    hf_config.to_json_file(os.path.join(tmp, 'config.json'))
    clip_files.write_safetensors(os.path.join(tmp, clip_files.WEIGHTS_FILE), tensors)
    write_tokenizer(tmp, tok, ids, int(config.input.text_len))
    write_json(os.path.join(tmp, 'preprocessor_config.json'),
                preprocessor_config(int(config.input.image_size)))
    write_head_and_info(encoder, tmp, 'hf', ids)
  return out


def clip_tensors(encoder, what='a Hugging Face CLIPModel'):
  """(corpus tokenizer, TextIds, {CLIPModel tensor name: float32 array}) of `encoder`,
  with the token rows swapped as the exported tokenizer's ids are (plan_text_ids); `what`
  names the format in a refusal."""
  config = encoder.config
  clip_config.check_exportable(config, what)
  tok = _corpus_tokenizer(config, config.input.data_dir)
  ids = clip_tokenizer.plan_text_ids(dict(config.model.text), tok,
                                     int(config.model.text['vocab_size']))
  tensors = clip_params.swap_token_rows(
      clip_params.to_hf(_effective_params(encoder), config.model), ids.swap)
  return tok, ids, tensors


def write_tokenizer(folder, tok, ids, text_len):
  """tokenizer.json and tokenizer_config.json: a fast tokenizer with the ids of `ids`."""
  hf_tok = clip_tokenizer.swapped_tokenizer(tok, ids.swap)
  hf_tok.save(os.path.join(folder, 'tokenizer.json'))
  write_json(os.path.join(folder, 'tokenizer_config.json'),
              clip_tokenizer.tokenizer_config(hf_tok, ids, text_len))


def write_head_and_info(encoder, folder, fmt, ids):
  """The entity head and its table (models with one), and export_info.json."""
  if encoder.has_head:
    export_entity_head(encoder, folder, encoder.config.input.data_dir)
  write_json(os.path.join(folder, INFO_FILE), dict(
      source=encoder.source, step=int(encoder.step), format=fmt,
      token_id_swap=list(ids.swap) if ids.swap else None))


def _corpus_tokenizer(config, data_dir):
  path = os.path.join(data_dir, schema.TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise InteropError(f'{path} not found: the export needs the tokenizer of the corpus '
                       'the model was trained on (config.input.data_dir).')
  if config.model.text.get('pool', 'last_nonpad') == 'last_nonpad':
    return tokenizer_lib.load_tokenizer(path)   # checks <pad>=0 and <bos> ... <eot>
  return clip_tokenizer.load_folder_tokenizer(data_dir)


def _effective_params(encoder):
  """Host params, with the logit scale capped as our model caps it."""
  params = jax.device_get(encoder.params)
  cap = math.log(float(encoder.config.model.logit_scale_max))
  params['log_logit_scale'] = np.minimum(np.float32(params['log_logit_scale']), cap)
  return params


def preprocessor_config(image_size):
  return dict(
      image_processor_type='CLIPImageProcessor', do_convert_rgb=True,
      do_resize=True, size=dict(shortest_edge=image_size), resample=PIL_BILINEAR,
      do_center_crop=True, crop_size=dict(height=image_size, width=image_size),
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=list(preprocess.CLIP_MEAN), image_std=list(preprocess.CLIP_STD))


def entity_head_tensors(encoder):
  """{kernel [D, C], bias [C] | scale []}, kind: the head as our loss applies it."""
  kernel, bias, kind = encoder.head_weights()
  tensors = {'kernel': kernel}
  if kind == 'cosine':
    head_cfg = encoder.config.model.head
    log_scale = jax.device_get(encoder.params['entity_head']['log_scale'])
    scale = math.exp(float(log_scale)) if head_cfg.get('learn_scale', True) else float(
        head_cfg.get('scale_init', 16.0))
    tensors['scale'] = np.asarray(scale, np.float32)
  else:
    tensors['bias'] = bias
  return tensors, kind


def export_entity_head(encoder, folder, data_dir):
  tensors, kind = entity_head_tensors(encoder)
  classes = tensors['kernel'].shape[1]
  table = os.path.join(data_dir, schema.ENTITIES_FILE)
  if not os.path.isfile(table):
    raise InteropError(f'{table} not found: the export copies the entity table beside '
                       'the entity head.')
  rows = len(schema.load_entities(data_dir))
  if rows != classes:
    raise InteropError(f'{table} has {rows} entities, but the entity head has {classes} '
                       'classes.')
  clip_files.write_safetensors(os.path.join(folder, HEAD_FILE), tensors,
                               metadata=dict(kind=kind, num_classes=str(classes)))
  shutil.copyfile(table, os.path.join(folder, schema.ENTITIES_FILE))


def write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
