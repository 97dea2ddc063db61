"""Reading compiled HLO in tests: the shapes that collectives move."""
import re

COLLECTIVE = re.compile(r'(all-gather|all-reduce|reduce-scatter|all-to-all|'
                        r'collective-permute)(-start)?\(')


def collective_shapes(hlo_text):
  """Every array shape on the result side of a collective op."""
  shapes = []
  for line in hlo_text.splitlines():
    match = COLLECTIVE.search(line)
    if match and '=' in line:
      lhs = line.split('=', 1)[1].split(match.group(0))[0]
      shapes += [tuple(int(d) for d in dims.split(',') if d)
                 for dims in re.findall(r'\[([\d,]*)\]', lhs)]
  return shapes
