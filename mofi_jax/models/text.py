"""CLIP-style causal text tower, pooled at the end-of-text token."""
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
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'

  @nn.compact
  def __call__(self, tokens):
    """tokens: int [B, L], 0-padded after <eot>; L <= context."""
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
    mask = nn.make_causal_mask(tokens, dtype=jnp.bool_)
    x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.act,
                       self.dtype, self.scan, self.remat, name='encoder')(x, mask)
    x = layers.layer_norm(self.dtype, 'ln_final')(x)
    # The tokenizer ends every text with <eot> followed by padding (id 0).
    eot = jnp.maximum(jnp.count_nonzero(tokens, axis=-1) - 1, 0)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return layers.dense(self.embed_dim, ('embed', 'proj'), self.dtype,
                        use_bias=False, name='proj')(pooled)
