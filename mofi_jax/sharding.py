"""The mesh, the one logical-axis rule table, and global-batch assembly.

Layers name logical axes only (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); this table is the single place that maps them to
mesh axes. Mesh axes are ordered from least to most communication:
`data` (pure data parallel), `fsdp` (data parallel + parameter sharding),
`model` (tensor parallel).
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')

LOGICAL_RULES = (
    ('batch', ('data', 'fsdp')),
    # Parameters: FSDP shards the model dimension; tensor parallelism shards
    # the wide dimensions.
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('vocab', 'model'),
    ('layers', None),
    # The entity head: classes over every device, so that a 2M x D kernel and
    # its optimizer state are split N ways; its input dimension is replicated.
    ('classes', ('data', 'fsdp', 'model')),
    ('head_embed', None),
    ('proj', None),
    # Activations.
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'model'),
    ('act_mlp', 'model'),
)


class ShardingError(ValueError):
  pass


def mesh_shape(mesh_cfg, num_devices):
  """Resolves {'data': 1, 'fsdp': -1, 'model': 1} to a shape over MESH_AXES."""
  unknown = set(mesh_cfg.keys()) - set(MESH_AXES)
  if unknown:
    raise ShardingError(f'config.mesh has unknown axes {sorted(unknown)}; '
                        f'expected a subset of {MESH_AXES}')
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ShardingError(f'config.mesh: at most one axis may be -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ShardingError(f'config.mesh {dict(zip(MESH_AXES, sizes))} does not '
                        f'divide {num_devices} devices')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ShardingError(f'config.mesh {dict(zip(MESH_AXES, sizes))} uses '
                        f'{math.prod(sizes)} devices, but {num_devices} exist')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None):
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def mesh_axes(logical_name, rules=LOGICAL_RULES):
  """The mesh axes (a tuple, possibly empty) a logical axis maps to."""
  for name, axes in rules:
    if name == logical_name:
      if axes is None:
        return ()
      return (axes,) if isinstance(axes, str) else tuple(axes)
  raise KeyError(f'logical axis {logical_name!r} has no rule')


def axes_size(mesh, axes):
  return math.prod(mesh.shape[a] for a in axes)


def logical_sharding(mesh, logical_spec, rules=LOGICAL_RULES):
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_spec, rules))


def tree_shardings(mesh, logical_specs, rules=LOGICAL_RULES):
  """Maps a pytree of logical PartitionSpecs to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(mesh_axes('batch')))


def replicated(mesh):
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch, mesh, what='config.input.batch_size',
                        microbatches=1):
  n = axes_size(mesh, mesh_axes('batch'))
  if global_batch % n or global_batch % jax.process_count():
    raise ShardingError(
        f'{what}={global_batch} must divide over the {n} batch shards of the '
        f'mesh {dict(mesh.shape)} and the {jax.process_count()} processes')
  if microbatches < 1 or global_batch % (n * microbatches):
    raise ShardingError(
        f'config.optim.microbatches={microbatches}: {what}={global_batch} must divide into '
        f'that many microbatches, each over the {n} batch shards of the mesh')


def global_batch(mesh, local_batch):
  """Per-process numpy batches -> global jax.Arrays sharded over `batch`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def replicate_host_array(mesh, x):
  """An identical-on-every-process host array -> a batch-sharded global array."""
  sharding = batch_sharding(mesh)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def activate(mesh, rules=LOGICAL_RULES):
  """Makes `mesh` and the rule table current for tracing (global setters)."""
  jax.set_mesh(mesh)
  nn.set_logical_axis_rules(rules)
