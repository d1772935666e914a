"""Files that a run writes: each whole, and on several processes by process 0 only.

`write_atomic` writes a temporary file and renames it over the target (os.replace), so a
reader (or a run killed mid-write) sees the old file or the whole new one, never half of it.
`is_primary` tells the one process that computes the host-side results and writes the files.
"""

import json
import os
import pathlib
from typing import Callable

import jax

from flmiseg.core.errors import UserError


def is_primary() -> bool:
  """Whether this is process 0, which alone computes the host-side metrics and writes files."""
  return jax.process_index() == 0


def write_atomic(path, write: Callable[[pathlib.Path], None],
                 failure: str | None = None) -> None:
  """Calls write(temporary path) and renames the file to `path` (os.replace).

  The temporary name is per process: hosts sharing a workdir may write concurrently. A failed
  write leaves `path` as it was and raises a UserError `<failure> (<reason>)`, by default
  `<path>: cannot write it`.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.{jax.process_index()}.tmp')
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise UserError(f'{failure or f"{path}: cannot write it"} ({e.strerror})') from e


def write_text_atomic(path, text: str, failure: str | None = None) -> None:
  """`text` into `path` (`write_atomic`)."""
  write_atomic(path, lambda tmp: tmp.write_text(text), failure)


def write_json_atomic(path, obj, failure: str | None = None) -> None:
  """`obj` as JSON (indented, keys sorted) into `path` (`write_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n', failure)
