"""TPU chips and slice topologies: what a slice name means and what a chip holds.

Topology names follow libtpu (`v5e:16x16`, `v4:4x4x4`, `v5p:4x4x4`, `v6e:16x16`,
shapes in chips). Cloud slice names are also accepted (`v5e-256`, `v4-128`,
`v5p-128`); note that v4 and v5p slice names count TensorCores, two per chip,
so `v4-128` is 64 chips (4x4x4), while v5e and v6e names count chips.

Chip figures: peak dense bf16 FLOP/s and HBM bandwidth are Google Cloud's
published per-chip numbers; host vCPUs are those of the 4-chip TPU VM machine
types (ct4p-hightpu-4t, ct5lp-hightpu-4t, ct5p-hightpu-4t, ct6e-standard-4t). ICI: one link's bandwidth in one
direction, from each generation's Cloud TPU page: v5e 400 GB/s and v6e 800 GB/s
bidirectional per chip over 4 ports, v5p 1,200 GB/s bidirectional per chip over 6 ports
(3D torus), so 50, 100 and 100 GB/s a link a direction; v4's page gives no per-chip figure,
only 1.1 PB/s all-reduce bandwidth per 4,096-chip pod, 269 GB/s one way per chip (the same
ratio gives v5e's 200 and v6e's 400), so 45 GB/s over its 6 ports. Wraparound: a v5e or v6e
slice is a torus only at the full 16x16 pod; a v4 or v5p slice dimension wraps when it is a
multiple of 4 (whole cubes). HBM is what the TPU compiler lets a program use,
as libtpu 0.0.42 reports it when a compile runs out ("exceeds available HBM
(15.75G)" on v5e): a little under the nominal 16/32/95/32 GiB.
"""
import dataclasses
import math
import os
import re

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str               # 'v5e'
  libtpu_prefix: str      # the generation as libtpu spells it in topology names
  hbm_bytes: int          # usable by a program (see the module docstring)
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip
  hbm_bytes_per_s: float
  ndims: int              # 2 (v5e, v6e: 2D torus) or 3 (v4, v5p)
  chip_config: str        # 'megacore': two TensorCores act as one device
  cores_per_chip: int     # what the Cloud slice name counts per chip
  host_vcpus: int         # vCPUs of the 4-chip TPU VM host that feeds input
  ici_link_bytes_per_s: float   # one ICI link, one direction (module docstring)

  def wraps(self, size):
    """Whether a slice dimension of `size` chips has a wraparound link (module docstring)."""
    return size > 2 and (size == 16 if self.ndims == 2 else size % 4 == 0)


CHIPS = {
    'v4': Chip('v4', 'v4', int(30.75 * GiB), 275e12, 1.2e12, 3, 'megacore', 2, 240,
               1.1e15 / 4096 / 6),
    'v5e': Chip('v5e', 'v5e', int(15.75 * GiB), 197e12, 0.819e12, 2, 'default', 1, 112, 50e9),
    'v5p': Chip('v5p', 'v5p', int(95.74 * GiB), 459e12, 2.765e12, 3, 'megacore', 2, 208,
                100e9),
    'v6e': Chip('v6e', 'v6e', int(31.25 * GiB), 918e12, 1.64e12, 2, 'default', 1, 180, 100e9),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v5': 'v5p', 'v4p': 'v4'}

# Standard chip shapes of Cloud slices, by chip count.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8),
             64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
             64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
             1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


class TopologyError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple            # chips along each torus dimension

  @property
  def num_chips(self):
    return math.prod(self.shape)

  @property
  def libtpu_name(self):
    return f'{self.chip.libtpu_prefix}:{"x".join(map(str, self.shape))}'

  @property
  def slice_name(self):
    return f'{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}'

  @property
  def chips_per_host_bounds(self):
    """Four chips per host VM, 2x2 in the first two dimensions."""
    return (min(2, self.shape[0]), min(2, self.shape[1]), 1)

  def describe(self):
    return f'{self.slice_name} ({self.libtpu_name}, {self.num_chips} chips)'


def _chip(generation, text):
  gen = ALIASES.get(generation, generation)
  if gen not in CHIPS:
    raise TopologyError(f'unknown TPU generation {generation!r} in {text!r}; '
                        f'expected one of {sorted(CHIPS)}')
  return CHIPS[gen]


def parse(text):
  """'v5e:16x16' | 'v4:4x4x4' | 'v5e-256' | 'v4-128' -> Topology."""
  text = text.strip().lower()
  match = re.fullmatch(r'([a-z0-9]+):(\d+(?:x\d+)*)', text)
  if match:
    chip = _chip(match.group(1), text)
    shape = tuple(int(s) for s in match.group(2).split('x'))
    if len(shape) != chip.ndims or min(shape) < 1:
      example = 'x'.join(['4'] * chip.ndims)
      raise TopologyError(f'topology {text!r}: a {chip.name} slice has '
                          f'{chip.ndims} dimensions of >= 1 chip, e.g. '
                          f'{chip.name}:{example}')
    return Topology(chip, shape)
  match = re.fullmatch(r'([a-z0-9]+)-(\d+)', text)
  if match:
    chip = _chip(match.group(1), text)
    count = int(match.group(2))
    chips, rest = divmod(count, chip.cores_per_chip)
    shapes = SHAPES_2D if chip.ndims == 2 else SHAPES_3D
    if rest or chips not in shapes:
      unit = 'TensorCores' if chip.cores_per_chip > 1 else 'chips'
      raise TopologyError(
          f'slice {text!r}: no standard {chip.name} shape for {count} {unit}; '
          f'known: {[n * chip.cores_per_chip for n in sorted(shapes)]}, or give '
          f'the shape, e.g. {chip.name}:{"x".join(["4"] * chip.ndims)}')
    return Topology(chip, shapes[chips])
  raise TopologyError(f'cannot read topology {text!r}; expected e.g. v5e:16x16, '
                      f'v4:4x4x4, v5p:4x4x8, v6e:16x16 or a slice name v5e-256')


def devices(topology):
  """The slice's devices, compile-only: libtpu describes them, none is attached."""
  # Several compile-only processes (a test run, a benchmark) may load libtpu at
  # once; without a TPU there is nothing for its lockfile to protect.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # Off a TPU VM libtpu looks for the VM's metadata and warns at length; these
  # answer it (they name no device: the topology below is what compiles).
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', topology.slice_name.replace(
      'v5e-', 'v5litepod-'))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=topology.libtpu_name,
        chip_config_name=topology.chip.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=1)
  except ImportError as e:
    raise TopologyError(f'cannot describe {topology.libtpu_name} without libtpu '
                        f'({e}); install the tpu extra: pip install -e ".[tpu]"'
                        ) from e
  except RuntimeError as e:   # includes jaxlib's XlaRuntimeError
    raise TopologyError(f'libtpu cannot describe {topology.libtpu_name}: {e}. '
                        f'Is the tpu extra installed (pip install -e ".[tpu]")?'
                        ) from e
  return desc.devices
