"""Our Flax parameters <-> a transformers CLIPModel state dict.

One table (`tensor_table`) pairs every parameter of our towers with its CLIPModel
tensor and the layout change between them; both directions walk the same table,
so ours -> HF -> ours is the identity. Layouts:

  dense  ours [in, out]                  HF nn.Linear.weight [out, in]
  conv   ours HWIO [p, p, 3, width]      HF nn.Conv2d.weight OIHW [width, 3, p, p]
  copy   same layout (LayerNorm scale/bias = weight/bias, embeddings, CLS, scale)

Encoders built with `scan=True` stack their layers on a leading axis
(`encoder/layers/...`); unrolled ones have `encoder/layers_<i>/...`. Both map to
HF's `encoder.layers.<i>.*`.

The entity head has no CLIPModel slot (see hf_export); `log_logit_scale` maps
to `logit_scale` (both are the log of the contrastive scale).
"""
import dataclasses
from typing import Optional

import numpy as np
from flax import traverse_util

from mofi_jax.interop.clip_config import InteropError
from mofi_jax.models import mofi

LAYER_TENSORS = (
    # (our path inside a block, HF name inside encoder.layers.<i>, layout)
    (('ln1', 'scale'), 'layer_norm1.weight', 'copy'),
    (('ln1', 'bias'), 'layer_norm1.bias', 'copy'),
    *[((('attn', ours, w), f'self_attn.{hf}_proj.{hw}', 'dense' if w == 'kernel' else 'copy'))
      for ours, hf in (('q', 'q'), ('k', 'k'), ('v', 'v'), ('out', 'out'))
      for w, hw in (('kernel', 'weight'), ('bias', 'bias'))],
    (('ln2', 'scale'), 'layer_norm2.weight', 'copy'),
    (('ln2', 'bias'), 'layer_norm2.bias', 'copy'),
    *[((('mlp', fc, w), f'mlp.{fc}.{hw}', 'dense' if w == 'kernel' else 'copy'))
      for fc in ('fc1', 'fc2') for w, hw in (('kernel', 'weight'), ('bias', 'bias'))],
)

VISION_TENSORS = (
    (('patch_embed', 'kernel'), 'vision_model.embeddings.patch_embedding.weight', 'conv'),
    (('cls',), 'vision_model.embeddings.class_embedding', 'copy'),
    (('pos_embedding',), 'vision_model.embeddings.position_embedding.weight', 'copy'),
    (('ln_pre', 'scale'), 'vision_model.pre_layrnorm.weight', 'copy'),
    (('ln_pre', 'bias'), 'vision_model.pre_layrnorm.bias', 'copy'),
    (('ln_post', 'scale'), 'vision_model.post_layernorm.weight', 'copy'),
    (('ln_post', 'bias'), 'vision_model.post_layernorm.bias', 'copy'),
    (('proj', 'kernel'), 'visual_projection.weight', 'dense'),
)

TEXT_TENSORS = (
    (('token_embedding', 'embedding'), 'text_model.embeddings.token_embedding.weight', 'copy'),
    (('pos_embedding',), 'text_model.embeddings.position_embedding.weight', 'copy'),
    (('ln_final', 'scale'), 'text_model.final_layer_norm.weight', 'copy'),
    (('ln_final', 'bias'), 'text_model.final_layer_norm.bias', 'copy'),
    (('proj', 'kernel'), 'text_projection.weight', 'dense'),
)

# Non-persistent buffers that older transformers versions saved; not weights.
IGNORED_HF_TENSORS = ('text_model.embeddings.position_ids',
                      'vision_model.embeddings.position_ids')

# Axis permutation from our layout to HF's (None: same layout).
PERMUTATIONS = {'copy': None, 'dense': (1, 0), 'conv': (3, 2, 0, 1)}


def _to_hf_layout(x, layout):
  perm = PERMUTATIONS[layout]
  return x if perm is None else x.transpose(perm)


def _from_hf_layout(x, layout):
  perm = PERMUTATIONS[layout]
  return x if perm is None else x.transpose(np.argsort(perm))


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple            # our flattened parameter path
  hf_name: str
  layout: str            # 'copy' | 'dense' | 'conv'
  layer: Optional[int]   # index along the scanned axis, or None

  def hf_shape(self, our_shape):
    perm = PERMUTATIONS[self.layout]
    return tuple(our_shape) if perm is None else tuple(our_shape[i] for i in perm)


def _tower(name, hf_prefix, tensors, depth, scan):
  entries = [Entry((name,) + p, n, lay, None) for p, n, lay in tensors]
  for i in range(depth):
    for p, n, lay in LAYER_TENSORS:
      path = ((name, 'encoder', 'layers') if scan else (name, 'encoder', f'layers_{i}')) + p
      entries.append(Entry(path, f'{hf_prefix}.encoder.layers.{i}.{n}', lay,
                           i if scan else None))
  return entries


def tensor_table(model_cfg, towers=('image', 'text')):
  """Entries for the towers of `model_cfg` named in `towers` (+ logit scale with text)."""
  scan = bool(model_cfg.scan)
  entries = []
  if 'image' in towers:
    depth = mofi.image_kwargs(model_cfg.image)['depth']
    entries += _tower('image_tower', 'vision_model', VISION_TENSORS, depth, scan)
  if 'text' in towers and mofi.uses_text(model_cfg.mode):
    entries += _tower('text_tower', 'text_model', TEXT_TENSORS, model_cfg.text['depth'], scan)
    entries.append(Entry(('log_logit_scale',), 'logit_scale', 'copy', None))
  return entries


def to_hf(params, model_cfg):
  """Our params (host arrays) -> {HF tensor name: float32 np.ndarray}."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for e in tensor_table(model_cfg):
    if e.path not in flat:
      raise InteropError(f'parameter {"/".join(e.path)} is missing from the model '
                         f'parameters (needed for {e.hf_name}).')
    x = np.asarray(flat[e.path], np.float32)
    x = x if e.layer is None else x[e.layer]
    out[e.hf_name] = np.array(_to_hf_layout(x, e.layout), np.float32, order='C')
  return out


def from_hf(tensors, model_cfg, abstract_params, towers=('image', 'text'), where='weights'):
  """{HF name: array} -> our params for `towers`, shaped like `abstract_params`.

  abstract_params: our parameter tree (arrays or ShapeDtypeStructs) giving every
  shape; only the mapped leaves are returned (a partial tree). Raises
  InteropError naming every missing tensor, or a tensor whose shape differs.
  """
  table = tensor_table(model_cfg, towers)
  missing = [e.hf_name for e in table if e.hf_name not in tensors]
  if missing:
    raise InteropError(f'{where}: {len(missing)} tensor(s) missing: '
                       f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}')
  shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params).items()}
  layers = {}
  for e in table:
    if e.path not in shapes:
      raise InteropError(f'our model has no parameter {"/".join(e.path)} for {e.hf_name}.')
    want = shapes[e.path] if e.layer is None else shapes[e.path][1:]
    got = tuple(tensors[e.hf_name].shape)
    if got != e.hf_shape(want):
      raise InteropError(f'{where}: tensor {e.hf_name} has shape {got}, but the model '
                         f'expects {e.hf_shape(want)}.')
    x = _from_hf_layout(np.asarray(tensors[e.hf_name], np.float32), e.layout)
    layers.setdefault(e.path, {})[e.layer] = x
  flat = {path: by_layer[None] if None in by_layer else
          np.stack([by_layer[i] for i in sorted(by_layer)])
          for path, by_layer in layers.items()}
  return traverse_util.unflatten_dict(flat)


def unused_tensors(tensors, model_cfg):
  """Names in `tensors` the conversion does not read (besides known buffers)."""
  used = {e.hf_name for e in tensor_table(model_cfg)}
  return sorted(set(tensors) - used - set(IGNORED_HF_TENSORS))


def swap_token_rows(hf_tensors, swap):
  """Swaps two rows of the token embedding (see clip_tokenizer.plan_text_ids)."""
  if swap:
    name = 'text_model.embeddings.token_embedding.weight'
    emb = hf_tensors[name].copy()
    emb[list(swap)] = emb[list(swap[::-1])]
    hf_tensors[name] = emb
  return hf_tensors
