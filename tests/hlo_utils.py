"""Reading compiled HLO in tests: the shapes that collectives move.

CPU HLO names collectives plainly (`all-gather(`); TPU HLO also has async
forms (`all-gather-start(`, `collective-permute-start(`) and wraps some in
`AsyncCollectiveStart` custom calls, whose fused computations still hold the
plain op, so matching the op names finds them all on both backends.
"""
import re

COLLECTIVE = re.compile(r'(all-gather|all-reduce|reduce-scatter|all-to-all|'
                        r'collective-permute)(-start)?\(')


def collective_shapes(hlo_text):
  """Every array shape on the result side of a collective op."""
  return [shape for _, shape in collectives(hlo_text)]


def collectives(hlo_text):
  """(op name, result array shape) for every collective in the HLO text."""
  found = []
  for line in hlo_text.splitlines():
    match = COLLECTIVE.search(line)
    if match and '=' in line:
      lhs = line.split('=', 1)[1].split(match.group(0))[0]
      found += [(match.group(1), tuple(int(d) for d in dims.split(',') if d))
                for dims in re.findall(r'\[([\d,]*)\]', lhs)]
  return found
