r"""Where a compiled TPU step's HBM bytes go: every top-level instruction of the
entry computation (a fusion, a Pallas kernel, a copy, a collective) with the
bytes of its operands and results, grouped by the model scope that made it.

  python benchmarks/hlo_bytes.py --config configs/mofi_b16.py:multitask \
      --topology v5e:16x16 --set model.attention=splash --set model.remat=projections

It compiles the same shallow step as the cost estimate (towers of depth 1,
unrolled, one loss tile; `step_analysis.step_cost`), so a layer's rows are one
layer's traffic. Bytes are logical (no TPU tiling padding), which is why the
total sits a little below XLA's "bytes accessed", printed beside it.
"""
import collections
import math
import os
import re
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags

from mofi_jax import config_files, kernel_cost, sharding, step_analysis, tpu_specs

FLAGS = flags.FLAGS

_DEF = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (.*)$', re.S)
_OP = re.compile(r' ([\w\-]+)\((.*)$', re.S)
_OPERAND = re.compile(r'%([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant',
        'after-all', 'partition-id', 'replica-id'}


def shape_bytes(text):
  return sum(math.prod(int(d) for d in dims.split(',') if d)
             * kernel_cost.DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in kernel_cost.SHAPE.findall(text))


def split_result(text):
  """'shape op(args...' -> (shape, op, 'args...'); shapes may be nested tuples."""
  depth, end = 0, 0
  for end, ch in enumerate(text):
    depth += {'(': 1, ')': -1}.get(ch, 0)
    if ch == ' ' and depth == 0:
      break
  m = _OP.match(text[end:])
  return (text[:end],) + (m.groups() if m else ('', ''))


def entry_lines(hlo_text):
  """The entry computation's instructions, one string each (some span lines)."""
  entry = hlo_text[hlo_text.index('\nENTRY '):]
  return kernel_cost.INSTRUCTION.split(entry)[1:]


def instructions(hlo_text):
  """(name, op, operand bytes + result bytes, op_name) per entry instruction."""
  sizes, rows = {}, []
  for line in entry_lines(hlo_text):
    m = _DEF.match(line)
    if not m:
      continue
    name, (result, op, rest) = m.group(1), split_result(m.group(2))
    sizes[name] = shape_bytes(result)
    if op in FREE:
      continue
    args = rest.split(')', 1)[0]
    nbytes = sizes[name] + sum(sizes.get(a, 0) for a in _OPERAND.findall(args))
    scope = _OP_NAME.search(line)
    rows.append((name, op, nbytes, scope.group(1) if scope else ''))
  return rows


def scope_parts(op_name):
  """An op_name's module scopes, without jit/jvp/transpose wrappers or repeats."""
  parts = []
  for p in op_name.split('/'):
    if p and not p.startswith(('jit(', 'jvp(', 'transpose(')) and p not in parts:
      parts.append(p)
  return parts


def tower_of(parts):
  return next((p for p in parts if p.endswith('_tower')), '')


def scope_key(op_name, depth):
  """'fwd|bwd  <tower>: <last `depth` scope names>' (repeats dropped)."""
  parts = scope_parts(op_name)
  tower = tower_of(parts)
  direction = 'bwd' if 'transpose(' in op_name else 'fwd'
  return f"{direction} {tower}: {'/'.join(parts[-depth:])}"


def tower_totals(rows):
  """{(tower, 'layers' | 'rest'): bytes}: a tower's encoder layers (at depth 1,
  one layer's traffic) apart from its embedding, pooling and projection."""
  totals = collections.Counter()
  for _, _, nbytes, op_name in rows:
    parts = scope_parts(op_name)
    totals[tower_of(parts) or 'other', 'layers' if 'encoder' in parts else 'rest'] += nbytes
  return totals


def main(argv):
  del argv
  config = config_files.load(FLAGS.config, FLAGS.set)
  depths = {tower: 1 for tower in step_analysis.tower_depths(config)}
  depths['image'] = FLAGS.image_depth
  if 'text' in depths:
    depths['text'] = FLAGS.text_depth
  shallow = step_analysis._shallow(config, depths)  # pylint: disable=protected-access
  mesh = sharding.make_mesh(shallow.mesh, tpu_specs.devices(tpu_specs.parse(FLAGS.topology)))
  compiled = step_analysis.lower_train_step(shallow, mesh).compile()
  text = compiled.as_text()
  if FLAGS.dump:
    with open(FLAGS.dump, 'w') as f:
      f.write(text)
  rows = instructions(text)
  groups = collections.Counter()
  for _, op, nbytes, op_name in rows:
    groups[scope_key(op_name, FLAGS.scope_depth) + f'  [{op}]'] += nbytes
  total = sum(groups.values())
  xla = step_analysis.Cost.of(compiled)
  print(f'{len(rows)} instructions, {total / 1e9:.2f} GB logical '
        f'(step_analysis.Cost: {xla.bytes / 1e9:.2f} GB, {xla.flops:.3e} FLOP)')
  for key, nbytes in groups.most_common(FLAGS.top):
    print(f'{nbytes / 1e9:9.3f} GB  {100 * nbytes / total:5.1f}%  {key}')
  print(' '.join(f'{tower}/{part} {nbytes / 1e9:.2f} GB' for (tower, part), nbytes
                 in sorted(tower_totals(rows).items())))


def define_flags():
  """The CLI's flags (defined only when run, so that tests can import the
  parsers next to other absl programs)."""
  flags.DEFINE_string('config', None, 'Config file[:variant].')
  flags.DEFINE_string('topology', 'v5e:16x16', 'TPU slice.')
  flags.DEFINE_multi_string('set', [], 'key=value config override.')
  flags.DEFINE_integer('top', 40, 'Rows to print.')
  flags.DEFINE_integer('scope_depth', 3, 'Trailing op_name components kept per row.')
  flags.DEFINE_integer('image_depth', 1, 'Image tower depth of the shallow compile '
                       '(2 against 1 gives one layer of bytes).')
  flags.DEFINE_integer('text_depth', 1, 'Text tower depth of the shallow compile.')
  flags.DEFINE_string('dump', None, 'Also write the compiled HLO text here.')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
