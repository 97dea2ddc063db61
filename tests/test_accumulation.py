"""mofi_jax/accumulation.py: M microbatches give the M = 1 loss, gradient and update, in
all three modes, on 8 devices (the contrastive loss keeps every negative of the batch)."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from mofi_jax import accumulation, sharding, trainer
from test_trainer import build, random_batch, small_config

MESH = dict(data=2, fsdp=2, model=2)


def test_split_and_merge_keep_every_device_shard_in_place():
  mesh = sharding.make_mesh(MESH)
  sharding.activate(mesh)
  x = sharding.global_batch(mesh, np.arange(16 * 3, dtype=np.float32).reshape(16, 3))
  parts = jax.jit(lambda t: accumulation.split(t, 4))(x)
  # Microbatch m is rows m, m + 4, m + 8, m + 12: one row of each device's 4-row shard.
  np.testing.assert_array_equal(np.asarray(parts)[1], np.asarray(x)[1::4])
  np.testing.assert_array_equal(jax.jit(accumulation.merge)(parts), x)


def _grads(c, mesh, setup, batch):
  fn = trainer.make_value_and_grad(setup.model, c, mesh, c.model.head.num_classes)
  state = setup.init(mesh, seed=0)
  (loss, aux), grads = jax.jit(fn)(state.params, batch)
  return float(loss), jax.device_get(aux), traverse_util.flatten_dict(jax.device_get(grads))


def _run(mode, microbatches, with_step):
  c = small_config(mode)
  c.optim.microbatches = microbatches
  mesh, setup = build(c, MESH)
  batch = sharding.global_batch(mesh, random_batch(c, 0))
  out = _grads(c, mesh, setup, batch)
  if with_step:
    state, metrics = setup.train_step(setup.init(mesh, seed=0), batch)
    out += (traverse_util.flatten_dict(jax.device_get(state.params)), metrics.compute())
  return out


@pytest.mark.parametrize('mode', ['supervised', 'contrastive', 'multitask'])
def test_four_microbatches_equal_one(mode):
  with_step = mode == 'multitask'   # the jitted update too, once: it adds a compile
  one, four = _run(mode, 1, with_step), _run(mode, 4, with_step)
  np.testing.assert_allclose(four[0], one[0], rtol=1e-5)
  for k in one[1]:
    np.testing.assert_allclose(four[1][k], one[1][k], rtol=1e-5, err_msg=k)
  scale = max(np.abs(v).max() for v in one[2].values())
  for k in one[2]:   # every parameter, the logit scale and the entity head included
    np.testing.assert_allclose(four[2][k], one[2][k], rtol=1e-5, atol=1e-5 * scale,
                               err_msg=str(k))
  if with_step:
    np.testing.assert_allclose(four[4]['grad_norm'], one[4]['grad_norm'], rtol=1e-5)
    for k in one[3]:
      np.testing.assert_allclose(four[3][k], one[3][k], rtol=1e-5, atol=1e-6, err_msg=str(k))


def test_microbatches_must_divide_the_batch_shards():
  mesh = sharding.make_mesh(MESH)
  with pytest.raises(sharding.ShardingError, match='microbatches=3'):
    sharding.check_batch_divides(16, mesh, microbatches=3)
  with pytest.raises(sharding.ShardingError, match='microbatches=8'):
    sharding.check_batch_divides(16, mesh, microbatches=8)   # 2 rows over 4 shards
