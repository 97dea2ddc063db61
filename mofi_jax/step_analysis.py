"""What one training step costs on a mesh, from compiled XLA alone (no execution):
per-device memory, per-device FLOPs and HBM bytes, a roofline step time, and
the model FLOPs that MFU is measured against.

The mesh may be made of real devices or of a TPU topology described by libtpu
(`tpu_specs.devices`), so a CPU host can answer for a pod slice.
"""
import dataclasses
import re

import flax.linen as nn
import jax

from mofi_jax import collectives, kernel_cost, run_setup, sharding, trainer
from mofi_jax.models import mofi

# A tile as large as any class shard: the cost compiles walk it in one step.
WHOLE_SHARD_TILE = 2 ** 40


def lower_train_step(config, mesh):
  """The real jitted update step (trainer.build), lowered from shapes only."""
  setup = trainer.build(config, mesh)
  state = run_setup.with_shardings(setup.abstract, setup.shardings)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
           for k, v in setup.batch_spec.items()}
  # The mesh is made current only while tracing: eager ops (the PRNG key in
  # trainer.build) cannot run on devices that are only described.
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return setup.train_step.lower(state, batch)


_SIZE = r'([\d.]+)([KMGT]?)'
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """The TPU compiler refused the program: it needs more HBM than a chip has."""
  message: str
  required: int = -1     # bytes, where the message says
  available: int = -1

  @classmethod
  def parse(cls, message):
    m = re.search(rf'\({_SIZE}\) exceeds available HBM \({_SIZE}\)', message)
    if not m:
      return cls(message)
    size = lambda v, u: int(float(v) * _UNITS[u])
    return cls(message, size(*m.group(1, 2)), size(*m.group(3, 4)))


def compile_or_oom(lowered):
  """(compiled, None), or (None, OutOfMemory) when the compiler runs out of HBM."""
  try:
    return lowered.compile(), None
  except Exception as e:  # pylint: disable=broad-except
    # jaxlib raises a JaxRuntimeError; only running out of memory is an answer.
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return None, OutOfMemory.parse(str(e).split('\n')[0])


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of a compiled program (XLA's memory_analysis)."""
  argument: int
  output: int
  alias: int        # outputs written in place of donated arguments
  temp: int
  code: int

  @property
  def total(self):
    return self.argument + self.output - self.alias + self.temp + self.code

  @classmethod
  def of(cls, compiled):
    m = compiled.memory_analysis()
    return cls(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
               alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Cost:
  """Per-device FLOPs and HBM bytes accessed: XLA's cost_analysis, plus what it
  leaves out of the Pallas kernels (kernel_cost); and the bytes a device sends in
  collectives and the seconds they take on ICI (collectives.py; 0 without a link model)."""
  flops: float
  bytes: float
  sent: float = 0.0
  ici_s: float = 0.0

  @classmethod
  def of(cls, compiled, links=None):
    """links: an `IciModel` of the slice, or None (collective bytes only)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    xla = cls(float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0)))
    found = collectives.parse(text, num_devices=links.num_devices if links else None)
    sent = float(sum(c.sent for c in found))
    ici_s = float(sum(links.seconds(c) for c in found)) if links else 0.0
    return xla + cls(*kernel_cost.uncounted(text)) + cls(0.0, 0.0, sent, ici_s)

  def _map(self, other, op):
    return Cost(*(op(a, b) for a, b in zip(dataclasses.astuple(self),
                                           dataclasses.astuple(other))))

  def __add__(self, other):
    return self._map(other, lambda a, b: a + b)

  def __sub__(self, other):
    return self._map(other, lambda a, b: a - b)

  def __mul__(self, k):
    return Cost(*(a * k for a in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class IciModel:
  """A slice's devices on its torus: each collective's ICI seconds (collectives.ici_seconds)."""
  coords: dict             # device id -> torus coordinates
  chip: object             # tpu_specs.Chip
  shape: tuple             # the slice's shape in chips

  @classmethod
  def of(cls, devices, topology):
    return cls({d.id: tuple(d.coords) for d in devices}, topology.chip, topology.shape)

  @property
  def num_devices(self):
    return len(self.coords)

  def seconds(self, collective):
    return collectives.ici_seconds(collective, self.coords, self.chip, self.shape)


def tower_depths(config):
  """{'image': depth, 'text': depth} of the towers this mode trains."""
  depths = {'image': mofi.image_kwargs(config.model.image)['depth']}
  if mofi.uses_text(config.model.mode):
    depths['text'] = int(config.model.text.depth)
  return depths


def _shallow(config, depths):
  """The same step, with the towers cut to `depths`, unrolled, one loss tile."""
  c = config.copy_and_resolve_references()
  c.model.scan = False
  c.loss.tile_size = WHOLE_SHARD_TILE
  c.model.image.depth = depths['image']
  if 'text' in depths:
    c.model.text.depth = depths['text']
  return c


def step_cost(config, mesh, compile_fn=None, links=None):
  """Per-device cost of one step with every layer and loss tile counted.

  XLA's cost analysis counts a while-loop body once, so a scanned layer stack
  (and the entity loss's tile loop) would be undercounted by its trip count.
  Unrolling a 32-layer stack makes a slow compile; instead three shallow,
  unrolled compiles (depths 1/1, 2/1, 1/2) give the cost outside the towers and
  one layer of each tower, and the full depth is extrapolated linearly, which
  is exact for identical layers. Collectives are counted the same way (links: IciModel).
  """
  compile_fn = compile_fn or (lambda c: lower_train_step(c, mesh).compile())
  depths = tower_depths(config)
  ones = {tower: 1 for tower in depths}
  base = Cost.of(compile_fn(_shallow(config, ones)), links)
  total = base
  for tower, depth in depths.items():
    if depth > 1:
      deeper = Cost.of(compile_fn(_shallow(config, {**ones, tower: 2})), links)
      total = total + (deeper - base) * (depth - 1)
  return total


def _layer_flops(tokens, width, mlp_dim):
  """Forward FLOPs of one pre-LN transformer block on one sequence (matmuls)."""
  projections = 2 * tokens * (4 * width * width + 2 * width * mlp_dim)
  attention = 2 * 2 * tokens * tokens * width     # q k^T and p v
  return projections + attention


def model_flops(config):
  """Global FLOPs of one step as the model defines them (PaLM-style MFU):
  3x the forward matmuls, no rematerialisation, padded classes not counted."""
  m, b = config.model, config.input.batch_size
  img = mofi.image_kwargs(m.image)
  patches = (config.input.image_size // img['patch']) ** 2
  tokens = patches + (1 if img.get('pool', 'cls') == 'cls' else 0)
  per_image = (2 * patches * img['patch'] ** 2 * 3 * img['width']
               + img['depth'] * _layer_flops(tokens, img['width'], img['mlp_dim'])
               + 2 * img['width'] * m.embed_dim)
  total = 0
  if mofi.uses_text(m.mode):
    t = m.text
    per_image += (t.depth * _layer_flops(config.input.text_len, t.width, t.mlp_dim)
                  + 2 * t.width * m.embed_dim)
    total += 2 * 2 * b * b * m.embed_dim          # image->text and text->image
  if mofi.uses_head(m.mode):
    per_image += 2 * m.embed_dim * m.head.num_classes
  return 3 * (b * per_image + total)


@dataclasses.dataclass(frozen=True)
class StepTime:
  """Two bounds on a step's time from its per-device compute, HBM and ICI times:
  overlapped = max(compute, HBM, ICI) (every collective hidden behind the rest), serial =
  max(compute, HBM) + ICI (none hidden). XLA's own `optimal_seconds` is not used: for
  these programs it comes back negative, and it too counts loop bodies once."""
  seconds: float        # the overlapped bound
  serial_s: float
  compute_s: float
  hbm_s: float
  ici_s: float
  bound: str            # 'compute' | 'HBM' | 'ICI': what sets the overlapped bound

  @classmethod
  def roofline(cls, cost, peak_flops, hbm_bytes_per_s):
    times = {'compute': cost.flops / peak_flops, 'HBM': cost.bytes / hbm_bytes_per_s,
             'ICI': cost.ici_s}
    bound = max(times, key=times.get)
    return cls(times[bound], max(times['compute'], times['HBM']) + times['ICI'],
               times['compute'], times['HBM'], times['ICI'], bound)
