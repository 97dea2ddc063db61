"""MOFI: an image tower, optionally a text tower and an entity head.

Modes (the paper's three ways to train):
  supervised   image tower + entity head
  contrastive  image tower + text tower (CLIP-style)
  multitask    all three; the image embedding feeds both losses.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mofi_jax import losses
from mofi_jax.data import pixels
from mofi_jax.models.heads import EntityHead
from mofi_jax.models.text import TextTower
from mofi_jax.models.vit import VisionTower, decode_variant

MODES = ('supervised', 'contrastive', 'multitask')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def uses_text(mode):
  return mode in ('contrastive', 'multitask')


def uses_head(mode):
  return mode in ('supervised', 'multitask')


def image_kwargs(image_cfg):
  kw = dict(image_cfg)
  variant = kw.get('variant')
  if variant:
    kw = {**decode_variant(variant), **{k: v for k, v in kw.items()
                                         if k != 'variant' and v is not None}}
    kw['variant'] = variant
  return kw


class Mofi(nn.Module):
  mode: str
  embed_dim: int
  image: dict
  text: Optional[dict] = None
  head: Optional[dict] = None
  logit_scale_init: float = 1 / 0.07
  logit_scale_max: float = 100.0
  dtype: str = 'float32'
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'   # the kernel: models/attention.py
  # LiT: the image tower is frozen (no gradient flows into it; optim.make leaves it
  # alone too), and the text tower (and head) learn to match it.
  lock_image: bool = False

  def setup(self):
    if self.mode not in MODES:
      raise ValueError(f'unknown mode {self.mode!r}; expected one of {MODES}')
    common = dict(dtype=DTYPES[self.dtype], scan=self.scan, remat=self.remat,
                  attention=self.attention)
    self.image_tower = VisionTower(self.embed_dim, **image_kwargs(self.image),
                                   **common)
    if uses_text(self.mode):
      self.text_tower = TextTower(self.embed_dim, **dict(self.text), **common)
      self.log_logit_scale = self.param(
          'log_logit_scale', nn.initializers.constant(
              math.log(self.logit_scale_init)), ())
    if uses_head(self.mode):
      self.entity_head = EntityHead(**dict(self.head))

  def encode_image(self, images):
    """images: CLIP-normalised float, or uint8 pixels (train batches) normalised here."""
    return self.image_tower(pixels.normalize(images)).astype(jnp.float32)

  def encode_text(self, tokens):
    return self.text_tower(tokens).astype(jnp.float32)

  def classify_image(self, images):
    """float32 [B, num_classes]: the entity head's logits (linear) or cosines (cosine head;
    the scale does not change the ranking), padding columns dropped. For evals of the
    model's own head (evals/classifier.py); training never forms these whole (losses.py)."""
    x = self.encode_image(images)
    head = self.entity_head(self.embed_dim)
    kernel = head['kernel'].astype(jnp.float32)
    if head['bias'] is not None:
      logits = x @ kernel + head['bias'].astype(jnp.float32)
    else:
      logits = losses.l2_normalize(x, axis=1) @ losses.l2_normalize(kernel, axis=0)
    return logits[:, :int(dict(self.head)['num_classes'])]

  def logit_scale(self):
    # exp(p), with gradient everywhere: the cap logit_scale_max is kept by
    # clamping p after each update (clamp_logit_scale, as open_clip does);
    # exp(min(p, cap)) would freeze the temperature for good once Adam
    # stepped past the cap.
    return jnp.exp(self.log_logit_scale)

  def embed(self, images, text=None):
    """The per-example outputs: the embeddings (what gradient accumulation splits)."""
    image_emb = self.encode_image(images)
    # stop_gradient: XLA then drops the image tower's backward pass altogether.
    out = {'image_emb': jax.lax.stop_gradient(image_emb) if self.lock_image else image_emb}
    if uses_text(self.mode):
      if text is None:
        raise ValueError(f'mode {self.mode!r} needs text tokens')
      out['text_emb'] = self.encode_text(text)
    return out

  def loss_params(self):
    """The outputs that are parameters of the loss, not of an example."""
    out = {}
    if uses_text(self.mode):
      out['logit_scale'] = self.logit_scale()
    if uses_head(self.mode):
      out['head'] = self.entity_head(self.embed_dim)
    return out

  def __call__(self, images, text=None):
    return {**self.embed(images, text), **self.loss_params()}


def clamp_logit_scale(params, logit_scale_max):
  """params with log_logit_scale clamped to [0, log(logit_scale_max)]."""
  if 'log_logit_scale' not in params:
    return params
  p = jnp.clip(params['log_logit_scale'], 0.0, math.log(logit_scale_max))
  return {**params, 'log_logit_scale': p}


def build(model_cfg):
  cfg = dict(model_cfg)
  return Mofi(**cfg)
