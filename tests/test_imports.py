"""The package's import graph has no cycles: deferred imports (inside functions) count too,
so that no module needs one to dodge a circle."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ddep')


def _modules() -> dict[str, str]:
  root = os.path.dirname(PACKAGE)
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(directory, f)
        name = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        out[name.removesuffix('.__init__')] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: the ddep modules it imports}, anywhere in its body."""
  modules = _modules()
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # Relative: from the module's own package up.
          parts = package.split('.')
          base = '.'.join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        # `from ddep.x import y`: y is a module of x, or a name defined in x.
        targets = [
            f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names
        ]
      for t in targets:
        # Importing ddep.a.b runs ddep/a/__init__.py first, unless the importer is inside a.
        parents = [t.rsplit('.', k)[0] for k in range(1, t.count('.'))]
        for m in [t] + [p for p in parents if not module.startswith(p + '.')]:
          if m in modules and m != module:
            graph[module].add(m)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the graph as [a, b, ..., a], or None."""
  state = {}  # 1: on the current path, 2: done.
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 2
    path.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) is None


def test_the_graph_sees_deferred_imports():
  graph = import_graph()
  assert 'ddep.datasets.specs' in graph['ddep.data.pipelines']  # At the top.
  assert 'ddep.data.preparation' in graph['ddep.demo']  # Only inside main().
  assert 'ddep.models' in graph['ddep.runs.summaries']  # The package of ddep.models.flops.
  assert len(graph) > 50


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)
