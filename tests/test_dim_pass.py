"""The dim pass (flmiseg/inference/segment.py: `dim_pass`, predict's --dim_gain): a second look,
with the bright parts clipped, adds the objects too dim for the first pass, and nothing else.

A stand-in network makes the arithmetic exact: its probability is 1 where the normalised
pixel exceeds CUT, else 0, pixel by pixel, so every tile agrees and the blended outputs are
exactly that step of the whole plane's normalisation."""

import numpy as np
import pytest

from flmiseg.configs import default
from flmiseg.core.errors import UserError
from flmiseg.inference import segment
from flmiseg.train import config_checks

CUT = 0.25
DIAMETER = 12.0  # the stand-in model's object diameter (config.data.object_diameter)


def _predictor() -> segment.Predictor:
  config = default.get_config()
  config.data.kind, config.data.normalization = 'nucleus', 'percentile'
  config.data.object_diameter = DIAMETER
  step = lambda tiles: (np.asarray(tiles) > CUT).astype(np.float32)
  return segment.Predictor(step, config, tile=64, overlap=0.25, batch_size=4)


def _disc(shape, center, radius) -> np.ndarray:
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


def _image(dim_level: float | None = 80.0):
  """128x128 float32: background 100 with noise of sigma 1, three bright discs 1,000 above
  it, and (unless `dim_level` is None) one disc `dim_level` above it: (image, bright, dim)."""
  shape = (128, 128)
  image = 100.0 + np.random.default_rng(0).normal(0.0, 1.0, shape)
  bright = np.zeros(shape, bool)
  for center in ((30, 30), (30, 90), (90, 30)):
    bright |= _disc(shape, center, 6)
  image[bright] += 1000.0
  dim = _disc(shape, (90, 90), 6) if dim_level is not None else np.zeros(shape, bool)
  image[dim] += dim_level or 0.0
  return image.astype(np.float32), bright, dim


def _segment(image, dim_gain: float) -> np.ndarray:
  settings = segment.Settings(threshold=0.5, dim_gain=dim_gain, min_size=0, seed_dynamic=0.1)
  return segment.segment_planes(_predictor(), image[None], settings).mask[0]


def test_the_dim_pass_adds_the_object_the_first_pass_missed_and_nothing_else():
  image, bright, dim = _image()
  # The first pass: the dim disc is 80 / ~1,000 of the range, under the stand-in's cut.
  assert np.array_equal(_segment(image, 0.0), bright)
  # Clipped at a quarter of the range it is about 80 / 250 of it: found, exactly.
  assert np.array_equal(_segment(image, 4.0), bright | dim)
  settings = segment.Settings(threshold=0.5, dim_gain=4.0, min_size=0)
  notes = segment.segment_planes(_predictor(), np.stack([image, image]), settings).notes
  assert notes == ['the dim pass (--dim_gain=4) added 2 objects']


def test_without_dim_objects_the_dim_pass_changes_nothing():
  image, bright, _ = _image(dim_level=None)
  first = segment.segment_planes(_predictor(), image[None], segment.Settings(
      threshold=0.5, dim_gain=0.0, min_size=0))
  second = segment.segment_planes(_predictor(), image[None], segment.Settings(
      threshold=0.5, dim_gain=4.0, min_size=0))
  assert np.array_equal(first.mask[0], bright)
  np.testing.assert_array_equal(first.outputs, second.outputs)
  assert first.notes == [] and second.notes == ['the dim pass (--dim_gain=4) added 0 objects']


def test_specks_and_objects_beside_bright_ones_are_not_added():
  image, bright, _ = _image(dim_level=None)
  # A dim 3x3 speck: under a tenth of a 12-px disc (11.3 px).
  image[60:63, 60:63] += 80.0
  # A dim disc whose edge lies within the first pass's objects grown by 4 px.
  beside = _disc(image.shape, (30, 47), 6)
  image[beside & ~bright] += 80.0
  assert np.array_equal(_segment(image, 4.0), bright)


def test_a_gain_too_low_is_refused_and_so_is_a_model_without_an_object_diameter():
  with pytest.raises(UserError, match=r'^--dim_gain=0\.5: 0 \(off\) or a gain above 1'):
    segment.Settings(dim_gain=0.5).check()
  segment.Settings(dim_gain=0.0).check()
  segment.Settings(dim_gain=4.0).check()
  config = default.get_config()
  with pytest.raises(UserError, match=r'--dim_gain=4: run/x records no object diameter'):
    segment.check_dim_gain(config, 4.0, 'run/x')
  segment.check_dim_gain(config, 0.0, 'run/x')
  config.eval.dim_gain = 1.0
  with pytest.raises(UserError, match=r'config\.eval\.dim_gain=1\.0: must be 0 \(off\) or a '
                                      r'gain above 1'):
    config_checks.validate(config)
  config.eval.dim_gain = 4.0
  with pytest.raises(UserError, match=r'config\.eval\.dim_gain=4 sizes the objects .*'
                                      r'object_diameter, which is 0'):
    config_checks.validate(config)
  config.data.object_diameter = 20.0
  config_checks.validate(config)


def test_predict_refuses_the_dim_pass_block_by_block(tmp_path):
  from flmiseg.cli import predict  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.object_diameter = DIAMETER
  options = predict.Options(input=str(tmp_path / 'in.zarr'), output=str(tmp_path / 'out.zarr'),
                            chunked=True, dim_gain=4.0)
  with pytest.raises(UserError, match=r"^--dim_gain=4: not block by block .* the first "
                                      r"pass's objects over the whole image$"):
    predict.run(config, tmp_path / 'run', options)
  assert not (tmp_path / 'out.zarr').exists()


def test_pixels_without_data_stay_background_after_the_dim_pass():
  image, bright, dim = _image()
  missing = np.zeros(image.shape, bool)
  missing[84:97, 84:97] = True  # the dim disc's pixels have no data (repaired ones seen)
  settings = segment.Settings(threshold=0.5, dim_gain=4.0, min_size=0)
  found = segment.segment_planes(_predictor(), image[None], settings, missing=missing[None])
  assert not found.mask[0][missing].any()
  assert np.array_equal(found.mask[0] & ~missing, (bright | dim) & ~missing)
