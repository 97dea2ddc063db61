"""The import graph of docs/architecture.md, read from the source with `ast`: no circle
between modules, and the training library (mofi_jax/ but its demo and study entry points)
never imports data_prep."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('mofi_jax', 'data_prep', 'configs')
# Entry points of mofi_jax that build the demo world's corpora on purpose, and the embed
# command's input module, which reads img2dataset output with data_prep's own readers.
MAY_IMPORT_DATA_PREP = ('mofi_jax.demo', 'mofi_jax.study', 'mofi_jax.embed_inputs')


def modules(root):
  """{dotted module name: path} of every .py file of PACKAGES under `root`."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(root, package)):
      for name in files:
        if name.endswith('.py'):
          rel = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
          out['.'.join(rel[:-1] if rel[-1] == '__init__' else rel)] = os.path.join(folder, name)
  return out


def imports(path, known):
  """The modules of `known` that the file at `path` imports (anywhere in it)."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from pkg import sub` imports pkg.sub when it is a module, else a name of pkg.
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in known else node.module
               for a in node.names]
    else:
      continue
    out.update(n for n in names if n in known)
  return out


def graph(root):
  known = modules(root)
  return {name: imports(path, known) - {name} for name, path in known.items()}


def circles(edges):
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def library_imports_of_data_prep(edges):
  return sorted((a, b) for a, targets in edges.items() for b in targets
                if a.startswith('mofi_jax') and b.startswith('data_prep')
                and not a.startswith(MAY_IMPORT_DATA_PREP))


def test_no_import_circle():
  assert circles(graph(ROOT)) == []


def test_training_library_never_imports_data_prep():
  assert library_imports_of_data_prep(graph(ROOT)) == []


def config_imports_outside_configs(edges):
  return sorted((a, b) for a, targets in edges.items() for b in targets
                if a.startswith('configs') and not b.startswith('configs'))


def test_configs_are_the_ground_floor():
  assert config_imports_outside_configs(graph(ROOT)) == []


def test_the_checks_see_a_circle_and_a_back_arrow(tmp_path):
  """The checks themselves, on a small tree that has both defects."""
  files = {
      'mofi_jax/__init__.py': '', 'mofi_jax/data/__init__.py': '',
      'mofi_jax/data/gen.py': 'from data_prep.world import build\n',
      'mofi_jax/demo.py': 'import data_prep.world\n',
      'data_prep/__init__.py': '', 'data_prep/world.py': 'from mofi_jax.data import gen\n',
      'configs/__init__.py': '', 'configs/demo.py': 'def get_config():\n  from mofi_jax import demo\n'}
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  edges = graph(str(tmp_path))
  assert edges['configs.demo'] == {'mofi_jax.demo'}
  assert circles(edges) == [['data_prep.world', 'mofi_jax.data.gen']]
  assert library_imports_of_data_prep(edges) == [('mofi_jax.data.gen', 'data_prep.world')]
  assert config_imports_outside_configs(edges) == [('configs.demo', 'mofi_jax.demo')]
