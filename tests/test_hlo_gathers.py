"""No hidden gathers: in the compiled multitask train step no collective carries
the [batch, classes] logits or the [dim, classes] kernel (or a class-sized
slice of either), on an 8-device CPU mesh and, where libtpu is installed, for
a v5e:2x4 TPU slice (compile-only).

The check can fail: a dense softmax cross-entropy whose logits follow the
batch sharding, as a plain Dense head under data-parallel activation rules
would, is compiled over the same class-sharded kernel, and the same HLO reader
finds its kernel all-gather on both backends.
"""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import demo
from hlo_utils import collectives
from mofi_jax import sharding, step_analysis, tpu_specs

# Distinct sizes, so that a class-sized dimension cannot be mistaken for another.
BATCH, DIM, CLASSES, DEVICES = 48, 40, 7000, 8
PADDED = 7168                       # pad_multiple 1024
LOCAL = PADDED // DEVICES           # 896 classes per device
MESH = dict(data=1, fsdp=-1, model=1)   # the paper configs' mesh


def config():
  c = demo.get_config('multitask')
  c.evals = {}
  c.input.update(batch_size=BATCH, image_size=32, text_len=16)
  c.model.update(embed_dim=DIM, scan=True, remat='full')
  c.model.image.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch=8)
  c.model.text.update(vocab_size=300, width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.head.update(num_classes=CLASSES, pad_multiple=1024)
  c.loss.tile_size = 256
  return c


def test_no_other_dimension_is_class_sized():
  """Precondition of the checks below: every dimension of the model and batch
  other than the classes is below one device's class shard."""
  c = config()
  others = [BATCH, DIM, c.model.text.vocab_size, c.model.text.mlp_dim,
            c.model.image.mlp_dim, c.input.image_size, c.input.text_len,
            c.input.max_entities, (c.input.image_size // 8) ** 2 + 1]
  assert max(others) < LOCAL


def tpu_devices():
  try:
    return tpu_specs.devices(tpu_specs.parse('v5e:2x4'))
  except tpu_specs.TopologyError as e:
    pytest.skip(f'no TPU compiles here: {e}')


def class_sized(found):
  return [(op, s) for op, s in found if max(s, default=0) >= LOCAL]


@pytest.mark.parametrize('backend', ['cpu', 'tpu'])
def test_train_step_moves_no_class_sized_array(backend):
  devices = jax.devices()[:DEVICES] if backend == 'cpu' else tpu_devices()
  mesh = sharding.make_mesh(MESH, devices)
  compiled = step_analysis.lower_train_step(config(), mesh).compile()
  found = collectives(compiled.as_text())
  assert class_sized(found) == [], class_sized(found)
  # The reader does see this program's collectives: the FSDP weight gathers,
  # and the all-gather of the [batch, dim] image embeddings that the entity
  # loss scores against its class shard.
  ops = {op for op, _ in found}
  assert 'all-gather' in ops, sorted(set(found))
  gathered = [s for op, s in found if op == 'all-gather' and DIM in s]
  assert any(BATCH in s or BATCH // DEVICES in s for s in gathered), found


def batch_sharded_dense_xent(x, kernel, bias, labels):
  """The naive head: dense logits that follow the batch sharding."""
  logits = jax.lax.with_sharding_constraint(
      x @ kernel + bias, P(sharding.mesh_axes('batch'), None))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize('backend', ['cpu', 'tpu'])
def test_reader_finds_the_gathers_of_a_naive_dense_head(backend):
  devices = jax.devices()[:DEVICES] if backend == 'cpu' else tpu_devices()
  mesh = sharding.make_mesh(MESH, devices)
  rows = NamedSharding(mesh, P(sharding.mesh_axes('batch')))
  classes = sharding.mesh_axes('classes')
  args = [jax.ShapeDtypeStruct((BATCH, DIM), jnp.float32, sharding=rows),
          jax.ShapeDtypeStruct((DIM, PADDED), jnp.float32,
                               sharding=NamedSharding(mesh, P(None, classes))),
          jax.ShapeDtypeStruct((PADDED,), jnp.float32,
                               sharding=NamedSharding(mesh, P(classes))),
          jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=rows)]
  step = jax.jit(jax.value_and_grad(batch_sharded_dense_xent, argnums=(0, 1, 2)))
  with jax.set_mesh(mesh):
    compiled = step.lower(*args).compile()
  found = class_sized(collectives(compiled.as_text()))
  # The whole [dim, classes] kernel is gathered onto every device.
  assert ('all-gather', (DIM, PADDED)) in found, found
