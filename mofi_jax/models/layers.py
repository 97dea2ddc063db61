"""Pre-LayerNorm transformer pieces shared by the image and text towers.

Parameters are float32 and carry logical axis names; `dtype` is the compute
dtype. The layout (separate q/k/v/out projections with biases, fc1/fc2) mirrors
CLIP's so that weights convert one-to-one to and from Hugging Face.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dense(features, names, dtype, use_bias=True, kernel_init=None, name=None):
  kernel_init = kernel_init or nn.initializers.xavier_uniform()
  return nn.Dense(
      features, dtype=dtype, use_bias=use_bias, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


def layer_norm(dtype, name=None):
  return nn.LayerNorm(
      epsilon=1e-5, dtype=dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


def activation(name):
  if name == 'gelu':
    return functools.partial(nn.gelu, approximate=False)
  if name == 'quick_gelu':  # OpenAI CLIP's.
    return lambda x: x * nn.sigmoid(1.702 * x)
  raise ValueError(f'unknown activation {name!r}; expected gelu or quick_gelu')


class Attention(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by {self.num_heads} heads')
    head_dim = width // self.num_heads
    def proj(name):
      y = dense(width, ('embed', 'heads'), self.dtype, name=name)(x)
      y = y.reshape(*y.shape[:-1], self.num_heads, head_dim)
      return nn.with_logical_constraint(y, ('batch', 'length', 'act_heads', 'kv'))
    q, k, v = proj('q'), proj('k'), proj('v')
    y = jax.nn.dot_product_attention(q, k, v, mask=mask)
    y = y.reshape(*y.shape[:-2], width)
    return dense(width, ('heads', 'embed'), self.dtype, name='out')(y)


class Mlp(nn.Module):
  mlp_dim: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, name='fc1')(x)
    y = nn.with_logical_constraint(activation(self.act)(y),
                                   ('batch', 'length', 'act_mlp'))
    return dense(width, ('mlp', 'embed'), self.dtype, name='fc2')(y)


class Block(nn.Module):
  """x + attn(ln1(x)); x + mlp(ln2(x)). Scan-compatible: (carry, mask) -> (carry, None)."""
  num_heads: int
  mlp_dim: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    y = layer_norm(self.dtype, 'ln1')(x)
    x = x + Attention(self.num_heads, self.dtype, name='attn')(y, mask)
    y = layer_norm(self.dtype, 'ln2')(x)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name='mlp')(y)
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed')), None


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Encoder(nn.Module):
  """A stack of `depth` blocks, optionally scanned and rematerialised."""
  depth: int
  num_heads: int
  mlp_dim: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32
  scan: bool = False
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, mask=None):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'unknown remat policy {self.remat!r}; expected one of '
                       f'{sorted(REMAT_POLICIES)}')
    block = Block
    if self.remat != 'none':
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat],
                       prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act,
              dtype=self.dtype)
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True}, in_axes=nn.broadcast,
                      length=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**kw, name='layers')(x, mask)
    else:
      for i in range(self.depth):
        x, _ = block(**kw, name=f'layers_{i}')(x, mask)
    return x
