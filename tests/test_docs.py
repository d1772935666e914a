"""README.md and docs/: every relative link and anchor resolves, every experiments command names
a module that exists, the README shows CI's test command; the package and the tests' shared
helpers never import experiments/."""

import ast
import pathlib
import re

from tests import helpers

REPO = helpers.REPO
PAGES = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^\s*```')


def prose_lines(path: pathlib.Path) -> list[str]:
  """The lines of a Markdown file outside ``` code blocks."""
  lines, inside = [], False
  for line in path.read_text().splitlines():
    if FENCE.match(line):
      inside = not inside
    elif not inside:
      lines.append(line)
  return lines


def anchors(path: pathlib.Path) -> set[str]:
  """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation but
  '-' and '_' dropped, spaces as '-'; a repeated heading gets '-1', '-2', ..."""
  seen, out = {}, set()
  for line in prose_lines(path):
    heading = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
    if heading:
      slug = re.sub(r'[^\w\- ]', '', heading[1].lower()).replace(' ', '-')
      out.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
      seen[slug] = seen.get(slug, 0) + 1
  return out


def test_anchors_follow_githubs_rule():
  page = REPO / 'docs' / 'inference.md'
  assert 'object-size---diameter' in anchors(page)
  assert 'pixels-without-data-hot-pixels-camera-defects' in anchors(page)


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
  broken = []
  for page in PAGES:
    for line in prose_lines(page):
      for target in LINK.findall(line):
        if re.match(r'[a-z]+:', target):  # https:, mailto:
          continue
        file, _, anchor = target.partition('#')
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
          broken.append(f'{page.name}: {target} (no such file)')
        elif anchor and path.suffix == '.md' and anchor not in anchors(path):
          broken.append(f'{page.name}: {target} (no such heading)')
  assert not broken, broken


def test_every_experiments_command_and_path_names_a_module_that_exists():
  texts = [*PAGES, *REPO.glob('experiments/**/*.py'), *REPO.glob('flmiseg/**/*.py'),
           *REPO.glob('tests/*.py'), *REPO.glob('flmiseg/pretrained/*/weights.json')]
  named, missing = set(), []
  for path in texts:
    text = path.read_text()
    for module in re.findall(r"(?:-m\s+|'-m',\s*')(experiments(?:\.\w+)+)", text):
      named.add(module)
      if not (REPO / (module.replace('.', '/') + '.py')).is_file():
        missing.append(f'{path.relative_to(REPO)}: {module}')
    for file in re.findall(r'\bexperiments/[\w/]+\.py\b', text):
      if not (REPO / file).is_file():
        missing.append(f'{path.relative_to(REPO)}: {file}')
  assert not missing, missing
  assert 'experiments.shipped.train_pretrained' in named  # the search finds the commands


def test_the_readme_shows_the_test_command_that_ci_runs():
  ci = (REPO / '.ci' / 'run').read_text()
  readme = (REPO / 'README.md').read_text()
  pytest_line = next(l.strip() for l in ci.splitlines() if 'python3 -m pytest' in l)
  assert pytest_line == 'python3 -m pytest -q -n 2 tests'
  assert 'python3 -m pip install -q -r requirements-dev.txt' in ci
  assert ('python3 -m pip install -r requirements-dev.txt && python3 -m pytest -q -n 2 tests'
          in readme)


def imported_modules(path: pathlib.Path) -> set[str]:
  """Every module an `import` or `from ... import` statement in the file names."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
  return names


def test_the_package_and_the_tests_shared_helpers_never_import_experiments():
  files = [*REPO.glob('flmiseg/**/*.py'),
           *(REPO / 'tests' / name for name in ('helpers.py', 'conftest.py', 'cli_server.py'))]
  importers = [str(f.relative_to(REPO)) for f in files
               if any(m.split('.')[0] == 'experiments' for m in imported_modules(f))]
  assert not importers, importers
  assert 'experiments' in imported_modules(
      REPO / 'experiments' / 'shipped' / 'train_pretrained.py')  # the scan sees imports
