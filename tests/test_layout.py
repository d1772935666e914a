"""The package's folders are its architecture: imports run one way, with no circles.

Every import of flmiseg's modules is read from their source (at the top and inside functions
alike), so a deferred import that closes a circle fails here as a top-level one would.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'flmiseg'

# Each folder (first component under flmiseg) -> the folders it may import, besides itself.
# From the entry points down to the core: main -> cli, napari -> export -> train ->
# evaluation -> inference -> store -> data, models, objects -> core; configs are plain data.
_BASE = {'core', 'configs'}
ALLOWED = {
    'core': set(),
    'configs': set(),
    'objects': {'core'},
    'data': _BASE | {'objects'},
    'models': _BASE | {'objects'},
    'store': _BASE | {'data', 'models', 'objects'},
    'inference': _BASE | {'data', 'models', 'objects', 'store'},
    'evaluation': _BASE | {'data', 'models', 'objects', 'store', 'inference'},
    'train': _BASE | {'data', 'models', 'objects', 'store', 'inference', 'evaluation'},
    'export': _BASE | {'data', 'models', 'objects', 'store', 'inference', 'evaluation'},
    'napari': _BASE | {'data', 'objects', 'store', 'inference'},
    'chunked': _BASE | {'data', 'models', 'objects', 'store', 'inference'},
    'cli': _BASE | {'data', 'models', 'objects', 'store', 'inference', 'evaluation', 'train',
                    'export', 'chunked'},
    'main': _BASE | {'cli'},
    '__init__': {'inference', 'chunked'},
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def imported(path: pathlib.Path, known: set[str]) -> set[str]:
  """The flmiseg modules `path` imports anywhere in its source (`from flmiseg.x import y`
  counts as flmiseg.x.y when that is a module, else as flmiseg.x)."""
  names = set()
  package = module_name(path) if path.name == '__init__.py' else module_name(path.parent)
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names if a.name.startswith('flmiseg')}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative: from . import x
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] +
                        ([node.module] if node.module else []))
      if not base.startswith('flmiseg'):
        continue
      for alias in node.names:
        full = f'{base}.{alias.name}'
        names.add(full if full in known else base)
  return {n for n in names if n in known and n != 'flmiseg'}


def folder(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else '__init__'


def graph() -> dict[str, set[str]]:
  found = modules()
  return {name: imported(path, set(found)) for name, path in found.items()}


def test_every_folder_is_known_and_says_what_lives_there():
  folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / '__init__.py').exists()}
  assert folders <= set(ALLOWED), f'a new folder needs its place in ALLOWED: {folders - set(ALLOWED)}'
  for name in folders:
    doc = ast.get_docstring(ast.parse((PACKAGE / name / '__init__.py').read_text()))
    assert doc and 'import' in doc.lower(), f'flmiseg/{name}/__init__.py: say what lives there and ' \
                                    'what it may import'


def test_imports_run_from_the_entry_points_down():
  wrong = [f'{a} imports {b}' for a, deps in graph().items() for b in deps
           if folder(b) != folder(a) and folder(b) not in ALLOWED[folder(a)]]
  assert not wrong, '\n'.join(wrong)


def test_no_import_circles():
  edges = graph()
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
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
        cycles.append(sorted(component))

  for v in edges:
    if v not in index:
      visit(v)
  assert not cycles, f'import circles: {cycles}'


@pytest.mark.parametrize('path', [*sorted(PACKAGE.rglob('*.py')), ROOT / 'tests' / 'helpers.py',
                                  ROOT / 'tests' / 'conftest.py'],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_package_and_test_helpers_never_import_experiments(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      assert not (node.module or '').startswith('experiments'), path
    elif isinstance(node, ast.Import):
      assert not any(a.name.startswith('experiments') for a in node.names), path
