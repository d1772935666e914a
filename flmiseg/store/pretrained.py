"""Packed models: a trained run reduced to what inference needs, and the shipped models.

A packed model is a folder that reads like a run directory (flmiseg/store/rundir.py):
  config.json        the training config (architecture, preprocessing, pixel size), with
                     train.init_from cleared (the source is recorded in weights.json);
  calibration.json   the calibrated threshold of the packed checkpoint;
  input_stats.json   statistics of the normalised training images (domain warnings);
  weights.msgpack    `params` and `batch_stats` (flax msgpack: plain arrays, no code, never
                     unpickled), stored as float16 or float32;
  weights.json       the SHA-256 of weights.msgpack, the storage dtype, the checkpoint step
                     and how the model was made.
Loading checks the hash first: a tampered or truncated file is refused with one line.
flmiseg/store/weights.py packs a run (`weights.pack`) and loads either kind of folder.
The shipped models (`SHIPPED`: er, mito, nucleus) live in flmiseg/pretrained/<name>/ and are
named on the command line: `--model=nucleus`; `--model=DIR` takes any run or packed folder.
"""

import hashlib
import json
import pathlib

from flax import serialization
import jax
import numpy as np

from flmiseg.core.errors import UserError

PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent.parent / 'pretrained'
SHIPPED = ('er', 'mito', 'nucleus')
WEIGHTS_FILE = 'weights.msgpack'
WEIGHTS_INFO = 'weights.json'


def is_packed(folder) -> bool:
  return (pathlib.Path(folder) / WEIGHTS_FILE).is_file()


def resolve_model(spec: str, setting: str = '--model') -> pathlib.Path:
  """The folder `spec` names: a shipped model's, or a run/packed directory."""
  if spec in SHIPPED:
    folder = PRETRAINED_DIR / spec
    if not is_packed(folder):
      raise UserError(f'{setting}={spec}: the shipped model is missing from {folder} (a '
                      'broken install?); reinstall flmiseg')
    return folder
  folder = pathlib.Path(spec)
  if not folder.is_dir():
    raise UserError(f'{setting}={spec}: neither a shipped model ({", ".join(SHIPPED)}) nor '
                    'a folder')
  return folder


def sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def load_variables(folder, target) -> tuple[dict, int]:
  """({'params', 'batch_stats'} as float32 arrays shaped like `target`, checkpoint step).

  Raises UserError when the hash does not match weights.json or the arrays do not fit the
  model the folder's config.json describes.
  """
  folder = pathlib.Path(folder)
  try:
    info = json.loads((folder / WEIGHTS_INFO).read_text())
    expected = info['sha256']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'{folder / WEIGHTS_INFO}: unreadable or without a sha256 ({e})') from e
  actual = sha256(folder / WEIGHTS_FILE)
  if actual != expected:
    raise UserError(f'{folder / WEIGHTS_FILE}: SHA-256 {actual[:12]}... does not match '
                    f'{expected[:12]}... in {WEIGHTS_INFO}; the file is damaged or was '
                    'changed: not loading it')
  try:
    stored = serialization.msgpack_restore((folder / WEIGHTS_FILE).read_bytes())
    variables = serialization.from_state_dict(target, stored)
  except Exception as e:  # pylint: disable=broad-except  # msgpack/flax raise many types.
    raise UserError(f'{folder / WEIGHTS_FILE}: does not fit the model of its config.json '
                    f'({type(e).__name__}: {" ".join(str(e).split())[:200]})') from e
  for want, got in zip(jax.tree.leaves(target), jax.tree.leaves(variables)):
    if tuple(want.shape) != tuple(np.shape(got)):
      raise UserError(f'{folder / WEIGHTS_FILE}: an array of shape {np.shape(got)} where the '
                      f'model of its config.json has {tuple(want.shape)}')
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
  return variables, int(info.get('step', 0))
