"""A trained run directory is the model: what inference needs is read from it, not retyped.

  DIR/config.json       the resolved training config: architecture, preprocessing, pixel size
                        (the source of truth for --mode=eval|predict|summary);
  DIR/calibration.json  the threshold (and instance seeds) calibrated for the best checkpoint
                        (flmiseg/store/settings.py reads it);
  DIR/input_stats.json  statistics of the normalised training images and masks, against which
                        predict checks that a new image looks like what the model was trained on;
  DIR/checkpoints/      the weights (the best checkpoint; runs written before kept it in
                        DIR/checkpoints_best/, still read).

On the inference modes the command line may change only inference settings (the eval batch
size and thresholds, the test list: the fields whose rule says so in config_checks.RULES,
passed to `inference_config`); any other field that differs from the run's is refused, naming
the field and both values, because it would silently change the preprocessing or the network.

`config.imports` (code of the user's own that registers models, fusion operators, backbones or
losses: flmiseg/core/registry.py) is neither kind of field (`CODE_FIELDS`): it is code, and a run
directory is something people share, so loading one never runs it on its own. When the run's
config names imports, the command line must name the code to import itself (`--config.imports=`
the run's modules, or the user's copy of them elsewhere, which then replaces the run's) or pass
`--trust_imports` to import the run's; otherwise nothing runs (`imports_to_run`).
"""

import json
import math
import pathlib

import ml_collections
import numpy as np

from flmiseg.core import registry
from flmiseg.configs import default
from flmiseg.data import preprocess
from flmiseg.core.errors import UserError

CONFIG_FILE = 'config.json'
STATS_FILE = 'input_stats.json'
# Fields that name code to import (see the module docstring): the command line's value is
# neither refused nor copied by `inference_config`; `imports_to_run` decides.
CODE_FIELDS = ('imports',)


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a.b': value} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_trained(workdir) -> pathlib.Path:
  """The run directory, or a UserError when it holds no trained model."""
  workdir = pathlib.Path(workdir)
  # checkpoints_best/: the best checkpoint of runs written before (flmiseg/store/checkpoint.py)
  folders = [workdir / 'checkpoints', workdir / 'checkpoints_best']
  has_weights = any(f.is_dir() and any(p.name.isdigit() for p in f.iterdir()) for f in folders)
  has_weights = has_weights or (workdir / 'weights.msgpack').is_file()  # a packed model
  if not (workdir / CONFIG_FILE).is_file() or not has_weights:
    what = 'no such folder' if not workdir.exists() else (
        f'no {CONFIG_FILE}' if not (workdir / CONFIG_FILE).is_file() else 'no checkpoint')
    raise UserError(f'--workdir={workdir}: not a trained run ({what}); train one with '
                    '--mode=train, or give the folder of a trained run')
  return workdir


def read_config(workdir) -> ml_collections.ConfigDict:
  """The run's config from DIR/config.json, on top of today's defaults (so a run made before
  a field existed gets that field's default, which reproduces its old behaviour)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f'{path}: unreadable ({e})') from e
  if not isinstance(saved, dict):
    raise UserError(f'{path}: not a config (expected a JSON object)')
  config = default.get_config()
  for key, value in with_legacy_fields(flatten(saved)).items():
    set_field(config, key, value)
  return config


def with_legacy_fields(saved: dict) -> dict:
  """A flattened saved config with the fields whose default would not reproduce the run.

  config.data.seed: a run made before it existed simulated its dataset with config.seed, so
  its data.seed is its seed (when its data was simulated; for lists it has no effect).
  """
  saved = dict(saved)
  if ('data.seed' not in saved and 'seed' in saved
      and saved.get('data.source', 'synthetic') == 'synthetic'):
    saved['data.seed'] = saved['seed']
  return saved


def set_field(config: ml_collections.ConfigDict, key: str, value) -> None:
  """Sets the dotted field `key` ('data.kind'), creating missing sections; JSON's lists and
  ints become the tuples and floats the field holds."""
  *sections, field = key.split('.')
  node = config
  for section in sections:
    if section not in node:
      node[section] = ml_collections.ConfigDict()
    node = node[section]
  if field in node and isinstance(node[field], tuple) and isinstance(value, list):
    value = tuple(value)
  if field in node and isinstance(node[field], float) and isinstance(value, int):
    value = float(value)
  node[field] = value


def _is_field(key: str, fields: tuple[str, ...]) -> bool:
  return any(key == f or (f.endswith('.') and key.startswith(f)) for f in fields)


def inference_config(workdir, given: ml_collections.ConfigDict | None,
                     inference_fields: tuple[str, ...], model_fields: tuple[str, ...]):
  """The run's config, with the inference settings of `given` (the command line's) applied.

  `inference_fields` are the fields (a prefix ending in '.': a whole section) an inference
  mode may take from the command line, `model_fields` the prefixes of those that define the
  network and what it sees (config_checks.fields_with_role). Raises UserError naming the
  first field where `given` would change the model or its preprocessing.
  """
  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  if given is None:
    return config
  trained = flatten(json.loads(config.to_json()))
  # The fields that change the network's input or output are named first.
  given_fields = sorted(flatten(json.loads(given.to_json())).items(),
                        key=lambda kv: not kv[0].startswith(model_fields))
  for key, value in given_fields:
    if _is_field(key, inference_fields) or key in CODE_FIELDS:
      continue
    if key not in trained and key.startswith(model_fields):  # a free-form field, as
      # config.model.fusion_kwargs.<name>, that the run does not set
      raise UserError(
          f'--config.{key}={value!r}, but the model in {workdir} was trained without it; '
          f'eval/predict/summary take the model settings from {workdir / CONFIG_FILE}: '
          'leave it out')
    if key in trained and trained[key] != value:
      raise UserError(
          f'--config.{key}={value!r}, but the model in {workdir} was trained with '
          f'{trained[key]!r}; eval/predict/summary take the model settings from '
          f'{workdir / CONFIG_FILE}: leave --config out, or change only inference settings')
  for key, value in given_fields:
    if _is_field(key, inference_fields):
      set_field(config, key, value)
  return config


def imports_to_run(workdir, config: ml_collections.ConfigDict, named: str | None,
                   trust: bool) -> str:
  """The `config.imports` an inference mode may import for the run in `workdir`.

  Args:
    workdir: the run directory (for the message).
    config: the run's config (`inference_config`).
    named: the imports the command line names itself (--config.imports=...), or None.
    trust: --trust_imports: import what the run's config names.
  Returns:
    `named` when given (the user's own choice of code), else the run's imports when `trust`
    or when it names none.
  Raises:
    UserError naming the run's modules when it names some and neither was given.
  """
  if named is not None:
    return named
  entries = registry.split_imports(config.get('imports', ''))
  if not entries or trust:
    return ','.join(entries)
  raise UserError(
      f'{pathlib.Path(workdir) / CONFIG_FILE} names code to import ({", ".join(entries)}); a '
      'run directory never runs code on its own: name it yourself with '
      f'--config.imports={",".join(entries)} (or your copy of it), or pass --trust_imports')


# ----------------------------------------------------------------------------- input stats

def input_stats(source, mirror: float | None = None) -> dict:
  """`summarize_stats` of a prepared source (flmiseg/data/dataset.py: cached normalised
  images and masks). `mirror`: the training also showed each image x as mirror - x (the
  'invert' augmentation, flmiseg/data/pipeline.py), so those count too."""
  per_image, foreground = [], []
  for image_file, mask_file in source.files:
    image = np.load(image_file, mmap_mode='r')
    per_image.append(preprocess.image_stats(image))
    if mirror is not None:
      per_image.append(preprocess.image_stats(mirror - np.asarray(image, np.float64)))
    foreground.append(float(np.load(mask_file, mmap_mode='r').mean()))
  return summarize_stats(per_image, foreground)


def summarize_stats(per_image: list[dict], foreground: list[float]) -> dict:
  """{'images': n, 'stats': {name: {mean, std, min, max}}, 'foreground': {...}} of the
  per-image statistics of the normalised training images and their masks' foreground
  fractions."""
  def describe(values):
    v = np.asarray(values, np.float64)
    return {'mean': float(v.mean()), 'std': float(v.std()), 'min': float(v.min()),
            'max': float(v.max())}
  names = per_image[0].keys()
  return {'images': len(foreground),
          'stats': {k: describe([s[k] for s in per_image]) for k in names},
          'foreground': describe(foreground)}


def write_input_stats(workdir, stats: dict) -> None:
  from flmiseg.core import files  # pylint: disable=g-import-not-at-top  # (JAX-heavy)
  files.write_json_atomic(pathlib.Path(workdir) / STATS_FILE, stats)


def read_input_stats(workdir) -> dict | None:
  """DIR/input_stats.json, or None (runs made before it existed)."""
  try:
    return json.loads((pathlib.Path(workdir) / STATS_FILE).read_text())
  except (OSError, ValueError):
    return None


# How far (in training standard deviations, and beyond the training range by this fraction of
# it) an image's statistic may lie before predict warns that the image is unlike the training
# images.
OUTLIER_SIGMAS = 4.0
OUTLIER_RANGE_MARGIN = 0.25
# Predicted foreground fractions that mean "nothing" or "everything" was found.
EMPTY_FRACTION, FULL_FRACTION = 1e-4, 0.99


def unusual_stats(stats: dict, training: dict | None) -> list[str]:
  """Names (with values) of the statistics of one normalised image that lie far outside the
  training images' (`summarize_stats`); [] when training stats are unknown."""
  if not training:
    return []
  unusual = []
  for name, value in stats.items():
    ref = training['stats'].get(name)
    if ref is None or not math.isfinite(value):
      continue
    margin = OUTLIER_RANGE_MARGIN * (ref['max'] - ref['min'])
    outside = not ref['min'] - margin <= value <= ref['max'] + margin
    if outside and abs(value - ref['mean']) > OUTLIER_SIGMAS * max(ref['std'], 1e-3):
      unusual.append(f'{name} {value:.3g} (training {ref["min"]:.3g}..{ref["max"]:.3g})')
  return unusual


def foreground_note(fraction: float) -> str | None:
  """A warning when the predicted foreground covers ~none or ~all of an image."""
  if fraction < EMPTY_FRACTION:
    return f'the mask is empty ({fraction:.2%} foreground)'
  if fraction > FULL_FRACTION:
    return f'the mask covers {fraction:.2%} of the image'
  return None
