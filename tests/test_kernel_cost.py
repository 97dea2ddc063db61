"""kernel_cost: the splash kernels' FLOPs and re-read bytes, read back from a
compiled TPU program, against the count from the shapes (compile-only, on a
v5e device that libtpu describes; no TPU is attached)."""
import jax
import jax.numpy as jnp
import pytest

from mofi_jax import kernel_cost, step_analysis, tpu_specs
from mofi_jax.models import attention
from test_aot import needs_libtpu

B, N, H = 2, 2, 64


def compile_grad(t, fused_bwd=True):
  """d/d(q, k, v) of splash attention on one v5e chip, [B, N, t, H] bf16."""
  device = tpu_specs.devices(tpu_specs.parse('v5e:2x2'))[0]
  x = jax.ShapeDtypeStruct((B, N, t, H), jnp.bfloat16,
                           sharding=jax.sharding.SingleDeviceSharding(device))
  loss = lambda q, k, v: attention.splash_attention(
      q, k, v, False, fused_bwd=fused_bwd).astype(jnp.float32).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()


@needs_libtpu
@pytest.mark.parametrize('fused_bwd, phases, matmuls', [
    (True, ['fused_bwd', 'fwd'], 2 + 5), (False, ['dkv', 'dq', 'fwd'], 2 + 3 + 4)])
@pytest.mark.parametrize('t, padded, passes', [(197, 256, 1), (1024, 1024, 2)])
def test_splash_grad_cost_from_shapes(t, padded, passes, fused_bwd, phases, matmuls):
  """197 tokens pad to one 256 block; 1024 tokens run in two 512 blocks, so
  each kernel streams the other sequence's operands a second time. The fused
  backward is one kernel of 5 matmuls in place of dq's 3 and dkv's 4."""
  compiled = compile_grad(t, fused_bwd)
  kernels = kernel_cost.parse(compiled.as_text())
  assert sorted(k.phase for k in kernels) == phases
  assert all(k.q == k.k == (B, N, padded, H) for k in kernels)
  per_matmul = 2 * B * N * padded * padded * H
  want_flops = matmuls * per_matmul
  operand = B * N * padded * H * 2                  # one bf16 q/k/v/do
  # fwd (and dq): k, v; dkv (fused or not): q, do.
  want_bytes = len(phases) * 2 * operand * (passes - 1)
  assert kernel_cost.uncounted(compiled.as_text()) == (want_flops, want_bytes)
  # XLA alone counts (nearly) none of the kernels' FLOPs ...
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla.get('flops', 0.0) < 0.01 * want_flops
  # ... and Cost.of adds them.
  cost = step_analysis.Cost.of(compiled)
  assert cost.flops == pytest.approx(xla.get('flops', 0.0) + want_flops)
  assert cost.bytes == pytest.approx(xla['bytes accessed'] + want_bytes)


def test_programs_without_kernels_cost_nothing_extra():
  compiled = jax.jit(lambda x: x @ x).lower(jnp.ones((64, 64))).compile()
  assert kernel_cost.parse(compiled.as_text()) == []
  assert kernel_cost.uncounted(compiled.as_text()) == (0.0, 0.0)
