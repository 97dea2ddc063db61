"""An Encoder (a training checkpoint) -> an open_clip folder, for open_clip, CLIP_benchmark
and clip-retrieval.

  python -m mofi_jax.export --workdir W --format open_clip --out OUT

OUT holds:
  open_clip_config.json          model_cfg (open_clip's CLIP: ViT + causal text tower)
                                 and preprocess_cfg (shorter side to S, centre crop,
                                 bilinear, CLIP mean/std)
  open_clip_model.safetensors    open_clip.CLIP's state dict, float32
  tokenizer.json, tokenizer_config.json
                                 the corpus tokenizer, as in the hf format (open_clip
                                 reads it through its HFTokenizer)
  entity_head.safetensors, entities.jsonl, export_info.json
                                 as in the hf format (hf_export.py)

In open_clip (open-clip-torch 3.3):

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms('local-dir:OUT')
    tokenizer = open_clip.get_tokenizer('local-dir:OUT')

and in CLIP_benchmark: `clip_benchmark eval --model_type open_clip --model local-dir:OUT
--pretrained none ...`.

The text tower pools at the first <eot> (open_clip's pool_type 'eos'), or at the largest
id for models imported with that rule ('argmax'). open_clip pads and truncates texts to the
tower's context (config.model.text.context), ours to config.input.text_len: texts that
fit both get the same features. open_clip's QuickGELU switch covers both towers at once,
so a model whose towers use different activations from {quick_gelu, gelu} is refused.
"""
import os

import numpy as np

from mofi_jax.data import preprocess
from mofi_jax.interop import clip_files, hf_export, outputs
from mofi_jax.interop.clip_config import InteropError
from mofi_jax.models import mofi

CONFIG_FILE = 'open_clip_config.json'
WEIGHTS_FILE = 'open_clip_model.safetensors'

# CLIPModel name -> open_clip name, outside the transformer blocks ('.T': transposed).
TOWER_RENAMES = {
    'vision_model.embeddings.patch_embedding.weight': 'visual.conv1.weight',
    'vision_model.embeddings.class_embedding': 'visual.class_embedding',
    'vision_model.embeddings.position_embedding.weight': 'visual.positional_embedding',
    'vision_model.pre_layrnorm.weight': 'visual.ln_pre.weight',
    'vision_model.pre_layrnorm.bias': 'visual.ln_pre.bias',
    'vision_model.post_layernorm.weight': 'visual.ln_post.weight',
    'vision_model.post_layernorm.bias': 'visual.ln_post.bias',
    'visual_projection.weight': 'visual.proj.T',
    'text_model.embeddings.token_embedding.weight': 'token_embedding.weight',
    'text_model.embeddings.position_embedding.weight': 'positional_embedding',
    'text_model.final_layer_norm.weight': 'ln_final.weight',
    'text_model.final_layer_norm.bias': 'ln_final.bias',
    'text_projection.weight': 'text_projection.T',
    'logit_scale': 'logit_scale',
}
# Inside block i: CLIPModel's encoder.layers.<i>.<a> -> open_clip's resblocks.<i>.<b>.
BLOCK_RENAMES = {'layer_norm1': 'ln_1', 'layer_norm2': 'ln_2', 'mlp.fc1': 'mlp.c_fc',
                 'mlp.fc2': 'mlp.c_proj', 'self_attn': 'attn'}
TOWER_PREFIXES = {'vision_model': 'visual.transformer', 'text_model': 'transformer'}
# open_clip activations: QuickGELU for both towers, or nn.GELU(**act_kwargs) per tower.
GELU_KWARGS = {'gelu': None, 'gelu_pytorch_tanh': {'approximate': 'tanh'}}


def export_open_clip(encoder, out, overwrite=False, inputs=()):
  """Writes `encoder` as an open_clip `local-dir:` folder at `out` (module docstring)."""
  config = encoder.config
  tok, ids, hf_tensors = hf_export.clip_tensors(encoder, 'an open_clip CLIP')   # refusals
  model_cfg = open_clip_model_cfg(config, ids, os.path.abspath(out))
  tensors = to_open_clip(hf_tensors)
  with outputs.staged_folder(out, overwrite, inputs) as tmp:
    hf_export.write_json(os.path.join(tmp, CONFIG_FILE), dict(
        model_cfg=model_cfg, preprocess_cfg=preprocess_cfg(int(config.input.image_size))))
    clip_files.write_safetensors(os.path.join(tmp, WEIGHTS_FILE), tensors)
    hf_export.write_tokenizer(tmp, tok, ids, int(config.model.text['context']))
    hf_export.write_head_and_info(encoder, tmp, 'open_clip', ids)
  return out


def preprocess_cfg(image_size):
  return dict(size=image_size, mode='RGB', mean=list(preprocess.CLIP_MEAN),
              std=list(preprocess.CLIP_STD), interpolation='bilinear',
              resize_mode='shortest', fill_color=0)


def _activation(config):
  """(quick_gelu, {tower: act_kwargs or None}) for open_clip, or InteropError."""
  acts = {'image': mofi.image_kwargs(config.model.image).get('act', 'gelu'),
          'text': config.model.text.get('act', 'gelu')}
  quick = {t for t, a in acts.items() if a == 'quick_gelu'}
  if quick and len(quick) != len(acts):
    raise InteropError(
        f'cannot export as open_clip: config.model.image.act={acts["image"]!r} and '
        f'config.model.text.act={acts["text"]!r}; open_clip applies quick_gelu to both '
        'towers or to neither (use --format hf).')
  if quick:
    return True, {t: None for t in acts}
  return False, {t: GELU_KWARGS[a] for t, a in acts.items()}


def _mlp_ratio(tower, name):
  ratio = tower['mlp_dim'] / tower['width']
  if int(tower['width'] * ratio) != tower['mlp_dim']:
    raise InteropError(f'cannot export as open_clip: config.model.{name}.mlp_dim='
                       f'{tower["mlp_dim"]} is not int(width * mlp_ratio) for any float ratio.')
  return ratio


def open_clip_model_cfg(config, ids, tokenizer_source):
  """open_clip's model_cfg for `config` (a CLIP ViT; checked by clip_config first)."""
  m = config.model
  image, text = mofi.image_kwargs(m.image), dict(m.text)
  quick_gelu, act_kwargs = _activation(config)
  vision = dict(image_size=int(config.input.image_size), layers=image['depth'],
                width=image['width'], head_width=image['width'] // image['num_heads'],
                mlp_ratio=_mlp_ratio(image, 'image'), patch_size=image['patch'])
  pool = text.get('pool', 'last_nonpad')
  text_cfg = dict(context_length=text['context'], vocab_size=text['vocab_size'],
                  width=text['width'], heads=text['num_heads'], layers=text['depth'],
                  mlp_ratio=_mlp_ratio(text, 'text'), pad_id=ids.pad,
                  pool_type='argmax' if pool == 'max_id' else 'eos', eos_id=ids.config_eos,
                  # Any non-empty name selects HFTokenizer; `local-dir:` reads the folder.
                  hf_tokenizer_name=tokenizer_source)
  for cfg, tower in ((vision, 'image'), (text_cfg, 'text')):
    if act_kwargs[tower]:
      cfg['act_kwargs'] = act_kwargs[tower]
  return dict(embed_dim=m.embed_dim, quick_gelu=quick_gelu, vision_cfg=vision,
              text_cfg=text_cfg)


def _block_name(name):
  """'vision_model.encoder.layers.3.mlp.fc1.weight' -> 'visual.transformer.resblocks.3.
  mlp.c_fc.weight' (q/k/v are merged by the caller)."""
  tower, _, _, layer, rest = name.split('.', 4)
  for ours, theirs in BLOCK_RENAMES.items():
    if rest.startswith(ours + '.'):
      rest = theirs + rest[len(ours):]
  return f'{TOWER_PREFIXES[tower]}.resblocks.{layer}.{rest}'


def to_open_clip(hf_tensors):
  """{CLIPModel name: array} -> {open_clip.CLIP state-dict name: float32 array}.

  q_proj/k_proj/v_proj of a block become its in_proj (rows q, k, v), found from the names
  themselves, so whatever towers and depths the tensors hold convert."""
  out = {}
  for name, x in hf_tensors.items():
    if name in TOWER_RENAMES:
      theirs = TOWER_RENAMES[name]
      out[theirs.removesuffix('.T')] = x.T if theirs.endswith('.T') else x
    elif name.split('.')[-2] == 'q_proj':   # ....self_attn.q_proj.{weight,bias}
      attn, kind = name.rsplit('.', 2)[0], name.rsplit('.', 1)[1]
      merged = np.concatenate([hf_tensors[f'{attn}.{p}_proj.{kind}'] for p in 'qkv'], axis=0)
      out[_block_name(f'{attn}.in_proj_{kind}')] = merged
    elif name.split('.')[-2] not in ('k_proj', 'v_proj'):   # k/v: merged with q
      out[_block_name(name)] = x
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
