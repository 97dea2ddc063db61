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
from jax.ad_checkpoint import checkpoint_name

from mofi_jax.models.attention import CONTEXT_NAME, PROJECTION_NAMES, Attention

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


# The names are Hugging Face's (ACT2FN), so that the exporter maps them one-to-one.
ACTIVATIONS = ('gelu', 'quick_gelu', 'gelu_pytorch_tanh')


def activation(name):
  if name == 'gelu':
    return functools.partial(nn.gelu, approximate=False)
  if name == 'quick_gelu':  # OpenAI CLIP's.
    return lambda x: x * nn.sigmoid(1.702 * x)
  if name == 'gelu_pytorch_tanh':  # big_vision's; cheaper than erf on CPU.
    return functools.partial(nn.gelu, approximate=True)
  raise ValueError(f'unknown activation {name!r}; expected one of {ACTIVATIONS}')


class Mlp(nn.Module):
  mlp_dim: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = checkpoint_name(dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, name='fc1')(x),
                        'mlp_hidden')
    y = nn.with_logical_constraint(activation(self.act)(y),
                                   ('batch', 'length', 'act_mlp'))
    return checkpoint_name(dense(width, ('mlp', 'embed'), self.dtype, name='fc2')(y),
                           'mlp_out')


class Block(nn.Module):
  """x + attn(ln1(x)); x + mlp(ln2(x)). Scan-compatible: carry -> (carry, None)."""
  num_heads: int
  mlp_dim: int
  act: str = 'gelu'
  dtype: Dtype = jnp.float32
  causal: bool = False
  attention: str = 'xla'

  @nn.compact
  def __call__(self, x):
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    y = layer_norm(self.dtype, 'ln1')(x)
    x = x + Attention(self.num_heads, self.dtype, self.causal, self.attention,
                      name='attn')(y)
    y = layer_norm(self.dtype, 'ln2')(x)
    x = x + Mlp(self.mlp_dim, self.act, self.dtype, name='mlp')(y)
    return nn.with_logical_constraint(x, ('batch', 'length', 'act_embed')), None


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Every projection's output by name, and splash's [B, N, T, H] output and
    # [B, N, T] log-sum-exp; never attention scores or probabilities, whichever
    # kernel computes them (a fused kernel's are not dots at all).
    'projections': jax.checkpoint_policies.save_only_these_names(
        *PROJECTION_NAMES, CONTEXT_NAME, 'mlp_hidden', 'mlp_out'),
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
  causal: bool = False
  attention: str = 'xla'

  @nn.compact
  def __call__(self, x):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'unknown remat policy {self.remat!r}; expected one of '
                       f'{sorted(REMAT_POLICIES)}')
    block = Block
    if self.remat != 'none':
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat],
                       prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act,
              dtype=self.dtype, causal=self.causal, attention=self.attention)
    if self.scan:
      stack = nn.scan(block, variable_axes={'params': 0},
                      split_rngs={'params': True}, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(**kw, name='layers')(x)
    else:
      for i in range(self.depth):
        x, _ = block(**kw, name=f'layers_{i}')(x)
    return x
