"""The cost of Pallas splash-attention kernels, which XLA's cost analysis omits.

A Pallas kernel reaches XLA as an opaque `tpu_custom_call`. The TPU compiler
counts the bytes of its operands and results, once each, but no FLOPs (it
reports 0 or -1). This module reads the kernels back from the compiled HLO
text and counts, for each splash kernel, what it actually does:

  FLOPs  2 * Tq * Tk * H per matmul, per (batch, head): the forward kernel runs
         2 matmuls (q k^T, p v), dq runs 3 (q k^T again, do v^T, ds k), dkv
         runs 4 (q k^T, p^T do, do v^T, ds^T q). The fused backward kernel
         (`models/attention.py` runs it) is a dkv kernel that also returns
         per-kv-block dq partials, 5 matmuls (dkv's and ds k); it is told
         apart by its third gradient result. Every block is counted: exact
         where the sequence is one block (every paper config); for causal masks
         over several blocks, which the kernel partly skips, an upper bound.
  bytes  what XLA does not count: the operands a kernel streams again for each
         block of the other sequence. The forward and dq kernels re-read k and v
         for every q block after the first; dkv (fused or not) re-reads q and
         do for every kv block after the first.
"""
import dataclasses
import json
import math
import re

INSTRUCTION = re.compile(r'\n(?=\s*(?:ROOT )?%[\w.\-]+ = )')  # splits HLO text
_NAME = re.compile(r'%(splash_\w+?_(fwd|dq|dkv)\w*?)(?:\.\d+)? = ')
_OPERANDS = re.compile(r'operand_layout_constraints=\{(.*?)\}, \w+=')
_RESULTS = re.compile(r' = (.*?) custom-call\(', re.S)
SHAPE = re.compile(r'\b(pred|[a-z]+\d+)\[([\d,]*)\]')
_BLOCKS = re.compile(r'"xprof_metadata":"(\{.*?\})"')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
               'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
MATMULS = {'fwd': 2, 'dq': 3, 'dkv': 4, 'fused_bwd': 5}
# splash's QKVLayout values, as its kernels record them: [.., T, H] | [.., H, T].
HEAD_DIM_MINOR, SEQ_MINOR = 1, 2


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One splash custom call: its phase, q/k/v shapes and block sizes."""
  name: str
  phase: str                  # 'fwd' | 'dq' | 'dkv' | 'fused_bwd'
  q: tuple                    # [..., heads, Tq, H], whatever the kernel's layout
  k: tuple                    # [..., heads, Tk, H]
  dtype_bytes: int
  blocks: dict

  @property
  def flops(self):
    *batch, tq, h = self.q
    tk = self.k[-2]
    return 2 * MATMULS[self.phase] * math.prod(batch) * tq * tk * h

  @property
  def reread_bytes(self):
    """Bytes streamed again for each extra block of the other sequence."""
    nbytes = lambda shape: math.prod(shape) * self.dtype_bytes
    if self.phase in ('dkv', 'fused_bwd'):   # q and do, per kv block
      tk = self.k[-2]
      return 2 * nbytes(self.q) * (-(-tk // self.blocks.get('block_kv_dkv', tk)) - 1)
    tq = self.q[-2]               # k and v, per q block
    block = self.blocks.get('block_q' if self.phase == 'fwd' else 'block_q_dq', tq)
    return 2 * nbytes(self.k) * (-(-tq // block) - 1)


def _seq_major(shape, layout):
  """[..., T, H] from a kernel operand in either splash layout."""
  return shape if layout == HEAD_DIM_MINOR else shape[:-2] + shape[-1:] + shape[-2:-1]


def _shapes(pattern, chunk):
  """[(dtype, dims)] of the shapes in the part of `chunk` that `pattern` finds."""
  m = pattern.search(chunk)
  if not m:
    return []
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in SHAPE.findall(m.group(1))]


def _gradient_results(chunk, rank):
  """How many of a kernel's results are gradients: rank >= q's (the f32
  accumulators a kernel also returns have one dimension fewer)."""
  return sum(len(dims) >= rank for _, dims in _shapes(_RESULTS, chunk))


def parse(hlo_text):
  """The splash kernels of a compiled module's HLO text, once per call site."""
  kernels = []
  for chunk in INSTRUCTION.split(hlo_text):
    if 'custom_call_target="tpu_custom_call"' not in chunk:
      continue
    name = _NAME.search(chunk)
    if not name:
      continue
    # q, k, v are the first three floating operands of rank >= 3.
    qkv = [(d, s) for d, s in _shapes(_OPERANDS, chunk) if d[0] in 'bf' and len(s) >= 3][:3]
    if len(qkv) < 3:
      raise ValueError(f'splash kernel {name.group(1)}: cannot find q, k, v among '
                       f'its operands in the compiled HLO')
    blocks = _BLOCKS.search(chunk)
    blocks = json.loads(blocks.group(1).replace('\\"', '"')) if blocks else {}
    q, k = (_seq_major(shape, blocks.get(f'{x}_layout', HEAD_DIM_MINOR))
            for x, (_, shape) in zip('qk', qkv))
    phase = name.group(2)
    if phase == 'dkv' and _gradient_results(chunk, len(q)) == 3:   # dq, dk, dv
      phase = 'fused_bwd'
    kernels.append(Kernel(name.group(1), phase, q, k, DTYPE_BYTES[qkv[0][0]], blocks))
  return kernels


def uncounted(hlo_text):
  """(FLOPs, bytes) of the splash kernels that XLA's cost analysis leaves out."""
  kernels = parse(hlo_text)
  return (float(sum(k.flops for k in kernels)),
          float(sum(k.reread_bytes for k in kernels)))
