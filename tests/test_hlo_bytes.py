"""benchmarks/hlo_bytes.py: the per-instruction byte count of a compiled
module's entry computation, against XLA:CPU's cost analysis and against a
hand-written module."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import hlo_bytes  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('n', [32, 256])
def test_entry_bytes_equal_xla_cpu_cost_analysis(n):
  """On XLA:CPU (no tiled layouts) the per-instruction sum is exactly XLA's own
  "bytes accessed", whatever the compiler fused."""
  f = lambda x, y: jnp.tanh(x @ y).sum(axis=0) + jnp.exp(y).mean()
  x, y = jnp.ones((2 * n, n), jnp.float32), jnp.ones((n, n), jnp.float32)
  compiled = jax.jit(f).lower(x, y).compile()
  rows = hlo_bytes.instructions(compiled.as_text())
  assert sum(nbytes for _, _, nbytes, _ in rows) == compiled.cost_analysis()['bytes accessed']
  assert all(op not in hlo_bytes.FREE for _, op, _, _ in rows)


def test_tuple_results_and_multi_line_instructions_are_one_row():
  text = ('HloModule m\n\nENTRY %main (p: f32[4,8]) -> f32[4,8] {\n'
          '  %p = f32[4,8]{1,0} parameter(0)\n'
          '  %k = (f32[4,8]{1,0:T(8,128)}, bf16[2,3]{1,0}) custom-call(%p), '
          'custom_call_target="x", backend_config={\n"a": 1\n}, metadata={op_name="jit(f)/tower/k"}\n'
          '  ROOT %g = f32[4,8]{1,0} get-tuple-element(%k), index=0\n}\n')
  rows = hlo_bytes.instructions(text)
  assert rows == [('k', 'custom-call', 4 * 8 * 4 * 2 + 2 * 3 * 2, 'jit(f)/tower/k')]
  assert hlo_bytes.scope_key(rows[0][3], 2) == 'fwd : tower/k'


def test_tower_totals_split_layers_from_the_rest_of_each_tower():
  rows = [('a', 'fusion', 10, 'jit(s)/Mofi.embed/image_tower/encoder/layers_0/mlp/fc1/dot'),
          ('b', 'fusion', 3, 'jit(s)/Mofi.embed/image_tower/patch_embed/dot'),
          ('c', 'custom-call', 7, 'jit(s)/transpose(jvp(Mofi))/text_tower/encoder/layers_0/attn/x'),
          ('d', 'fusion', 5, 'jit(s)/entity_loss/while/body'),
          ('e', 'copy-start', 2, '')]
  assert hlo_bytes.tower_totals(rows) == {
      ('image_tower', 'layers'): 10, ('image_tower', 'rest'): 3,
      ('text_tower', 'layers'): 7, ('other', 'rest'): 7}
