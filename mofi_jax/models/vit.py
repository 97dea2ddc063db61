"""ViT image tower (pre-LayerNorm, CLS or GAP pooling, projection to the shared space)."""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mofi_jax.models import layers, names

# width, depth, heads, mlp_dim (big_vision / CLIP presets).
PRESETS = {
    'Ti': (192, 12, 3, 768),
    'S': (384, 12, 6, 1536),
    'B': (768, 12, 12, 3072),
    'L': (1024, 24, 16, 4096),
    'H': (1280, 32, 16, 5120),
}


def decode_variant(variant):
  """'B/16' (or open_clip's 'ViT-B-16') -> dict(width=768, depth=12, num_heads=12,
  mlp_dim=3072, patch=16)."""
  size, patch = names.canonical_variant(variant).split('/')
  width, depth, heads, mlp = PRESETS[size]
  patch = int(patch)
  return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp,
              patch=patch)


def normal(stddev):
  return nn.initializers.normal(stddev=stddev)


class PatchEmbed(nn.Module):
  """A stride-`patch` `patch` x `patch` VALID convolution, computed as one matmul
  over the flattened patches. The kernel keeps nn.Conv's name and [p, p, C, D]
  layout (checkpoints and interop see no change). Why not nn.Conv: XLA:CPU runs
  the convolution's weight gradient as a dilated convolution at ~1 GFLOP/s,
  18% of a B/16 step (jax.profiler trace of benchmarks/train_step.py)."""
  width: int
  patch: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, (b, rows, cols, channels) = self.patch, images.shape
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, None, 'embed')),
        (p, p, channels, self.width))
    h, w = rows // p, cols // p
    patches = images[:, :h * p, :w * p].astype(self.dtype).reshape(
        b, h, p, w, p, channels)
    return jnp.einsum('bhpwqc,pqcd->bhwd', patches, kernel.astype(self.dtype))


class VisionTower(nn.Module):
  embed_dim: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch: int = 16
  pool: str = 'cls'
  act: str = 'gelu'
  ln_pre: bool = True
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = 'none'
  attention: str = 'xla'
  variant: Optional[str] = None  # informational; the fields above are what counts.

  @nn.compact
  def __call__(self, images):
    if self.pool not in ('cls', 'gap'):
      raise ValueError(f'unknown pool {self.pool!r}; expected cls or gap')
    x = PatchEmbed(self.width, self.patch, self.dtype, name='patch_embed')(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.pool == 'cls':
      cls = self.param('cls', nn.with_logical_partitioning(
          normal(c ** -0.5), ('embed',)), (c,))
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x],
                          axis=1)
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        normal(c ** -0.5), ('length', 'embed')), x.shape[1:])
    x = x + pos.astype(x.dtype)
    if self.ln_pre:
      x = layers.layer_norm(self.dtype, 'ln_pre')(x)
    x = layers.Encoder(self.depth, self.num_heads, self.mlp_dim, self.act,
                       self.dtype, self.scan, self.remat,
                       attention=self.attention, name='encoder')(x)
    x = layers.layer_norm(self.dtype, 'ln_post')(x)
    pooled = x[:, 0] if self.pool == 'cls' else x.mean(axis=1)
    return layers.dense(self.embed_dim, ('embed', 'proj'), self.dtype,
                        use_bias=False, name='proj')(pooled)
