"""A trained model's inference settings, each decided in one place: the value given, else the
one calibrated for this checkpoint, else the config's.

  threshold:     the probability threshold of the mask (`threshold`): given, else calibrated
                 for the checkpoint (DIR/calibration.json), else config.eval.threshold;
  seed dynamic:  the h of the instance seeds' h-maxima (`seed_dynamic`): given, else
                 calibrated, else config.eval.seed_dynamic (instances.SEED_DYNAMIC when the
                 config has none);
  min size:      the smallest instance kept, pixels (`min_size`): given, else
                 config.eval.min_size;
  diameter:      the image's objects' diameter it is resized by (`diameter`): given, else
                 MEASURED (a first pass measures them) where config.eval.measure_diameter
                 says so and nothing else decides the image's size, else None;
  dim gain:      the gain of the dim pass that looks again for objects too dim for the first
                 (`dim_gain`; 0: none): given, else config.eval.dim_gain.

DIR/calibration.json holds what calibration chose on the validation split
(flmiseg/evaluation/calibration.py computes it): the threshold, the seeds' dynamic (models
with an instance head) and the checkpoint step they were chosen for. A calibration made for
another checkpoint than the one loaded counts as none.

`calibration` arguments are the run folder (read here), or the dict already read or just
computed (`read_calibration`, `calibration.calibrate`), or None.
"""

import json
import pathlib

from absl import logging

from flmiseg.core import files
from flmiseg.objects import instances

CALIBRATION_FILE = 'calibration.json'
# Where a threshold came from (the second item of `threshold`'s result).
GIVEN, CALIBRATED, CONFIG_THRESHOLD = 'threshold', 'calibrated', 'config.eval.threshold'


def write_calibration(workdir, result: dict) -> None:
  """`result` into DIR/calibration.json (whole: `files.write_json_atomic`)."""
  files.write_json_atomic(pathlib.Path(workdir) / CALIBRATION_FILE, result)


def read_calibration(workdir) -> dict | None:
  """DIR/calibration.json as a dict, or None when missing or unreadable."""
  path = pathlib.Path(workdir) / CALIBRATION_FILE
  try:
    stored = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning('Ignoring %s: unreadable (%s)', path, e)
    return None
  if not isinstance(stored, dict) or not isinstance(stored.get('threshold'), (int, float)):
    logging.warning('Ignoring %s: no threshold in it', path)
    return None
  return stored


def _for_step(calibration, step: int) -> dict:
  """The calibration (a folder, a dict or None) when it was made for checkpoint `step`, else
  {}."""
  if calibration is not None and not isinstance(calibration, dict):
    calibration = read_calibration(calibration)
  if not calibration or calibration.get('checkpoint_step') != step:
    return {}
  return calibration


def calibrated_threshold(calibration, step: int) -> float | None:
  """The threshold calibrated for checkpoint `step`, or None (no calibration, or one made for
  another checkpoint)."""
  value = _for_step(calibration, step).get('threshold')
  return float(value) if isinstance(value, (int, float)) else None


def calibrated_dynamic(calibration, step: int) -> float | None:
  """The instance seeds' dynamic calibrated for checkpoint `step`, or None."""
  value = _for_step(calibration, step).get('seed_dynamic')
  return float(value) if isinstance(value, (int, float)) else None


def threshold(config, calibration, step: int,
              given: float | None = None) -> tuple[float, str]:
  """(threshold, where it came from: GIVEN, CALIBRATED or CONFIG_THRESHOLD): `given`, else
  calibrated for checkpoint `step`, else config.eval.threshold."""
  if given is not None:
    return given, GIVEN
  calibrated = calibrated_threshold(calibration, step)
  if calibrated is not None:
    return calibrated, CALIBRATED
  return config.eval.threshold, CONFIG_THRESHOLD


def seed_dynamic(config, calibration, step: int, given: float | None = None) -> float:
  """The instance seeds' dynamic: `given`, else calibrated for checkpoint `step`, else
  config.eval.seed_dynamic (instances.SEED_DYNAMIC when the config has none)."""
  if given is not None:
    return given
  calibrated = calibrated_dynamic(calibration, step)
  if calibrated is not None:
    return calibrated
  return configured_dynamic(config)


def configured_dynamic(config) -> float:
  """The config's seed dynamic: config.eval.seed_dynamic, instances.SEED_DYNAMIC without one
  (also where calibration starts from)."""
  return config.eval.get('seed_dynamic', instances.SEED_DYNAMIC)


MEASURED = 0.0  # a diameter of 0: measured on a first pass (segment.AUTO_DIAMETER)


def diameter(config, given: float | None, pixel_size: float | None = None,
             rescale: bool = True, measure: bool = True) -> float | None:
  """The objects' diameter (pixels) an image is resized by so they match the model's: `given`
  (MEASURED: measured), else MEASURED when config.eval.measure_diameter is set, the model
  records an object diameter and nothing else decides the size (pixel sizes decide it when
  both the image's, `pixel_size`, and the model's are known), `rescale` is allowed and
  `measure` (a first pass) possible; else None (no resizing by objects)."""
  if given is not None:
    return given
  data = config.data
  by_pixel_size = bool(pixel_size and data.pixel_size)
  if (measure and rescale and not by_pixel_size and data.get('object_diameter', 0.0) and
      config.eval.get('measure_diameter', False)):
    return MEASURED
  return None


def dim_gain(config, given: float | None = None) -> float:
  """The dim pass's gain (flmiseg/inference/segment.py: `dim_pass`; 0: no dim pass): `given`,
  else config.eval.dim_gain (0 when the config has none)."""
  return given if given is not None else float(config.eval.get('dim_gain', 0.0))


def min_size(config, given: int | None = None) -> int:
  """The smallest instance kept, pixels: `given`, else config.eval.min_size."""
  return given if given is not None else config.eval.min_size
