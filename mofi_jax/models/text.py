"""CLIP-style causal text tower, pooled at the end-of-text token.

Where the <eot> token sits depends on the tokenizer, so `pool` says how to find it:
  last_nonpad  the last non-zero id (ours: `<bos> ... <eot>` then 0-padding)
  first_eot    the first occurrence of `eot_id` (Hugging Face CLIP, whose
               tokenizers may pad with <eot> itself or use id 0 for a real token)
  max_id       the largest id (Hugging Face's legacy rule for configs with
               eos_token_id == 2: OpenAI CLIP's <eot> is the last vocabulary id)
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mofi_jax.models import layers


class TextTower(nn.Module):
  embed_dim: int
  vocab_size: int
  context: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  act: str = 'gelu'
  pool: str = 'last_nonpad'
  eot_id: int = -1        # the <eot> id, for pool='first_eot'
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'

  @nn.compact
  def __call__(self, tokens):
    """tokens: int [B, L], <eot> where `pool` finds it; L <= context."""
    if tokens.shape[-1] > self.context:
      raise ValueError(f'text length {tokens.shape[-1]} exceeds the text '
                       f'tower context {self.context}')
    embed = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, name='token_embedding',
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ('vocab', 'embed')))
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ('length', 'embed')),
                     (self.context, self.width))
    length = tokens.shape[-1]
    x = embed(tokens) + pos[:length].astype(self.dtype)
    x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.act,
                       self.dtype, self.scan, self.remat, causal=True,
                       attention=self.attention, name='encoder')(x)
    x = layers.layer_norm(self.dtype, 'ln_final')(x)
    eot = eot_positions(tokens, self.pool, self.eot_id)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return layers.dense(self.embed_dim, ('embed', 'proj'), self.dtype,
                        use_bias=False, name='proj')(pooled)


POOLS = ('last_nonpad', 'first_eot', 'max_id')


def eot_positions(tokens, pool, eot_id=-1):
  """int [B]: the index of each row's <eot> token under the `pool` rule."""
  if pool == 'last_nonpad':
    return jnp.maximum(jnp.count_nonzero(tokens, axis=-1) - 1, 0)
  if pool == 'first_eot':
    if eot_id < 0:
      raise ValueError("text pool 'first_eot' needs eot_id (the <eot> token id)")
    return jnp.argmax(tokens == eot_id, axis=-1)   # 0 when absent, as in HF
  if pool == 'max_id':
    return jnp.argmax(tokens, axis=-1)             # first maximum, as torch's
  raise ValueError(f'unknown text pool {pool!r}; expected one of {POOLS}')
