"""MOFI's losses: the class-sharded, tiled entity cross-entropy, the global-batch
contrastive loss, and their weighted sum.

Entity cross-entropy over C classes (C ~ 2M) never forms the [batch, C] logits or
gathers the [dim, C] kernel. Each device holds a class shard of the kernel and
the image embeddings of the rows it needs (a [batch, dim] all-gather, small).
Inside a device the class shard is walked in tiles with an online log-sum-exp,
so peak memory is one [rows, tile] block, not [rows, C/devices]. The backward
pass recomputes each tile's logits from the saved log-sum-exp (as maxtext's
vocabulary tiling does) instead of storing them. Each row's target logit is
read from the tile's logits (a compare against the tile's columns), never
gathered from the kernel; the backward casts each tile's cotangent to the head
dtype (`loss.head_dtype`) and accumulates its products in float32.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from mofi_jax import sharding

NEG = -1e30  # masks padded classes; finite so the online max never sees inf - inf.
EPS = 1e-12


def l2_normalize(x, axis=-1):
  return x * lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + EPS)


def pick_tile(n, tile):
  """The largest divisor of n that is <= tile (shapes in a scan must be static)."""
  for t in range(min(n, tile), 0, -1):
    if n % t == 0:
      return t
  return n


@dataclasses.dataclass(frozen=True)
class _XentSpec:
  mesh: Mesh
  num_classes: int
  tile: int
  normalize_kernel: bool
  dtype: Any
  batch_axes: tuple
  class_axes: tuple
  gather_axes: tuple   # batch axes that are also class axes: rows gathered there
  keep_axes: tuple     # batch axes the classes are replicated over: rows stay split
  global_batch: int


def _tile_kernel(w, spec):
  return l2_normalize(w, axis=0) if spec.normalize_kernel else w


def _tile_logits(x, w, b, offset, spec):
  logits = jnp.dot(x.astype(spec.dtype), _tile_kernel(w, spec).astype(spec.dtype),
                   preferred_element_type=jnp.float32) + b
  cols = offset + jnp.arange(w.shape[1])
  return jnp.where(cols[None, :] < spec.num_classes, logits, NEG)


def _tile_targets(labels, weights, offset, tile):
  """[rows, tile]: each row's target weight on this tile's classes (0 elsewhere).

  A compare against the tile's columns, summed over the K labels: the target
  logit is read from the tile's logits, never gathered from the kernel."""
  cols = offset + jnp.arange(tile)
  hit = labels[:, :, None] == cols[None, None, :]           # -1 (padding) never hits
  return jnp.sum(jnp.where(hit, weights[:, :, None], 0.0), axis=1)


def _class_offset(kernel, spec):
  idx = 0
  for a in spec.class_axes:
    idx = idx * spec.mesh.shape[a] + lax.axis_index(a)
  return idx * kernel.shape[1]


def _tile(kernel, bias, i, spec):
  start = i * spec.tile
  return (start, lax.dynamic_slice_in_dim(kernel, start, spec.tile, axis=1),
          lax.dynamic_slice_in_dim(bias, start, spec.tile))


def _local_lse_and_target(x, kernel, bias, labels, weights, offset, spec):
  """Over this device's classes, one tile at a time: the log-sum-exp of each
  row's logits and sum_k w_k * logit[row, label_k] (labels held here)."""
  def body(i, carry):
    m, s, target = carry
    start, w, b = _tile(kernel, bias, i, spec)
    logits = _tile_logits(x, w, b, offset + start, spec)
    target += jnp.sum(logits * _tile_targets(labels, weights, offset + start, spec.tile),
                      axis=1)
    m_new = jnp.maximum(m, logits.max(axis=1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=1)
    return m_new, s, target
  rows = x.shape[0]
  init = (jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  m, s, target = lax.fori_loop(0, kernel.shape[1] // spec.tile, body, init)
  return m + jnp.log(s), target


def _gather_rows(spec, *arrays):
  if not spec.gather_axes:
    return arrays
  return tuple(lax.all_gather(a, spec.gather_axes, axis=0, tiled=True)
               for a in arrays)


def _fwd_local(spec, x, kernel, bias, labels, weights):
  x, labels, weights = _gather_rows(spec, x, labels, weights)
  offset = _class_offset(kernel, spec)
  lse_local, target = _local_lse_and_target(x, kernel, bias, labels, weights,
                                            offset, spec)
  m = lax.pmax(lse_local, spec.class_axes)
  lse = m + jnp.log(lax.psum(jnp.exp(lse_local - m), spec.class_axes))
  total = jnp.sum(lse - lax.psum(target, spec.class_axes))
  if spec.keep_axes:
    total = lax.psum(total, spec.keep_axes)
  return total / spec.global_batch, lse


def _tile_grads(x, w, dlogits, spec):
  """dx, dw of the tile's logits = x @ kernel(w); the cotangent in the head
  dtype, each product accumulated in float32."""
  g = dlogits.astype(spec.dtype)
  wk, kernel_vjp = jax.vjp(lambda w_: _tile_kernel(w_, spec), w)
  dx = jnp.dot(g, wk.astype(spec.dtype).T, preferred_element_type=jnp.float32)
  dwk = jnp.dot(x.astype(spec.dtype).T, g, preferred_element_type=jnp.float32)
  return dx, kernel_vjp(dwk)[0]


def _bwd_local(spec, x, kernel, bias, labels, weights, lse, g):
  x, labels, weights = _gather_rows(spec, x, labels, weights)
  offset = _class_offset(kernel, spec)
  coef = (g / spec.global_batch).astype(jnp.float32)

  def body(i, carry):
    dx, dk, db = carry
    start, w, b = _tile(kernel, bias, i, spec)
    logits = _tile_logits(x, w, b, offset + start, spec)
    # d(lse - target)/dlogits = softmax - target weights (padded columns: 0 - 0).
    dlogits = coef * (jnp.exp(logits - lse[:, None])
                      - _tile_targets(labels, weights, offset + start, spec.tile))
    dx_t, dw_t = _tile_grads(x, w, dlogits, spec)
    dk = lax.dynamic_update_slice_in_dim(dk, dw_t, start, axis=1)
    db = lax.dynamic_update_slice_in_dim(db, dlogits.sum(axis=0), start, axis=0)
    return dx + dx_t, dk, db
  init = (jnp.zeros(x.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32),
          jnp.zeros(bias.shape, jnp.float32))
  dx, dk, db = lax.fori_loop(0, kernel.shape[1] // spec.tile, body, init)
  # Rows were gathered over class shards: sum their partial gradients back.
  if spec.gather_axes:
    dx = lax.psum_scatter(dx, spec.gather_axes, scatter_dimension=0, tiled=True)
  rest = tuple(a for a in spec.class_axes if a not in spec.gather_axes)
  if rest:
    dx = lax.psum(dx, rest)
  if spec.keep_axes:  # the same classes saw different rows there.
    dk, db = lax.psum(dk, spec.keep_axes), lax.psum(db, spec.keep_axes)
  return dx.astype(x.dtype), dk.astype(kernel.dtype), db.astype(bias.dtype)


def _specs(spec):
  rows = P(spec.batch_axes, None)
  return dict(x=rows, kernel=P(None, spec.class_axes), bias=P(spec.class_axes),
              labels=rows, weights=rows, lse=P(spec.keep_axes or None))


def _shard_map(spec, fn, in_specs, out_specs):
  return jax.shard_map(lambda *a: fn(spec, *a), mesh=spec.mesh,
                       in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _xent_fwd(spec, x, kernel, bias, labels, weights):
  s = _specs(spec)
  loss, lse = _shard_map(
      spec, _fwd_local,
      (s['x'], s['kernel'], s['bias'], s['labels'], s['weights']),
      (P(), s['lse']))(x, kernel, bias, labels, weights)
  return loss, (x, kernel, bias, labels, weights, lse)


def _xent_bwd(spec, res, g):
  s = _specs(spec)
  dx, dk, db = _shard_map(
      spec, _bwd_local,
      (s['x'], s['kernel'], s['bias'], s['labels'], s['weights'], s['lse'], P()),
      (s['x'], s['kernel'], s['bias']))(*res, g)
  return dx, dk, db, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xent(spec, x, kernel, bias, labels, weights):
  return _xent_fwd(spec, x, kernel, bias, labels, weights)[0]


_xent.defvjp(_xent_fwd, _xent_bwd)


def entity_xent_sharded(x, kernel, bias, labels, weights, *, num_classes, mesh,
                        scale=None, normalize_kernel=False, tile_size=4096,
                        dtype=jnp.float32, batch_axes=None, class_axes=None):
  """Mean softmax cross-entropy of x @ kernel + bias against multi-hot targets.

  Args:
    x: [B, D] image embeddings, batch-sharded.
    kernel: [D, C_pad], class-sharded. bias: [C_pad] or None.
    labels: int [B, K] class indices, -1 for padding.
    weights: [B, K] target distribution over each row's labels (rows sum to 1).
    num_classes: real classes; columns >= num_classes are padding, masked out.
    scale: cosine head: x and the kernel columns are L2-normalised and the
      logits multiplied by `scale`.
    batch_axes, class_axes: mesh axes of the rows and the classes; default
      from the logical rule table.
  """
  batch_axes = batch_axes or sharding.mesh_axes('batch')
  class_axes = class_axes or sharding.mesh_axes('classes')
  n_class_shards = sharding.axes_size(mesh, class_axes)
  if kernel.shape[1] % n_class_shards:
    raise ValueError(f'{kernel.shape[1]} head classes do not split over '
                     f'{n_class_shards} class shards; raise head.pad_multiple')
  spec = _XentSpec(
      mesh=mesh, num_classes=num_classes,
      tile=pick_tile(kernel.shape[1] // n_class_shards, tile_size),
      normalize_kernel=normalize_kernel, dtype=dtype, batch_axes=batch_axes,
      class_axes=class_axes,
      gather_axes=tuple(a for a in batch_axes if a in class_axes),
      keep_axes=tuple(a for a in batch_axes if a not in class_axes),
      global_batch=x.shape[0])
  if scale is not None:
    x = l2_normalize(x) * scale
  if bias is None:
    bias = jnp.zeros(kernel.shape[1], jnp.float32)
  return _xent(spec, x, kernel, bias, labels, weights.astype(jnp.float32))


def contrastive_loss(image_emb, text_emb, logit_scale, *, mesh):
  """Symmetric InfoNCE over the global batch; each device scores its rows
  against the all-gathered embeddings of the other modality."""
  axes = sharding.mesh_axes('batch')
  rows = P(axes, None)
  global_batch = image_emb.shape[0]

  def local(img, txt, scale):
    all_img = lax.all_gather(img, axes, axis=0, tiled=True)
    all_txt = lax.all_gather(txt, axes, axis=0, tiled=True)
    idx = 0
    for a in axes:
      idx = idx * mesh.shape[a] + lax.axis_index(a)
    labels = idx * img.shape[0] + jnp.arange(img.shape[0])
    def xent(q, keys):
      logp = jax.nn.log_softmax(scale * q @ keys.T, axis=-1)
      return -jnp.take_along_axis(logp, labels[:, None], axis=1).sum()
    total = xent(img, all_txt) + xent(txt, all_img)
    return lax.psum(total, axes) / (2 * global_batch)

  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()),
                       out_specs=P())(l2_normalize(image_emb),
                                      l2_normalize(text_emb), logit_scale)


def mofi_loss(out, batch, *, loss_cfg, num_classes, mesh):
  """The weighted sum of the terms the model's mode produced."""
  terms = {}
  if 'head' in out:
    head = out['head']
    terms['entity_xent'] = entity_xent_sharded(
        out['image_emb'], head['kernel'], head['bias'], batch['labels'],
        batch['label_weights'], num_classes=num_classes, mesh=mesh,
        scale=head['scale'], normalize_kernel=head['scale'] is not None,
        tile_size=loss_cfg.tile_size, dtype=jnp.dtype(loss_cfg.head_dtype))
  if 'text_emb' in out:
    terms['contrastive'] = contrastive_loss(
        out['image_emb'], out['text_emb'], out['logit_scale'], mesh=mesh)
  weights = {'entity_xent': loss_cfg.entity_weight,
             'contrastive': loss_cfg.contrastive_weight}
  total = sum(weights[k] * v for k, v in terms.items())
  return total, terms
