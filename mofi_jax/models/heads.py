"""The entity classification head over C (up to 2M+) classes.

The kernel is [embed_dim, C_pad], sharded over the `classes` logical axis; C_pad
rounds C up to `pad_multiple` so that it splits evenly over any likely device
count. Padded columns are masked out by the loss and by predictions. The head
only holds parameters: the logits are never formed whole (see losses.py).
"""
import math

import flax.linen as nn
import jax.numpy as jnp


def padded_classes(num_classes, pad_multiple):
  return int(math.ceil(num_classes / pad_multiple) * pad_multiple)


class EntityHead(nn.Module):
  num_classes: int
  kind: str = 'linear'           # 'linear' | 'cosine'
  pad_multiple: int = 1024
  bias_init: float = -10.0       # linear head: big-label-space init
  scale_init: float = 16.0       # cosine head: initial inverse temperature
  learn_scale: bool = True

  @nn.compact
  def __call__(self, embed_dim):
    c_pad = padded_classes(self.num_classes, self.pad_multiple)
    names = ('head_embed', 'classes')
    if self.kind == 'linear':
      # Zero kernel + negative bias: every class starts with a tiny, equal
      # probability, so the first steps do not fight 2M random logits.
      kernel = self.param('kernel', nn.with_logical_partitioning(
          nn.initializers.zeros, names), (embed_dim, c_pad))
      bias = self.param('bias', nn.with_logical_partitioning(
          nn.initializers.constant(self.bias_init), ('classes',)), (c_pad,))
      return dict(kernel=kernel, bias=bias, scale=None)
    if self.kind == 'cosine':
      # A zero kernel has no direction: cosine heads start random.
      kernel = self.param('kernel', nn.with_logical_partitioning(
          nn.initializers.normal(embed_dim ** -0.5), names), (embed_dim, c_pad))
      log_scale = self.param('log_scale', nn.initializers.constant(
          math.log(self.scale_init)), ())
      if not self.learn_scale:
        log_scale = jnp.asarray(math.log(self.scale_init))
      return dict(kernel=kernel, bias=None, scale=jnp.exp(log_scale))
    raise ValueError(f'unknown head kind {self.kind!r}; expected linear or cosine')
