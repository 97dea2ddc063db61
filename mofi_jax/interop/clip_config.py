"""Our model config <-> transformers' CLIPConfig.

CLIPModel is one fixed architecture: a pre-LayerNorm ViT with a CLS token,
`pre_layrnorm` before the encoder and `post_layernorm` on the CLS token; a
causal text transformer pooled at <eot>; bias-free projections; LayerNorm eps
1e-5; activation gelu (exact), quick_gelu or gelu_pytorch_tanh. Our towers can be configured
outside it (GAP pooling, no ln_pre); such a model is refused on export, never
written as a model that computes something else.
"""
import json
import math
import os

import ml_collections

from mofi_jax import inference
from mofi_jax.models import layers, mofi

LAYER_NORM_EPS = 1e-5                 # ours (layers.layer_norm) and CLIP's
ACTIVATIONS = layers.ACTIVATIONS  # the same names in our layers and HF's ACT2FN
# transformers pools CLIP text at argmax(input_ids) when text_config.eos_token_id
# is 2 (configs written before its PR #24773), else at the first eos_token_id.
LEGACY_EOS_ID = 2
ARCHITECTURE = 'CLIPModel'
MODEL_TYPE = 'clip'


class InteropError(inference.LoadError):
  """A model or folder cannot be converted as asked; the message says why."""


# ----------------------------------------------------------------------------
# Ours -> CLIPConfig.


def export_refusals(config):
  """The options of `config` a CLIPModel cannot express, one message each."""
  m = config.model
  image = mofi.image_kwargs(m.image)
  found = []
  if not mofi.uses_text(m.mode):
    found.append(f"config.model.mode={m.mode!r}: CLIPModel needs a text tower "
                 "(export a 'contrastive' or 'multitask' model, or use --format savedmodel)")
  if image.get('pool', 'cls') != 'cls':
    found.append(f"config.model.image.pool={image['pool']!r}: CLIPModel pools the CLS "
                 'token only (its post_layernorm sees one token, not the average)')
  if not image.get('ln_pre', True):
    found.append('config.model.image.ln_pre=False: CLIPModel always applies pre_layrnorm')
  towers = [('image', image)] + ([('text', dict(m.text))] if mofi.uses_text(m.mode) else [])
  for name, tower in towers:
    act = tower.get('act', 'gelu')
    if act not in ACTIVATIONS:
      found.append(f'config.model.{name}.act={act!r}: CLIPModel supports {ACTIVATIONS}')
  return found


def check_exportable(config, what='a Hugging Face CLIPModel'):
  refusals = export_refusals(config)
  if refusals:
    raise InteropError(f'cannot export as {what}: ' + '; '.join(refusals))


def to_clip_config(config, text_ids):
  """CLIPConfig kwargs for `config`; text_ids: bos/eos/pad_token_id for text_config."""
  check_exportable(config)
  m = config.model
  image, text = mofi.image_kwargs(m.image), dict(m.text)
  tower = lambda t: dict(
      hidden_size=t['width'], intermediate_size=t['mlp_dim'],
      num_hidden_layers=t['depth'], num_attention_heads=t['num_heads'],
      hidden_act=t.get('act', 'gelu'), layer_norm_eps=LAYER_NORM_EPS,
      projection_dim=m.embed_dim)
  vision_config = dict(tower(image), patch_size=image['patch'], num_channels=3,
                       image_size=int(config.input.image_size))
  text_config = dict(tower(text), vocab_size=text['vocab_size'],
                     max_position_embeddings=text['context'], **text_ids)
  return dict(architectures=[ARCHITECTURE], projection_dim=m.embed_dim,
              logit_scale_init_value=math.log(m.logit_scale_init),
              text_config=text_config, vision_config=vision_config)


# ----------------------------------------------------------------------------
# A folder's config.json -> ours.


def read_clip_config(folder):
  """A folder's config.json as a transformers CLIPConfig (defaults filled in)."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise InteropError(f'{path} not found: {folder} is not a Hugging Face model folder.')
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise InteropError(f'{path}: not a readable JSON file ({e}).') from e
  if not isinstance(raw, dict):
    raise InteropError(f'{path}: expected a JSON object, got {type(raw).__name__}.')
  archs = raw.get('architectures') or [ARCHITECTURE]
  if raw.get('model_type') != MODEL_TYPE or not isinstance(archs, list) or any(
      a != ARCHITECTURE for a in archs):
    raise InteropError(
        f'{path}: unknown architecture (model_type={raw.get("model_type")!r}, '
        f'architectures={raw.get("architectures")}); only {MODEL_TYPE!r} '
        f'{ARCHITECTURE} folders convert.')
  import transformers  # pylint: disable=g-import-not-at-top  (slow; only here)
  try:
    return transformers.CLIPConfig.from_dict(raw)
  except Exception as e:  # pylint: disable=broad-except  (@strict validation errors)
    raise InteropError(f'{path}: not a valid CLIPConfig ({type(e).__name__}: {e}).') from e


def _tower_kwargs(sub, name, where):
  if not math.isclose(float(sub.layer_norm_eps), LAYER_NORM_EPS, rel_tol=1e-6):
    raise InteropError(f'{where}: {name}_config.layer_norm_eps={sub.layer_norm_eps}; our '
                       f'LayerNorm uses {LAYER_NORM_EPS}.')
  if sub.hidden_act not in ACTIVATIONS:
    raise InteropError(f'{where}: {name}_config.hidden_act={sub.hidden_act!r}; our towers '
                       f'support {ACTIVATIONS}.')
  return dict(width=sub.hidden_size, depth=sub.num_hidden_layers,
              num_heads=sub.num_attention_heads, mlp_dim=sub.intermediate_size,
              act=sub.hidden_act)


def _square(value, key, where):
  values = set(value) if isinstance(value, (list, tuple)) else {value}
  if len(values) != 1:
    raise InteropError(f'{where}: vision_config.{key}={value}; only square sizes convert.')
  return int(values.pop())


def model_config(clip_config, where):
  """(config.model, image size) of our Mofi equivalent to a CLIPConfig."""
  vc, tc = clip_config.vision_config, clip_config.text_config
  if vc.num_channels != 3:
    raise InteropError(f'{where}: vision_config.num_channels={vc.num_channels}; expected 3.')
  image = dict(_tower_kwargs(vc, 'vision', where), variant=None, pool='cls', ln_pre=True,
               patch=_square(vc.patch_size, 'patch_size', where))
  eos = tc.eos_token_id
  if not isinstance(eos, int):
    raise InteropError(f'{where}: text_config.eos_token_id={eos!r}; expected one id.')
  pool = dict(pool='max_id') if eos == LEGACY_EOS_ID else dict(pool='first_eot', eot_id=eos)
  text = dict(_tower_kwargs(tc, 'text', where), vocab_size=tc.vocab_size,
              context=tc.max_position_embeddings, **pool)
  model = ml_collections.ConfigDict(dict(
      mode='contrastive', embed_dim=int(clip_config.projection_dim), image=image, text=text,
      head=None, logit_scale_init=math.exp(clip_config.logit_scale_init_value),
      logit_scale_max=100.0, dtype='float32', scan=False, remat='none'))
  return model, _square(vc.image_size, 'image_size', where)


ARCHITECTURE_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'act')


def check_same_towers(folder_model, config, where):
  """Refuses a folder whose towers compute differently from config.model's.

  Shapes alone miss some differences (head count, activation), so the fields
  are compared; the text tower only when config.model has one.
  """
  ours = {'image': mofi.image_kwargs(config.model.image)}
  if mofi.uses_text(config.model.mode):
    ours['text'] = dict(config.model.text)
  for tower, fields in ours.items():
    theirs = dict(folder_model[tower])
    keys = ARCHITECTURE_FIELDS + (('patch',) if tower == 'image' else ())
    for key in keys:
      want, got = fields.get(key, 'gelu' if key == 'act' else None), theirs[key]
      if want != got:
        raise InteropError(f'{where}: {tower} tower {key}={got!r} in the folder, but '
                           f'config.model.{tower}.{key}={want!r}.')
