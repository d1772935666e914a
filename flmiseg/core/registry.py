"""Named registries (models, fusion operators, backbones, losses) and `config.imports`.

A config names what to build (`config.model.fusion='se_concat'`); a `Registry` maps such names
to the Python objects, and is filled by a decorator that the built-in entries use too:

  @fusion.register_fusion('max')
  class Max(nn.Module): ...

so an operator, model, encoder or loss of one's own is one decorated definition in one's own
file. `config.imports` names those files (or modules) and `import_modules` imports them before
anything is built, which is how they train from the command line (docs/fusion.md).
"""

import collections.abc
import hashlib
import importlib
import importlib.util
import pathlib
import sys
from typing import Callable, Iterator, TypeVar

from flmiseg.core.errors import UserError

T = TypeVar('T')


class Registry(collections.abc.Mapping):
  """Names -> entries of one kind; read like a dict (`name in r`, `r[name]`, `sorted(r)`).

  Attributes:
    kind: what an entry is, for messages ('fusion operator').
    setting: the config field that names an entry ('config.model.fusion'), for messages.
  """

  def __init__(self, kind: str, setting: str):
    self.kind = kind
    self.setting = setting
    self._entries: dict[str, object] = {}

  def __getitem__(self, name: str):
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f'Registry({self.kind!r}: {", ".join(self._entries)})'

  def add(self, name: str, entry: T, *, override: bool = False) -> T:
    """Registers `entry` under `name` and returns it.

    Raises ValueError when `name` is not a non-empty string, or is taken by another entry and
    `override` is False (registering the same entry again is allowed: a module imported
    twice).
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
      raise ValueError(f'a {self.kind} name must be a non-empty string without surrounding '
                       f'spaces, got {name!r}')
    taken = self._entries.get(name)
    if taken is not None and taken is not entry and not override:
      raise ValueError(f'{self.kind} {name!r} is already registered ({_describe(taken)}); '
                       'pick another name, or pass override=True to replace it')
    self._entries[name] = entry
    return entry

  def remove(self, name: str):
    """Unregisters `name` and returns its entry (KeyError when none is registered)."""
    return self._entries.pop(name)

  def decorator(self, name: str, *, override: bool = False) -> Callable[[T], T]:
    """A decorator that registers what it decorates under `name` (see `add`)."""
    def register(entry: T) -> T:
      return self.add(name, entry, override=override)
    return register

  def resolve(self, name: str):
    """The entry named `name`; UserError naming `setting` and the valid names if none is."""
    if name not in self._entries:
      raise UserError(f'{self.setting}={name!r} is not a {self.kind}; valid names: '
                      f'{", ".join(sorted(self._entries))}')
    return self._entries[name]


def _describe(entry) -> str:
  """Where `entry` (or the builder of a ModelSpec or Backbone) is defined, for messages."""
  entry = getattr(entry, 'build', entry)
  module = getattr(entry, '__module__', None)
  qualname = getattr(entry, '__qualname__', None)
  return f'{module}.{qualname}' if module and qualname else repr(entry)


# ----------------------------------------------------------------------------- config.imports

def split_imports(spec: str) -> list[str]:
  """The entries of a `config.imports` value: comma-separated, spaces and empties dropped."""
  return [entry.strip() for entry in (spec or '').split(',') if entry.strip()]


def is_file_entry(entry: str) -> bool:
  """Whether a `config.imports` entry is a file path (ends in .py) rather than a module."""
  return entry.endswith('.py')


def normalize_imports(spec: str) -> str:
  """`spec` with its .py paths made absolute (resolved against the working directory), so a
  run's config.json names the same files wherever the run is later used from."""
  return ','.join(str(pathlib.Path(e).expanduser().resolve()) if is_file_entry(e) else e
                  for e in split_imports(spec))


def import_modules(spec: str, setting: str = 'config.imports') -> list[str]:
  """Imports every module or .py file that `spec` (a `config.imports` value) names, in order.

  A module name ('my_pkg.fusions') is imported as Python would (it must be on sys.path); a
  file ('/path/my_fusion.py') is loaded as a module named after it, once per process: a
  file already loaded is not run again. What they register (models, fusion operators,
  backbones, losses) can then be named by the config.

  Returns:
    The names the modules were imported as.
  Raises:
    UserError naming `setting` and the entry when a file is missing or an import fails.
  """
  names = []
  for entry in split_imports(spec):
    try:
      names.append(_import_file(entry, setting) if is_file_entry(entry) else
                   importlib.import_module(entry).__name__)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # the user's code may raise anything
      detail = ' '.join(f'{type(e).__name__}: {e}'.split())
      raise UserError(f'{setting}: importing {entry} failed ({detail})') from e
  return names


def _import_file(entry: str, setting: str) -> str:
  """Loads the file `entry` as a module (once per resolved path); returns its module name."""
  path = pathlib.Path(entry).expanduser().resolve()
  if not path.is_file():
    raise UserError(f'{setting}: {entry}: no such file')
  for module in list(sys.modules.values()):
    if getattr(module, '__file__', None) and pathlib.Path(module.__file__).resolve() == path:
      return module.__name__
  name = path.stem
  if not name.isidentifier() or name in sys.modules:
    # A stable name that no other module can hold (two files may share a stem).
    name = f'flmiseg_import_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  # Registered before running, as an import would: dataclasses (Flax modules) look it up.
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return name
