"""mofi_jax.aot and its pieces: slice names, typed --set overrides, the per-layer
cost extrapolation (against a fully unrolled compile), model FLOPs (against the
matmuls of the traced model), and the CLI on a small TPU topology where libtpu
is installed (compile-only: no TPU is attached)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import mofi_b16
from mofi_jax import aot, config_files, kernel_cost, sharding, step_analysis, tpu_specs, trainer
from mofi_jax.models import mofi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_CLASSES = 400_000   # the head dominates the tiny model's state


def libtpu_available():
  try:
    tpu_specs.devices(tpu_specs.parse('v5e:2x2'))
    return True
  except tpu_specs.TopologyError:
    return False


def needs_libtpu(test):
  """Skipped without libtpu; `required`: a CI run (CI=true) fails instead of skipping."""
  skip = pytest.mark.skipif(not libtpu_available(),
                            reason='libtpu (the tpu extra) is not installed or fails to load')
  return pytest.mark.required(skip(test))


@pytest.mark.parametrize('name, libtpu_name, chips, slice_name', [
    ('v5e:16x16', 'v5e:16x16', 256, 'v5e-256'),
    ('v5e-256', 'v5e:16x16', 256, 'v5e-256'),
    ('v5litepod-16', 'v5e:4x4', 16, 'v5e-16'),
    # v4 and v5p slice names count TensorCores: two per chip.
    ('v4-128', 'v4:4x4x4', 64, 'v4-128'),
    ('v4:4x4x8', 'v4:4x4x8', 128, 'v4-256'),
    ('v5p-128', 'v5p:4x4x4', 64, 'v5p-128'),
    ('V5P:4x4x8', 'v5p:4x4x8', 128, 'v5p-256'),
    ('v6e:16x16', 'v6e:16x16', 256, 'v6e-256'),
])
def test_topology_names(name, libtpu_name, chips, slice_name):
  topo = tpu_specs.parse(name)
  assert (topo.libtpu_name, topo.num_chips, topo.slice_name) == (
      libtpu_name, chips, slice_name)


@pytest.mark.parametrize('name, message', [
    ('v5e:4x4x4', '2 dimensions'), ('v4:4x4', '3 dimensions'),
    ('v7:2x2', 'unknown TPU generation'), ('v4-100', 'no standard v4 shape'),
    ('v5e-3', 'no standard v5e shape'), ('sixteen', 'cannot read topology')])
def test_bad_topology_names(name, message):
  with pytest.raises(tpu_specs.TopologyError, match=message):
    tpu_specs.parse(name)


@needs_libtpu
@pytest.mark.parametrize('name, kind, hosts', [
    ('v4:2x2x2', 'TPU v4', 2), ('v5p:2x2x1', 'TPU v5', 1),
    ('v5e:4x4', 'TPU v5 lite', 4), ('v6e:2x4', 'TPU v6 lite', 2)])
def test_topology_devices(name, kind, hosts):
  topo = tpu_specs.parse(name)
  devices = tpu_specs.devices(topo)
  assert len(devices) == topo.num_chips
  assert {d.device_kind for d in devices} == {kind}
  assert len({d.process_index for d in devices}) == hosts   # 4 chips per host


def test_sizes_from_the_corpus_must_be_given():
  from configs import demo  # pylint: disable=g-import-not-at-top
  with pytest.raises(aot.AotError, match=r'model.head.num_classes is -1.*--config\.model'):
    aot.check_complete(demo.get_config('multitask'))


def test_unknown_remat_policy_is_named():
  c = config_files.apply_overrides(mofi_b16.get_config('multitask'), ['model.remat=some'])
  with pytest.raises(aot.AotError, match=r"model.remat='some'; expected one of"):
    aot.check_complete(c)


def tiny_config(mode='multitask'):
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config(mode)
  c.evals = {}
  c.input.update(batch_size=32, image_size=32, text_len=16)
  c.model.update(embed_dim=16, scan=True)
  c.model.image.update(width=32, depth=3, num_heads=2, mlp_dim=64, patch=8)
  c.model.text.update(vocab_size=300, width=32, depth=2, num_heads=2, mlp_dim=64)
  c.model.head.update(num_classes=6000, pad_multiple=1024)
  c.loss.tile_size = 256
  return c


def test_cost_extrapolation_equals_a_fully_unrolled_compile():
  """Depth-1/2 compiles extrapolated to depth 3, against the whole step
  unrolled in one loss tile. (One device and no text tower: CPU compiles of
  the step take ~10 s each here.)"""
  c = tiny_config('supervised')
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  compile_fn = lambda cfg: step_analysis.lower_train_step(cfg, mesh).compile()
  got = step_analysis.step_cost(c, mesh)
  assert step_analysis.tower_depths(c) == {'image': 3}
  unrolled = c.copy_and_resolve_references()
  unrolled.model.scan = False
  unrolled.loss.tile_size = 10 ** 9
  want = step_analysis.Cost.of(compile_fn(unrolled))
  assert got.flops == pytest.approx(want.flops, rel=0.01)
  assert got.bytes == pytest.approx(want.bytes, rel=0.05)
  assert got.sent == want.sent == 0       # one device: nothing to send
  # The scanned, tiled program as compiled counts loop bodies once: the
  # correction matters.
  assert step_analysis.Cost.of(compile_fn(c)).flops < 0.8 * want.flops


def _matmul_flops(jaxpr):
  """FLOPs of every dot_general and convolution in a jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    out = int(np.prod(eqn.outvars[0].aval.shape))
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * out * int(np.prod([lhs[d] for d in contract]))
    elif eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      total += 2 * out * int(np.prod(rhs)) // out_features
    for value in eqn.params.values():
      sub = getattr(value, 'jaxpr', value)
      if isinstance(sub, jax.extend.core.Jaxpr):
        total += _matmul_flops(sub)
  return total


def test_model_flops_match_the_traced_matmuls():
  c = tiny_config()
  c.model.scan = False
  model = mofi.build(c.model)
  batch = trainer.dummy_batch(c)
  params = jax.eval_shape(model.init, jax.random.key(0), batch['image'],
                          batch['text'])
  towers = _matmul_flops(jax.make_jaxpr(model.apply)(
      params, batch['image'], batch['text']).jaxpr)
  b, e = c.input.batch_size, c.model.embed_dim
  head = 2 * b * e * c.model.head.num_classes         # logits, real classes
  contrastive = 2 * (2 * b * b * e)                   # image->text, text->image
  assert step_analysis.model_flops(c) == 3 * (towers + head + contrastive)


TINY_CONFIG_FILE = textwrap.dedent(f'''
    from configs import demo

    def get_config(mode='multitask'):
      c = demo.get_config(mode)
      c.evals = {{}}
      c.input.update(batch_size=16, image_size=32, text_len=16)
      c.model.update(embed_dim=16, scan=True)
      c.model.image.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch=8)
      c.model.text.update(vocab_size=300, width=32, depth=1, num_heads=2, mlp_dim=64)
      c.model.head.update(num_classes={HEAD_CLASSES}, pad_multiple=1024)
      c.loss.tile_size = 4096
      return c
''')


def run_aot(tmp_path, *args):
  config = tmp_path / 'tiny.py'
  config.write_text(TINY_CONFIG_FILE)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'mofi_jax.aot', f'--config={config}', *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def per_chip_state_bytes(num_chips):
  """Bytes of one chip's shards of the train state, from shapes and the rule
  table alone (a CPU mesh of the same shape)."""
  ns = {}
  exec(TINY_CONFIG_FILE, ns)  # pylint: disable=exec-used
  c = ns['get_config']()
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:num_chips])
  setup = trainer.build(c, mesh)
  leaves = zip(jax.tree.leaves(setup.abstract), jax.tree.leaves(setup.shardings))
  return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
             for a, s in leaves)


@needs_libtpu
def test_cli_fits_and_reports_per_chip_memory(tmp_path):
  out = tmp_path / 'report.json'
  p = run_aot(tmp_path, '--topology=v5e:2x2', '--nocost', f'--json={out}')
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'FITS' in p.stdout
  r = json.loads(out.read_text())
  m = r['memory']
  assert m['total'] == m['argument'] + m['output'] - m['alias'] + m['temp'] + m['code']
  assert r['headroom'] == pytest.approx(1 - m['total'] / tpu_specs.CHIPS['v5e'].hbm_bytes)
  assert r['mesh'] == {'data': 1, 'fsdp': 4, 'model': 1} and r['fits']
  # The donated state is sharded: each chip holds a quarter of it (TPU layouts
  # pad small arrays a little), not all of it.
  state = per_chip_state_bytes(4)
  assert state <= m['argument'] <= 1.1 * state
  assert m['alias'] >= 0.9 * state


@needs_libtpu
def test_cli_out_of_memory_exits_1(tmp_path):
  out = tmp_path / 'report.json'
  p = run_aot(tmp_path, '--topology=v5e-4', '--set=model.head.num_classes=1500000000',
              f'--json={out}')
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'DOES NOT FIT' in p.stdout and 'exceeds available HBM' in p.stdout
  oom = json.loads(out.read_text())['out_of_memory']
  assert oom['available'] == tpu_specs.CHIPS['v5e'].hbm_bytes
  assert oom['required'] > oom['available']


@pytest.mark.parametrize('spelling', [['--set=model.no_such=1'],     # aot's first spelling
                                      ['--config.model.no_such=1'],  # train's
                                      ['--config.model.no_such', '1']])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, spelling):
  p = run_aot(tmp_path, '--topology=v5e:2x2', *spelling)
  assert p.returncode == 2, p.stderr[-3000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last == ("mofi_jax.aot: error: --config.model.no_such: config has no entry "
                  "'model.no_such'"), last
  assert 'Traceback' not in p.stderr


def test_train_spelling_of_overrides_is_set():
  """`--config.k=v` and `--config.k v` reach the loader as --set, in order; `--config=F` is
  the config file."""
  argv = ['aot', '--config=c.py:x', '--config.a.b=1', '--set=c=2', '--config.d', '3', '--cost']
  assert aot.set_flags_of(argv) == ['aot', '--config=c.py:x', '--set=a.b=1', '--set=c=2',
                                    '--set=d=3', '--cost']


@needs_libtpu
@pytest.mark.parametrize('remat, forward_kernels', [('projections', 2), ('full', 4)])
def test_splash_attention_compiles_for_a_tpu_slice(remat, forward_kernels):
  """The whole multitask step with the Pallas kernel in both towers, under the
  FSDP mesh of a v5e-4 (the kernel runs per shard in a shard_map). The backward
  is one fused kernel per tower; 'projections' keeps the kernel's output and
  log-sum-exp, so the backward does not run the forward kernel again, which
  'full' (nothing saved) does."""
  c = tiny_config('multitask')
  c.model.update(attention='splash', remat=remat)
  mesh = sharding.make_mesh(c.mesh, tpu_specs.devices(tpu_specs.parse('v5e:2x2')))
  compiled = step_analysis.lower_train_step(c, mesh).compile()
  assert step_analysis.Memory.of(compiled).total > 0
  # Per shard: 32 images over 4 chips; 17 image / 16 text tokens pad to 128.
  kernels = kernel_cost.parse(compiled.as_text())
  phases = [k.phase for k in kernels]
  assert sorted(set(phases)) == ['fused_bwd', 'fwd']
  assert (phases.count('fwd'), phases.count('fused_bwd')) == (forward_kernels, 2)
  assert {k.q for k in kernels} == {(8, 2, 128, 16)}


def test_collective_bytes_extrapolate_like_flops():
  """On 8 devices (FSDP): the bytes sent in collectives, from depth-1/2 compiles extrapolated
  to depth 3, equal those of the whole step unrolled."""
  c = tiny_config('supervised')
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:8])
  compile_fn = lambda cfg: step_analysis.lower_train_step(cfg, mesh).compile()
  got = step_analysis.step_cost(c, mesh)
  unrolled = c.copy_and_resolve_references()
  unrolled.model.scan = False
  unrolled.loss.tile_size = 10 ** 9
  want = step_analysis.Cost.of(compile_fn(unrolled))
  assert want.sent > 0 and got.sent == pytest.approx(want.sent, rel=0.01)
