"""What every task of a chunked run needs, as one picklable description (`Job`): the input,
the model (as a recipe each worker process loads once), the settings, the grid, each plane's
statistics and where the outputs and the run's records go. The run's records (`State`) make it
resumable: a task's record is written after its outputs, atomically, so a run killed at any
point and started again redoes exactly the tasks without one.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import ml_collections
import numpy as np

from flmiseg.chunked import grid as grid_lib
from flmiseg.chunked import sources
from flmiseg.chunked import statistics
from flmiseg.core import registry
from flmiseg.inference import model as model_lib
from flmiseg.inference import segment


@dataclasses.dataclass(frozen=True)
class ModelRecipe:
  """How a worker process loads the driver's model: its folder, the config the driver
  resolved (with the command line's inference settings) and the code it imported."""
  folder: str
  config_json: str
  imports: str = ''

  @property
  def key(self) -> tuple[str, str]:
    return self.folder, self.config_json

  def load(self) -> model_lib.Model:
    registry.import_modules(self.imports)
    return model_lib.Model(self.folder, ml_collections.ConfigDict(json.loads(self.config_json)))

  @classmethod
  def of(cls, model: model_lib.Model) -> 'ModelRecipe':
    return cls(str(model.folder), model.config.to_json(), model.config.get('imports', ''))


@dataclasses.dataclass(frozen=True)
class Outputs:
  """Where a run writes: the zarr groups of the image (None when the labels go into the
  input's labels/ group) and of each label image, the objects table, the records."""
  image: str | None  # the new OME-Zarr's root (the probability image)
  labels: str  # the labels/ group
  table: str | None  # <name>_objects.csv, with instances
  state: str  # the run's records

  def label(self, name: str) -> str:
    return str(pathlib.Path(self.labels) / name)


@dataclasses.dataclass(frozen=True)
class Job:
  """One chunked run (see the module docstring)."""
  source: sources.Source
  recipe: ModelRecipe
  settings: segment.Settings  # resolved: threshold, seed dynamic and min size set
  grid: grid_lib.Grid
  stats: tuple[statistics.PlaneStats, ...]  # per plane; () before they are measured
  outputs: Outputs
  id_dtype: str  # the instance ids' dtype: uint32, or uint64 past 2**32 pixels a plane
  save_prob: bool


class State:
  """The records of a run in its folder: `run.json` (what the run is), one empty file per
  finished task (`done`/`mark`) and small arrays (`save`/`load`)."""

  def __init__(self, folder):
    self.folder = pathlib.Path(folder)

  def _path(self, kind: str, name: str, suffix: str = '') -> pathlib.Path:
    return self.folder / kind / f'{name}{suffix}'

  def done(self, kind: str, name: str) -> bool:
    return self._path(kind, name, '.done').exists()

  def mark(self, kind: str, name: str) -> None:
    path = self._path(kind, name, '.done')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()

  def save(self, kind: str, name: str, **arrays) -> None:
    """Writes arrays atomically (a temporary file renamed), so a record is whole or absent."""
    path = self._path(kind, name, '.npz')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp.npz')
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)

  def load(self, kind: str, name: str) -> dict:
    with np.load(self._path(kind, name, '.npz')) as data:
      return {k: data[k] for k in data.files}

  def has(self, kind: str, name: str) -> bool:
    return self._path(kind, name, '.npz').exists()

  def identity(self) -> dict | None:
    path = self.folder / 'run.json'
    return json.loads(path.read_text()) if path.exists() else None

  def start(self, identity: dict) -> None:
    self.folder.mkdir(parents=True, exist_ok=True)
    tmp = self.folder / '.run.json.tmp'
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    os.replace(tmp, self.folder / 'run.json')

  def remove(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)
