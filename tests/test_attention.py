"""mofi_jax/models/attention.py: every kernel against a float64 NumPy reference,
splash (in the Pallas interpreter, and sharded under a mesh) against XLA in value
and gradient, splash compiled for a TPU topology, and the remat policy that never
saves attention scores."""
import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mofi_jax import sharding
from mofi_jax.models import attention, layers

B, T, N, H = 2, 13, 2, 8   # T is not a multiple of anything: splash must pad


def numpy_attention(q, k, v, causal=False):
  """float64 reference: q, k, v [B, T, N, H] -> [B, T, N, H]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    t = s.shape[-1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnqk,bknh->bqnh', p, v)


def numpy_module(params, x, num_heads, causal):
  """The whole Attention module in float64 from its [D, D] kernels."""
  x = np.asarray(x, np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  heads = lambda n: (x @ p[n]['kernel'] + p[n]['bias']).reshape(
      *x.shape[:2], num_heads, -1)
  y = numpy_attention(heads('q'), heads('k'), heads('v'), causal)
  return y.reshape(x.shape) @ p['out']['kernel'] + p['out']['bias']


def random_qkv(seed=0, shape=(B, T, N, H)):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, shape, jnp.float32) for key in keys]


@pytest.mark.parametrize('implementation', ['xla', 'head_major'])
@pytest.mark.parametrize('causal', [False, True])
def test_module_matches_float64_numpy(implementation, causal):
  x = jax.random.normal(jax.random.key(1), (B, T, N * H))
  module = attention.Attention(N, causal=causal, implementation=implementation)
  params = nn.unbox(module.init(jax.random.key(0), x)['params'])
  got = module.apply({'params': params}, x)
  np.testing.assert_allclose(got, numpy_module(params, x, N, causal), rtol=1e-5, atol=1e-5)


def test_every_kernel_reads_the_same_parameter_tree():
  x = jnp.zeros((B, T, N * H))
  shapes = {impl: jax.tree.map(jnp.shape, nn.unbox(jax.eval_shape(
      attention.Attention(N, implementation=impl).init, jax.random.key(0), x)))
            for impl in ('xla', 'head_major', 'splash')}   # cudnn: xla's layout, needs a GPU
  want = {'params': {name: {'kernel': (N * H, N * H), 'bias': (N * H,)}
                     for name in ('q', 'k', 'v', 'out')}}
  assert all(tree == want for tree in shapes.values()), shapes


def test_unknown_kernel_is_named():
  with pytest.raises(ValueError, match=r"unknown attention 'flash'; expected one of"):
    attention.Attention(N, implementation='flash').init(jax.random.key(0), jnp.zeros((1, 4, 16)))


def head_major(*arrays):
  return [a.transpose(0, 2, 1, 3) for a in arrays]


def splash_and_reference_grads(q, k, v, causal, splash_fn):
  """(value, d/dq, d/dk, d/dv) of a random projection, splash vs head-major XLA."""
  w = jax.random.normal(jax.random.key(9), q.shape)
  loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * w)
  ref = lambda q, k, v: attention.head_major_attention(q, k, v, causal)
  return [jax.value_and_grad(loss(f), argnums=(0, 1, 2))(q, k, v) for f in (splash_fn, ref)]


@pytest.mark.parametrize('causal', [False, True])
def test_splash_kernel_matches_reference_in_value_and_gradient(causal):
  q, k, v = head_major(*random_qkv())
  got = attention.splash_attention(q, k, v, causal, interpret=True)
  want = numpy_attention(*head_major(q, k, v), causal)
  np.testing.assert_allclose(got, np.asarray(want).transpose(0, 2, 1, 3), rtol=1e-4, atol=1e-4)
  splash = lambda q, k, v: attention.splash_attention(q, k, v, causal, interpret=True)
  (val, grads), (ref_val, ref_grads) = splash_and_reference_grads(q, k, v, causal, splash)
  np.testing.assert_allclose(val, ref_val, rtol=1e-4)
  for g, r in zip(grads, ref_grads):   # the padded keys must get no gradient share
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_splash_under_a_mesh_runs_per_shard_and_matches_unsharded():
  """batch over data x fsdp, heads over model: 2 x 2 x 2 CPU devices."""
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'model': 2}, jax.devices()[:8])
  sharding.activate(mesh)
  q, k, v = head_major(*random_qkv(shape=(4, T, 2, H)))
  spec = sharding.logical_sharding(mesh, ('batch', 'act_heads', 'length', 'kv'))
  q, k, v = (jax.device_put(a, spec) for a in (q, k, v))
  fn = jax.jit(lambda q, k, v: attention.splash_attention(q, k, v, True, interpret=True))
  assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v))
  got = fn(q, k, v)
  jax.set_mesh(None)
  want = attention.head_major_attention(*(np.asarray(a) for a in (q, k, v)), True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def saved_residuals_text(module, x):
  params = module.init(jax.random.key(0), x)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(lambda p: jnp.sum(module.apply(p, x)), params)
  return out.getvalue()


@pytest.mark.parametrize('implementation', ['xla', 'head_major'])
def test_projections_policy_saves_no_attention_scores(implementation):
  """Scores and probabilities end in [..., T, T] (xla groups them as
  [B, K, G, T, T]): saved without remat, never under 'projections'."""
  t = 7
  x = jax.random.normal(jax.random.key(1), (B, t, N * H))
  enc = lambda remat: layers.Encoder(depth=2, num_heads=N, mlp_dim=32, remat=remat,
                                     attention=implementation)
  scores = f',{t},{t}]'
  plain = saved_residuals_text(enc('none'), x)
  assert scores in plain, plain
  saved = saved_residuals_text(enc('projections'), x)
  assert scores not in saved, saved
  assert f'[{B},{t},{N * H}]' in saved      # ... but it does keep the projections


def test_projections_policy_keeps_splash_inputs_and_context():
  """Under 'projections' the splash backward reads saved q/k/v in the kernel's
  padded sequence-minor layout [B, N, H, 128] and the forward's [B, N, 128, H]
  output (the kernel does not run again), and the gradient is unchanged."""
  q, k, v = head_major(*random_qkv())
  splash = lambda q, k, v: attention.splash_attention(q, k, v, False, interpret=True)
  kept = jax.checkpoint(splash, policy=layers.REMAT_POLICIES['projections'])
  (val, grads), (ref_val, ref_grads) = splash_and_reference_grads(q, k, v, False, kept)
  np.testing.assert_allclose(val, ref_val, rtol=1e-4)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(lambda *a: jnp.sum(kept(*a)), q, k, v)
  saved = out.getvalue()
  padded = attention.SPLASH_BLOCK
  for name in attention.PROJECTION_NAMES[:3]:
    assert f"[{B},{N},{H},{padded}] named '{name}'" in saved, saved
  # The kernel's output and log-sum-exp (named inside its jit, so printed as
  # its outputs).
  assert f'f32[{B},{N},{padded},{H}] output of' in saved, saved
  assert f'f32[{B},{N},{padded}] output of' in saved, saved
  assert f',{padded},{padded}]' not in saved, saved


def test_projections_policy_does_not_change_gradients():
  x = jax.random.normal(jax.random.key(1), (B, 7, N * H))
  enc = lambda remat: layers.Encoder(depth=2, num_heads=N, mlp_dim=32, scan=True,
                                     remat=remat, attention='head_major')
  params = enc('none').init(jax.random.key(0), x)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grad(enc('none'))), jax.tree.leaves(grad(enc('projections')))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name, needed', [('splash', 'TPU'), ('cudnn', 'GPU')])
def test_a_kernel_off_its_platform_is_a_config_error(name, needed):
  """train.py refuses splash on CPU devices before any compile, naming the key
  and what does run there; the kernels that run anywhere pass."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from mofi_jax import run_setup  # pylint: disable=g-import-not-at-top
  c = demo.get_config('multitask')
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:2])
  for ok in ('xla', 'head_major'):
    c.model.attention = ok
    run_setup.check_attention_platform(c, mesh)
  c.model.attention = name
  with pytest.raises(run_setup.ConfigError) as e:
    run_setup.check_attention_platform(c, mesh)
  assert str(e.value) == (
      f"config.model.attention={name!r} runs only on {needed} devices; these are "
      "CPU: set --config.model.attention to one of ['xla', 'head_major']")
