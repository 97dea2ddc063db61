"""Multi-head attention, with the kernel chosen by `config.model.attention`.

  xla         jax.nn.dot_product_attention's XLA path: the reference
  head_major  the same math with q/k/v projected straight into [batch, heads,
              length, head_dim], so that the score and value matmuls batch over
              (batch, heads) with no transposes; faster on XLA:CPU (docs/benchmarks.md)
  cudnn       jax.nn.dot_product_attention's cuDNN fused kernel (GPU; bf16/fp16)
  splash      the Pallas splash-attention kernel (TPU), under shard_map over the
              mesh axes that shard batch and heads

Every kernel reads the same parameters: q/k/v/out kernels [width, width] with
biases, CLIP's layout, so checkpoints and HF interop do not depend on the
choice. Causal attention (the text tower) is a flag each kernel implements its
own way, not a mask tensor.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ('xla', 'head_major', 'cudnn', 'splash')
HEAD_MAJOR = ('head_major', 'splash')  # kernels that take [B, N, T, H]
PLATFORMS = {'cudnn': 'gpu', 'splash': 'tpu'}   # kernels bound to one platform
PROJECTION_NAMES = ('attn_q', 'attn_k', 'attn_v', 'attn_out')  # for remat policies
# splash names its forward residuals (output and log-sum-exp) so that a remat
# policy can keep them; then the backward never runs the forward kernel again.
CONTEXT_NAME = 'attn_context'
SPLASH_BLOCK = 128                     # splash tiles the sequence in blocks of this


def check_implementation(name):
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention {name!r}; expected one of {IMPLEMENTATIONS}')


class HeadsIn(nn.Module):
  """x [B, T, D] -> [B, T, N, H] or, head-major, [B, N, T, H]; a [D, D] kernel."""
  num_heads: int
  head_major: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ('embed', 'heads')), (width, width))
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('heads',)), (width,))
    shape = (self.num_heads, width // self.num_heads)
    kernel = kernel.astype(self.dtype).reshape(width, *shape)
    bias = bias.astype(self.dtype).reshape(shape)
    if self.head_major:
      y = jnp.einsum('btd,dnh->bnth', x.astype(self.dtype), kernel) + bias[:, None]
      y = nn.with_logical_constraint(y, ('batch', 'act_heads', 'length', 'kv'))
    else:
      y = jnp.einsum('btd,dnh->btnh', x.astype(self.dtype), kernel) + bias
      y = nn.with_logical_constraint(y, ('batch', 'length', 'act_heads', 'kv'))
    return checkpoint_name(y, f'attn_{self.name}')


class HeadsOut(nn.Module):
  """[B, T, N, H] (or head-major [B, N, T, H]) -> [B, T, D]; a [D, D] kernel."""
  head_major: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y):
    n, h = (y.shape[1], y.shape[3]) if self.head_major else y.shape[2:]
    width = n * h
    kernel = self.param('kernel', nn.with_logical_partitioning(
        nn.initializers.xavier_uniform(), ('heads', 'embed')), (width, width))
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('embed',)), (width,))
    kernel = kernel.astype(self.dtype).reshape(n, h, width)
    spec = 'bnth,nhd->btd' if self.head_major else 'btnh,nhd->btd'
    y = jnp.einsum(spec, y.astype(self.dtype), kernel) + bias.astype(self.dtype)
    return checkpoint_name(y, 'attn_out')


def attend(q, k, v, causal, implementation):
  """softmax(q k^T / sqrt(H)) v, in the layout `implementation` takes."""
  check_implementation(implementation)
  if implementation == 'head_major':
    return head_major_attention(q, k, v, causal)
  if implementation == 'splash':
    return splash_attention(q, k, v, causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                      implementation=implementation)


def head_major_attention(q, k, v, causal):
  """q, k, v [B, N, T, H]; softmax in float32, as the XLA reference does."""
  scores = jnp.einsum('bnqh,bnkh->bnqk', q * q.shape[-1] ** -0.5, k,
                      preferred_element_type=jnp.float32)
  if causal:
    t = scores.shape[-1]
    scores = jnp.where(jnp.tril(jnp.ones((t, t), jnp.bool_)), scores,
                       jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bnqk,bnkh->bnqh', probs, v)


def splash_attention(q, k, v, causal, interpret=False, fused_bwd=True):
  """q, k, v [B, N, T, H] -> [B, N, T, H] by the Pallas TPU kernel.

  The kernel tiles the sequence in SPLASH_BLOCK blocks, so T is padded up to a
  multiple of it; padded keys sit in their own segment, which real queries
  never see. Under a mesh the kernel runs per shard (a Pallas call cannot be
  partitioned by GSPMD): batch over the mesh axes of 'batch', heads over those
  of 'act_heads'. `interpret` runs the kernel in the Pallas interpreter (CPU).
  `fused_bwd=False` runs the backward as two kernels, dq and dkv (splash's
  default, kept to compare against).
  """
  t = q.shape[2]
  padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK

  def kernel_layout(x, name):
    """[B, N, T, H] -> the kernel's [B, N, H, padded], named for remat: the
    backward then reads the saved copy instead of padding and transposing again
    (the kernel's own transpose to sequence-minor cancels against this one)."""
    x = jnp.pad(jnp.swapaxes(x, -1, -2), ((0, 0), (0, 0), (0, 0), (0, padded - t)))
    return checkpoint_name(x, name)

  q, k, v = (kernel_layout(x, name) for x, name in
             zip((q * q.shape[-1] ** -0.5, k, v), PROJECTION_NAMES[:3]))
  segments = jnp.broadcast_to((jnp.arange(padded) < t).astype(jnp.int32),
                              (q.shape[0], padded))
  run = functools.partial(_splash_local, causal=causal, interpret=interpret,
                          fused_bwd=fused_bwd)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    batch, heads = (nn.logical_to_mesh_axes((name,))[0] for name in ('batch', 'act_heads'))
    spec = P(batch, heads, None, None)
    run = jax.shard_map(run, in_specs=(spec, spec, spec, P(batch, None)),
                        out_specs=spec, check_vma=False)
  return run(q, k, v, segments)[:, :, :t]


def _splash_local(q, k, v, segments, causal, interpret, fused_bwd):
  """The kernel over one shard's q, k, v [b, n, H, T] (vmapped over b)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  n, t = q.shape[1], q.shape[3]
  one = splash.CausalMask((t, t)) if causal else splash.FullMask((t, t))
  block = min(512, t)
  # The fused backward is one kernel for dq, dk and dv: q, k, v, do and the
  # log-sum-exp stream from HBM once, not once for dq and again for dk/dv.
  dq_blocks = {} if fused_bwd else dict(block_q_dq=block, block_kv_dq=block)
  # Sequence-minor q, k, v: [.., H, T] keeps the padded length (a multiple of
  # 128) in the TPU's 128 lanes; head_dim-minor would pad H=64 to 128 in HBM.
  seq_minor = splash.QKVLayout.SEQ_MINOR
  kernel = splash.make_splash_mha(
      splash.MultiHeadMask([one] * n), head_shards=1, q_seq_shards=1,
      block_sizes=splash.BlockSizes(
          block_q=block, block_kv=block, block_kv_compute=block,
          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
          use_fused_bwd_kernel=fused_bwd, **dq_blocks,
          q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor),
      residual_checkpoint_name=CONTEXT_NAME, interpret=interpret)
  ids = splash.SegmentIds(q=segments, kv=segments)
  q, k, v = (jnp.swapaxes(x, -1, -2) for x in (q, k, v))   # logically [b, n, T, H]
  return jax.vmap(kernel)(q, k, v, segment_ids=ids)


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32
  causal: bool = False
  implementation: str = 'xla'

  @nn.compact
  def __call__(self, x):
    check_implementation(self.implementation)
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by {self.num_heads} heads')
    head_major = self.implementation in HEAD_MAJOR
    q, k, v = (HeadsIn(self.num_heads, head_major, self.dtype, name=name)(x)
               for name in ('q', 'k', 'v'))
    y = attend(q, k, v, self.causal, self.implementation)
    return HeadsOut(head_major, self.dtype, name='out')(y)
