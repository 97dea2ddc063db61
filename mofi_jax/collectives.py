"""The collectives of a compiled XLA program: what each one moves, and between which devices.

Read from the compiled HLO text (`compiled.as_text()`), every instruction of the kinds

  all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute

and their async `-start` forms (the matching `-done` moves nothing more and is skipped; a
generic `async-start` wraps a computation whose own collective line is read). For each:

  payload  the bytes of its result on one device: the gathered array of an all-gather, the
           reduced array of an all-reduce, the scattered shard of a reduce-scatter, every
           piece of an all-to-all, the array a collective-permute sends;
  groups   its replica groups as device ids, from either spelling XLA prints: explicit
           `{{0,1},{2,3}}` or iota `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)`; a permute's
           source-target pairs;
  sent     the bytes one device sends with a ring over its group of n devices:
           all-gather (n-1)/n x payload, reduce-scatter (n-1) x payload (its input is n
           shards), all-reduce 2 (n-1)/n x payload (a reduce-scatter then an all-gather),
           all-to-all (n-1)/n x payload, collective-permute the payload.

ICI time (`ici_seconds`): the group's devices span some dimensions of the slice's torus; a
ring runs over each spanned dimension at once, using 2 links a chip (both directions) where
the dimension wraps and the group covers it whole, 1 where it is a line (a sub-ring, or a
slice without wraparound). A permute sends its payload over one link. Latency is not
modelled: at these sizes (MBs per collective) bandwidth dominates.

A loop body's collectives appear once in the text, as its FLOPs do in XLA's cost analysis:
step_analysis counts them from unrolled, shallow compiles and extrapolates by depth.
"""
import dataclasses
import re

import numpy as np

from mofi_jax import kernel_cost

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_OP = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (' + '|'.join(KINDS) +
                 r')(-start)?\(', re.S)
_EXPLICIT = re.compile(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}')
_IOTA = re.compile(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?')
_PAIRS = re.compile(r'source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}')


@dataclasses.dataclass(frozen=True)
class Collective:
  name: str
  kind: str                 # one of KINDS
  payload: int              # bytes on one device (module docstring)
  groups: tuple             # tuples of device ids; a permute: its (source, target) pairs

  @property
  def group_size(self):
    return 2 if self.kind == 'collective-permute' else max(len(g) for g in self.groups)

  @property
  def sent(self):
    """Bytes one device sends over a ring of its group (module docstring)."""
    n = self.group_size
    if self.kind == 'collective-permute':
      return self.payload
    if n <= 1:
      return 0
    return self.payload * {'all-gather': (n - 1) / n, 'reduce-scatter': n - 1,
                           'all-reduce': 2 * (n - 1) / n, 'all-to-all': (n - 1) / n}[self.kind]


def parse(hlo_text, num_devices=None):
  """[Collective] of every collective instruction in `hlo_text`, in text order. Empty
  replica groups are one group of every device: `num_devices`, or the module header's
  num_partitions x replica_count."""
  num_devices = num_devices or _header_devices(hlo_text)
  out = []
  for inst in kernel_cost.INSTRUCTION.split(hlo_text):
    m = _OP.match(inst)
    if not m:
      continue
    name, result, kind, is_async = m.groups()
    groups = _groups(inst, kind)
    if groups == ((),):
      if num_devices is None:
        raise ValueError(f'{name}: replica_groups={{}} means every device, and the text '
                         'has no module header to count them; pass num_devices')
      groups = (tuple(range(num_devices)),)
    out.append(Collective(name, kind, _payload(result, kind, bool(is_async)), groups))
  return out


def _header_devices(hlo_text):
  header = hlo_text[:hlo_text.find('\n')]
  partitions = re.search(r'num_partitions=(\d+)', header)
  replicas = re.search(r'replica_count=(\d+)', header)
  if not (partitions or replicas):
    return None
  return int(partitions.group(1) if partitions else 1) * int(replicas.group(1) if replicas
                                                            else 1)


def _arrays(result):
  """(bytes, has dimensions) of each array in a result type, in order (tuples flattened)."""
  out = []
  for dtype, dims in kernel_cost.SHAPE.findall(result):
    count = int(np.prod([int(d) for d in dims.split(',') if d])) if dims else 1
    out.append((count * kernel_cost.DTYPE_BYTES.get(dtype, 4), bool(dims)))
  return out


def _payload(result, kind, is_async):
  arrays = _arrays(result)
  if is_async and kind in ('all-gather', 'collective-permute'):
    # (operands..., results...[, u32[] contexts]): the second half of the non-scalars.
    sizes = [size for size, shaped in arrays if shaped]
    return sum(sizes[len(sizes) // 2:])
  return sum(size for size, _ in arrays)


def _groups(inst, kind):
  if kind == 'collective-permute':
    m = _PAIRS.search(inst)
    return tuple(tuple(int(i) for i in p.split(',')) for p in re.findall(r'\{(\d+,\d+)\}',
                                                                          m.group(1)))
  m = _IOTA.search(inst)
  if m:
    shape = [int(d) for d in m.group(1).split(',')]
    dims = [int(d) for d in m.group(2).split(',')]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(p) for p in m.group(3).split(',')])
    return tuple(tuple(int(i) for i in g) for g in ids.reshape(shape))
  m = _EXPLICIT.search(inst)
  groups = re.findall(r'\{([\d,]*)\}', m.group(1)) if m else []
  return tuple(tuple(int(i) for i in g.split(',') if i) for g in groups) or ((),)


def ici_seconds(collective, coords, chip, shape):
  """Seconds one device spends sending `collective`'s bytes over ICI (module docstring).

  coords: {device id: torus coordinates}; chip: tpu_specs.Chip; shape: the slice's shape.
  """
  if collective.kind == 'collective-permute':
    return collective.payload / chip.ici_link_bytes_per_s
  # Every group of one collective has the same shape on the torus (XLA builds them from
  # mesh axes), so the first one stands for all.
  points = np.array([coords[d][:len(shape)] for d in collective.groups[0]])
  links = 0
  for dim, size in enumerate(shape):
    extent = len(set(points[:, dim].tolist()))
    if extent > 1:
      links += 2 if chip.wraps(size) and extent == size else 1
  return collective.sent / (links * chip.ici_link_bytes_per_s) if links else 0.0
