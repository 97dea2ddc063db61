"""Entity and contrastive losses vs float64 NumPy references, on 1 and 8 devices."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hlo_utils import collective_shapes
from mofi_jax import losses, sharding

MESHES = {
    'one_device': dict(data=1, fsdp=1, model=1),
    'fsdp8': dict(data=1, fsdp=-1, model=1),
    'data2_fsdp2_model2': dict(data=2, fsdp=2, model=2),
}


def make_mesh(name):
  cfg = MESHES[name]
  devices = jax.devices()[:1] if name == 'one_device' else jax.devices()
  return sharding.make_mesh(cfg, devices)


def problem(rng, b=16, d=8, c_pad=256, c=250, k=3):
  x = rng.normal(size=(b, d)).astype(np.float32)
  kernel = (rng.normal(size=(d, c_pad)) * 0.5).astype(np.float32)
  bias = rng.normal(size=(c_pad,)).astype(np.float32)
  labels = rng.integers(0, c, size=(b, k)).astype(np.int32)
  labels[:, -1] = -1              # padding slot
  labels[0, 1] = -1               # a row with a single label
  labels[1, 1] = labels[1, 0]     # a repeated label: weights add up
  weights = (labels >= 0).astype(np.float32)
  weights /= weights.sum(1, keepdims=True)
  return x, kernel, bias, labels, weights, c


def numpy_xent(x, kernel, bias, labels, weights, c):
  """float64 value and analytic gradients of the multi-hot softmax xent."""
  x, kernel, bias = (np.float64(a) for a in (x, kernel, bias))
  b = x.shape[0]
  logits = x @ kernel + bias
  logits[:, c:] = -np.inf
  m = logits.max(1, keepdims=True)
  p = np.exp(logits - m)
  p /= p.sum(1, keepdims=True)
  lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
  target = np.zeros_like(logits)
  for r in range(b):
    for lab, w in zip(labels[r], weights[r]):
      if lab >= 0:
        target[r, lab] += w
  finite = np.where(np.isfinite(logits), logits, 0.0)
  loss = np.mean(lse - np.sum(target * finite, 1))
  dlogits = (p - target) / b
  return loss, (dlogits @ kernel.T, x.T @ dlogits, dlogits.sum(0))


def rel_err(a, ref):
  return float(np.max(np.abs(np.float64(a) - ref)) / (np.max(np.abs(ref)) + 1e-30))


@pytest.mark.parametrize('mesh_name', list(MESHES))
@pytest.mark.parametrize('tile', [8, 12, 4096])   # divides, does not divide, > shard
def test_linear_head_matches_float64_reference(mesh_name, tile):
  mesh = make_mesh(mesh_name)
  x, kernel, bias, labels, weights, c = problem(np.random.default_rng(0))
  fn = lambda x, k, b: losses.entity_xent_sharded(
      x, k, b, labels, weights, num_classes=c, mesh=mesh, tile_size=tile)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, kernel, bias)
  ref_value, ref_grads = numpy_xent(x, kernel, bias, labels, weights, c)
  assert abs(float(value) - ref_value) / abs(ref_value) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5
  # Padded classes get no gradient at all.
  assert np.all(np.asarray(grads[1])[:, c:] == 0)


def dot_operand_dtypes(jaxpr):
  """The operand dtypes of every dot_general in a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        sub = getattr(sub, 'jaxpr', sub)
        if isinstance(sub, jax.extend.core.Jaxpr):
          found += dot_operand_dtypes(sub)
  return found


def test_bf16_head_matmuls_are_bf16_forward_and_backward_and_close_to_float64():
  """head_dtype bfloat16: every matmul of the loss, the backward's included
  (the cotangent is cast), takes bf16 operands; fp32 accumulation keeps the
  result within bf16 rounding of the float64 reference. The target logit
  comes from the tile's logits: no gather of kernel columns."""
  mesh = make_mesh('fsdp8')
  x, kernel, bias, labels, weights, c = problem(np.random.default_rng(2))
  fn = lambda x, k, b: losses.entity_xent_sharded(
      x, k, b, labels, weights, num_classes=c, mesh=mesh, tile_size=8,
      dtype=jnp.bfloat16)
  grad_fn = jax.value_and_grad(fn, argnums=(0, 1, 2))
  jaxpr = jax.make_jaxpr(grad_fn)(x, kernel, bias).jaxpr
  dots = dot_operand_dtypes(jaxpr)
  # forward logits; backward: logits recomputed, dx, dw.
  assert len(dots) == 4 and set(dots) == {('bfloat16', 'bfloat16')}, dots
  assert not re.search(r'\bgather\[', str(jaxpr))    # (all_gather of rows is fine)
  value, grads = jax.jit(grad_fn)(x, kernel, bias)
  ref_value, ref_grads = numpy_xent(x, kernel, bias, labels, weights, c)
  assert abs(float(value) - ref_value) / abs(ref_value) < 1e-2
  for g, r in zip(grads, ref_grads):
    assert 1e-6 < rel_err(g, r) < 2e-2    # bf16-rounded, not fp32-exact


def test_classes_replicated_over_a_batch_axis():
  """class_axes=('model',): rows stay split over data/fsdp, partial kernel
  gradients are summed across them."""
  mesh = make_mesh('data2_fsdp2_model2')
  x, kernel, bias, labels, weights, c = problem(np.random.default_rng(1))
  fn = lambda x, k, b: losses.entity_xent_sharded(
      x, k, b, labels, weights, num_classes=c, mesh=mesh, tile_size=16,
      class_axes=('model',))
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(x, kernel, bias)
  ref_value, ref_grads = numpy_xent(x, kernel, bias, labels, weights, c)
  assert abs(float(value) - ref_value) / abs(ref_value) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5


def test_cosine_head_matches_dense_autodiff():
  mesh = make_mesh('fsdp8')
  x, kernel, _, labels, weights, c = problem(np.random.default_rng(2))
  scale = np.float32(7.0)

  def sharded(x, k, s):
    return losses.entity_xent_sharded(
        x, k, None, labels, weights, num_classes=c, mesh=mesh, scale=s,
        normalize_kernel=True, tile_size=8)

  def dense(x, k, s):  # an independent dense formulation
    xn = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    kn = k / jnp.linalg.norm(k, axis=0, keepdims=True)
    logits = jnp.where(jnp.arange(k.shape[1]) < c, s * xn @ kn, -jnp.inf)
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0), 1)
    return -jnp.mean(jnp.sum(jnp.where(labels >= 0, weights * picked, 0), 1))

  v, g = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(x, kernel, scale)
  rv, rg = jax.value_and_grad(dense, argnums=(0, 1, 2))(x, kernel, scale)
  assert abs(float(v) - float(rv)) / abs(float(rv)) < 1e-5
  for a, r in zip(g, rg):
    assert rel_err(a, np.float64(r)) < 1e-5


def numpy_contrastive(img, txt, scale):
  img = np.float64(img) / np.linalg.norm(img, axis=1, keepdims=True)
  txt = np.float64(txt) / np.linalg.norm(txt, axis=1, keepdims=True)
  logits = scale * img @ txt.T
  def xent(l):
    l = l - l.max(1, keepdims=True)
    return -np.mean(np.diag(l) - np.log(np.exp(l).sum(1)))
  return (xent(logits) + xent(logits.T)) / 2


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_contrastive_matches_reference(mesh_name):
  mesh = make_mesh(mesh_name)
  rng = np.random.default_rng(3)
  img = rng.normal(size=(16, 8)).astype(np.float32)
  txt = (img + rng.normal(size=(16, 8))).astype(np.float32)
  scale = np.float32(10.0)
  fn = lambda i, t, s: losses.contrastive_loss(i, t, s, mesh=mesh)
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(img, txt, scale)
  assert abs(float(value) - numpy_contrastive(img, txt, 10.0)) < 1e-5
  # Gradient: central differences of the float64 reference on a few entries.
  eps = 1e-4
  for (i, j) in [(0, 0), (5, 3), (15, 7)]:
    up, down = img.copy().astype(np.float64), img.copy().astype(np.float64)
    up[i, j] += eps
    down[i, j] -= eps
    fd = (numpy_contrastive(up, txt, 10.0) - numpy_contrastive(down, txt, 10.0)) / (2 * eps)
    assert abs(float(grads[0][i, j]) - fd) < 1e-4
  fd_scale = (numpy_contrastive(img, txt, 10.0 + eps) -
              numpy_contrastive(img, txt, 10.0 - eps)) / (2 * eps)
  assert abs(float(grads[2]) - fd_scale) < 1e-4


def chunked_reference(x, kernel, bias, labels, c, chunk=200_000):
  """float64 loss for single-label rows, without forming [B, C] at once."""
  x = np.float64(x)
  m = np.full(x.shape[0], -np.inf)
  s = np.zeros(x.shape[0])
  for start in range(0, c, chunk):
    lg = x @ np.float64(kernel[:, start:start + chunk]) + bias[start:start + chunk]
    m_new = np.maximum(m, lg.max(1))
    s = s * np.exp(m - m_new) + np.exp(lg - m_new[:, None]).sum(1)
    m = m_new
  lse = m + np.log(s)
  target = np.einsum('bd,db->b', x, np.float64(kernel[:, labels])) + bias[labels]
  return np.mean(lse - target), lse


@pytest.fixture(scope='module')
def two_million():
  mesh = make_mesh('fsdp8')
  c, d, b = 2_000_000, 64, 64
  rng = np.random.default_rng(4)
  x = rng.normal(size=(b, d)).astype(np.float32)
  kernel = (rng.normal(size=(d, c)) * 0.05).astype(np.float32)
  bias = np.zeros(c, np.float32)
  labels = rng.integers(0, c, size=(b,)).astype(np.int32)
  return mesh, x, kernel, bias, labels, c


def _two_million_fn(mesh, labels, c, tile):
  lab = labels[:, None]
  w = np.ones_like(lab, np.float32)
  return lambda x, k, b: losses.entity_xent_sharded(
      x, k, b, lab, w, num_classes=c, mesh=mesh, tile_size=tile)


def test_two_million_classes_forward_backward(two_million):
  mesh, x, kernel, bias, labels, c = two_million
  fn = jax.jit(jax.value_and_grad(_two_million_fn(mesh, labels, c, 8192),
                                  argnums=(0, 1, 2)))
  value, (dx, dk, db) = fn(x, kernel, bias)
  ref, lse = chunked_reference(x, kernel, bias, labels, c)
  assert abs(float(value) - ref) / ref < 1e-5
  # Spot-check the kernel gradient on the label columns and random columns.
  cols = np.concatenate([labels[:4], np.random.default_rng(5).integers(0, c, 4)])
  p = np.exp(np.float64(x) @ np.float64(kernel[:, cols]) - lse[:, None])
  onehot = (labels[:, None] == cols[None, :]).astype(np.float64)
  ref_dk = np.float64(x).T @ (p - onehot) / x.shape[0]
  assert rel_err(np.asarray(dk)[:, cols], ref_dk) < 1e-4
  assert np.all(np.isfinite(np.asarray(dx)))


def test_no_class_sized_collectives_and_tile_bounded_memory(two_million):
  mesh, x, kernel, bias, labels, c = two_million
  local_classes = c // 8
  temps = {}
  for tile in (2048, 16384):
    compiled = jax.jit(jax.value_and_grad(
        _two_million_fn(mesh, labels, c, tile), argnums=(0, 1, 2))).lower(
            x, kernel, bias).compile()
    shapes = collective_shapes(compiled.as_text())
    assert shapes, 'expected the row all-gather and the lse reductions'
    # No collective carries a class-sized dimension: neither the [B, C]
    # logits nor the [D, C] kernel (nor a per-device slice of them) moves.
    assert all(max(s, default=0) < local_classes for s in shapes), shapes
    temps[tile] = compiled.memory_analysis().temp_size_in_bytes
  full_local_logits = x.shape[0] * local_classes * 4
  # Temporaries are bounded by tiles, far below one device's full logits...
  assert temps[16384] < full_local_logits / 4, temps
  # ...and they grow with the tile, which is what bounds them.
  assert temps[2048] < temps[16384]


@pytest.mark.parametrize('weights', [(1.0, 1.0), (0.3, 2.5), (0.0, 1.0)])
def test_mofi_loss_is_the_weighted_sum_of_the_float64_terms(weights):
  """The multi-task total, by value: entity_weight * xent + contrastive_weight * contrastive,
  each term against its float64 reference (a swapped or dropped weight fails)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  mesh = make_mesh('one_device')
  rng = np.random.default_rng(11)
  x, kernel, bias, labels, label_weights, c = problem(rng)
  txt = (x + rng.normal(size=x.shape)).astype(np.float32)
  loss_cfg = ml_collections.ConfigDict(dict(
      tile_size=64, head_dtype='float32', entity_weight=weights[0],
      contrastive_weight=weights[1]))
  out = dict(image_emb=x, text_emb=txt, logit_scale=np.float32(7.0),
             head=dict(kernel=kernel, bias=bias, scale=None))
  batch = dict(labels=labels, label_weights=label_weights)
  total, terms = jax.jit(lambda o, b: losses.mofi_loss(
      o, b, loss_cfg=loss_cfg, num_classes=c, mesh=mesh))(out, batch)
  xent = numpy_xent(x, kernel, bias, labels, label_weights, c)[0]
  contrastive = numpy_contrastive(x, txt, 7.0)
  assert float(terms['entity_xent']) == pytest.approx(xent, rel=1e-5)
  assert float(terms['contrastive']) == pytest.approx(contrastive, rel=1e-5)
  assert float(total) == pytest.approx(weights[0] * xent + weights[1] * contrastive, rel=1e-5)
