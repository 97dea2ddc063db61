"""mofi_jax/collectives.py: each collective read from compiled HLO against what the program
moves by construction (shapes and groups worked out by hand from the mesh)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import shard_map
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mofi_jax import collectives, tpu_specs
from test_aot import needs_libtpu


def _program(devices=None):
  """x: f32[16, 64] over a (data=2, model=4) mesh; each device holds an [8, 16] block."""
  explicit = (jax.sharding.AxisType.Explicit,) * 2
  mesh = (jax.make_mesh((2, 4), ('data', 'model'), axis_types=explicit) if devices is None
          else jax.sharding.Mesh(np.array(devices).reshape(2, 4), ('data', 'model'),
                                 axis_types=explicit))
  x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P('data', 'model')))

  def body(a):
    ring = [(i, (i + 1) % 4) for i in range(4)]
    return (jax.lax.all_gather(a, 'model', tiled=True), jax.lax.psum(a, 'data'),
            jax.lax.psum_scatter(a, 'model', tiled=True), jax.lax.ppermute(a, 'model', ring),
            jax.lax.all_to_all(a, 'model', 0, 0, tiled=True))

  f = jax.jit(shard_map(body, mesh=mesh, in_specs=P('data', 'model'),
                        out_specs=(P('data', 'model'),) * 5, check_vma=False))
  return f.lower(x).compile(), mesh


def test_each_collective_of_a_known_program():
  compiled, mesh = _program()
  found = {c.kind: c for c in collectives.parse(compiled.as_text())}
  assert sorted(found) == sorted(collectives.KINDS)
  ids = np.asarray(mesh.device_ids)                    # [data, model]
  along_model = {tuple(int(i) for i in row) for row in ids}
  along_data = {tuple(int(i) for i in col) for col in ids.T}
  block = 8 * 16 * 4                                   # bytes of one device's block
  expected = {  # kind: (payload, groups, bytes sent by one device over a ring)
      'all-gather': (4 * block, along_model, 4 * block * 3 / 4),
      'all-reduce': (block, along_data, 2 * block * 1 / 2),
      'reduce-scatter': (block // 4, along_model, block // 4 * 3),
      'all-to-all': (block, along_model, block * 3 / 4),
  }
  for kind, (payload, groups, sent) in expected.items():
    c = found[kind]
    assert (c.payload, set(c.groups), c.sent) == (payload, groups, sent), kind
  permute = found['collective-permute']
  ring = {(int(ids[d, m]), int(ids[d, (m + 1) % 4])) for d in range(2) for m in range(4)}
  assert (permute.payload, set(permute.groups), permute.sent) == (block, ring, block)


@pytest.mark.parametrize('text, groups', [
    ('replica_groups=[2,4]<=[8]', {(0, 1, 2, 3), (4, 5, 6, 7)}),
    ('replica_groups=[4,2]<=[2,4]T(1,0)', {(0, 4), (1, 5), (2, 6), (3, 7)}),
    ('replica_groups={{0,2},{1,3}}', {(0, 2), (1, 3)}),
])
def test_replica_groups_in_both_spellings(text, groups):
  hlo = (f'\n  %ag = bf16[8,4]{{1,0}} all-gather(%p), channel_id=1, {text}, dimensions={{0}}\n')
  (c,) = collectives.parse(hlo)
  assert set(c.groups) == groups and c.payload == 8 * 4 * 2


def test_async_starts_count_their_results_once():
  hlo = ('\n  %ags = (bf16[2,4]{1,0}, bf16[8,4]{1,0}) all-gather-start(%p), '
         'replica_groups=[1,4]<=[4], dimensions={0}'
         '\n  %agd = bf16[8,4]{1,0} all-gather-done(%ags)'
         '\n  %cps = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%q), '
         'source_target_pairs={{0,1},{1,0}}'
         '\n  %cpd = f32[16]{0} collective-permute-done(%cps)'
         '\n  %ars = f32[32]{0} all-reduce-start(%r), replica_groups={}, to_apply=%add'
         '\n  %ard = f32[32]{0} all-reduce-done(%ars)\n')
  found = collectives.parse(hlo, num_devices=4)
  assert [(c.kind, c.payload, c.group_size) for c in found] == [
      ('all-gather', 64, 4), ('collective-permute', 64, 2), ('all-reduce', 128, 4)]
  with pytest.raises(ValueError, match='ars: replica_groups={} means every device, and the text has no'):
    collectives.parse(hlo)


@needs_libtpu
def test_a_v5e_2x4_compile_moves_the_same_bytes():
  """The TPU compiler's program (async permute, tiled layouts): the same collectives, except
  that it may do the small reduce-scatter as an all-reduce and keep its own shard."""
  compiled, mesh = _program(tpu_specs.devices(tpu_specs.parse('v5e:2x4')))
  found = {(c.kind, c.payload, frozenset(c.groups)) for c in collectives.parse(
      compiled.as_text())}
  ids = np.array([[d.id for d in row] for row in mesh.devices])
  model = frozenset(tuple(int(i) for i in row) for row in ids)
  data = frozenset(tuple(int(i) for i in col) for col in ids.T)
  block = 8 * 16 * 4
  ring = frozenset((int(ids[d, m]), int(ids[d, (m + 1) % 4])) for d in range(2)
                   for m in range(4))
  assert {('all-gather', 4 * block, model), ('all-reduce', block, data),
          ('all-to-all', block, model), ('collective-permute', block, ring)} <= found
  assert (('reduce-scatter', block // 4, model) in found) != (
      ('all-reduce', block, model) in found)


def _grid(shape):
  """{device id: coords} of a 2D slice, ids in x-major order as libtpu numbers them."""
  return {x + shape[0] * y: (x, y) for y in range(shape[1]) for x in range(shape[0])}


@pytest.mark.parametrize('group, links', [
    ([x for x in range(16)], 2),                       # a whole wrapped row: both directions
    ([x for x in range(4)], 1),                        # a sub-ring of the row is a line
    ([16 * y for y in range(16)], 2),                  # a whole column
    (list(range(256)), 4),                             # every chip: both dimensions
    ([x + 16 * y for x in range(2) for y in range(2)], 2),   # a 2x2 block: two lines
])
def test_ici_time_over_a_v5e_pod(group, links):
  chip = tpu_specs.CHIPS['v5e']
  c = collectives.Collective('ag', 'all-gather', 2 ** 20 * len(group), (tuple(group),))
  sent = 2 ** 20 * (len(group) - 1)                    # (n-1)/n of the gathered array
  seconds = collectives.ici_seconds(c, _grid((16, 16)), chip, (16, 16))
  assert seconds == pytest.approx(sent / (links * 50e9))


def test_ici_time_on_a_slice_without_wraparound():
  """v5e:4x4 is a mesh: a whole row is still a line."""
  chip = tpu_specs.CHIPS['v5e']
  c = collectives.Collective('ar', 'all-reduce', 4096, ((0, 1, 2, 3),))
  assert collectives.ici_seconds(c, _grid((4, 4)), chip, (4, 4)) == pytest.approx(
      2 * 4096 * 3 / 4 / 50e9)
  permute = collectives.Collective('cp', 'collective-permute', 4096, ((0, 1), (1, 0)))
  assert collectives.ici_seconds(permute, _grid((4, 4)), chip, (4, 4)) == 4096 / 50e9
