"""flmiseg.load(...).segment: the in-memory API (behind the napari widget) gives what
--mode=predict writes, for 2-D images, channels first or last, stacks and every option; the
inference core's resizing decisions (flmiseg/inference/segment.py)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tifffile

import flmiseg
from flmiseg.cli import predict
from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.inference import model
from flmiseg.inference import segment
from flmiseg.inference import tiling
from flmiseg.store import pretrained
from flmiseg.store import rundir
from tests import helpers


@pytest.fixture(scope='module')
def nucleus():
  """The shipped nucleus model, at each image's own size unless a test asks for resizing (its
  config.eval.measure_diameter off), so each test sees the one setting it varies;
  `test_the_shipped_nucleus_model_measures_its_objects_by_default` checks the default."""
  config = rundir.read_config(pretrained.resolve_model('nucleus'))
  config.eval.measure_diameter = False
  return flmiseg.load('nucleus', config=config)


@pytest.fixture(scope='module')
def cells():
  """(a simulated 128x128 8-bit nucleus image, its ground-truth mask as bool)."""
  image, truth = simulate.simulate('nucleus', 128, synthetic.image_rng(3, 'test', 0))
  return image, truth > 0


def _iou(a, b) -> float:
  return (a & b).sum() / max((a | b).sum(), 1)


def test_model_segment_gives_the_files_of_predict(nucleus, cells, tmp_path):
  image, truth = cells
  (tmp_path / 'in').mkdir()
  io.write_tiff(tmp_path / 'in' / 'cells.tif', image)
  folder = pretrained.resolve_model('nucleus')
  predict.run(rundir.read_config(folder), folder, predict.Options(
      input=str(tmp_path / 'in'), output=str(tmp_path / 'out'), instances=True,
      save_prob=True))
  fractions = []
  result = flmiseg.load('nucleus').segment(image, instances=True, progress=fractions.append)
  assert result.axes == 'YX' and result.mask.dtype == np.uint8
  np.testing.assert_array_equal(result.mask, io.read_image(tmp_path / 'out' / 'cells_mask.tif')
                                // 255)
  np.testing.assert_array_equal(result.labels,
                                io.read_image(tmp_path / 'out' / 'cells_instances.tif'))
  np.testing.assert_array_equal(result.prob, tifffile.imread(tmp_path / 'out' / 'cells_prob.tif'))
  calibrated = json.loads((folder / 'calibration.json').read_text())['threshold']
  assert (result.threshold, result.threshold_source) == (calibrated, 'calibrated')
  assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
  assert _iou(result.mask > 0, truth) > 0.8
  # The shipped nucleus model splits touching nuclei with its instance head: no warning.
  assert nucleus.has_instance_head and result.labels.max() > 0
  assert not any('no instance head' in w for w in result.warnings)


def test_channels_first_or_last_and_stacks_segment_each_plane(nucleus, cells):
  image, _ = cells
  base = nucleus.segment(image).mask
  noise = np.random.default_rng(0).integers(0, 256, image.shape).astype(np.uint8)
  for data, kwargs, axes in [(np.stack([noise, image]), {'channel': 1}, 'CYX'),
                             (np.stack([noise, image], -1), {'channel': 1}, 'YXC'),
                             (np.stack([image, noise], -1), {'axes': 'YXC', 'channel': 0}, 'YXC')]:
    assert model.default_axes(data.shape, kwargs['channel']) == axes
    result = nucleus.segment(data, **kwargs)
    assert result.axes == 'YX', axes
    np.testing.assert_array_equal(result.mask, base, err_msg=axes)
  other = nucleus.segment(np.stack([noise, image]), channel=0).mask
  assert _iou(other > 0, base > 0) < 0.5  # the noise channel is not the nuclei
  stack = nucleus.segment(np.stack([image, image[::-1]]))  # ZYX: plane by plane
  assert stack.axes == 'ZYX' and stack.mask.shape == (2, *image.shape)
  np.testing.assert_array_equal(stack.mask[0], base)
  np.testing.assert_array_equal(stack.mask[1], nucleus.segment(image[::-1]).mask)


def test_threshold_and_tta(nucleus, cells):
  image, truth = cells
  calibrated = nucleus.segment(image)
  low, high = nucleus.segment(image, threshold=0.2), nucleus.segment(image, threshold=0.9)
  assert (low.threshold, low.threshold_source) == (0.2, 'threshold')
  np.testing.assert_array_equal(high.mask, calibrated.prob > 0.9)
  np.testing.assert_array_equal(low.mask, calibrated.prob > 0.2)
  assert high.mask.sum() < calibrated.mask.sum() < low.mask.sum()
  tta = nucleus.segment(image, tta=True)
  assert not np.array_equal(tta.prob, calibrated.prob)
  assert _iou(tta.mask > 0, truth) > 0.8


def test_a_tile_off_the_networks_stride_is_rounded_up_with_a_warning(nucleus, cells):
  # The networks pad a tile of 100 with zeros inside to 112 or 128; a rounded tile sees only
  # image pixels (or their reflection), and gives what the default tile (128) gives exactly.
  image, _ = cells
  default, off = nucleus.segment(image), nucleus.segment(image, tile=100)
  np.testing.assert_array_equal(off.prob, default.prob)
  assert off.warnings[0] == ('--tile=100 rounded up to 128, a multiple of 32: the networks '
                             'pad other sizes with zeros, which costs accuracy')
  assert not default.warnings and not nucleus.segment(image, tile=128).warnings


def test_pixels_without_data_are_background_with_a_warning(nucleus, cells):
  image, _ = cells
  holes = image.astype(np.float32)
  holes[:40] = np.nan
  result = nucleus.segment(holes)
  mirrored = holes.copy()
  mirrored[:40] = holes[80:40:-1]  # row y takes row 80 - y: the image mirrored at row 40
  filled = nucleus.segment(mirrored)
  assert result.prob[:40].max() == 0 and not result.mask[:40].any()
  assert filled.prob[:40].max() > 0
  np.testing.assert_array_equal(result.prob[40:], filled.prob[40:])
  assert result.warnings[0] == ('image: 5,120 NaN or inf pixel(s) read as no data: '
                                'background in the mask')


def test_hot_pixels_and_a_stitching_border_leave_the_mask_as_it_was(nucleus, cells):
  # Measured with the code before: the 40 saturated hot pixels emptied this mask (IoU 0.0
  # with the clean image's), and the black frame got 3,124 mask pixels.
  image, _ = cells
  camera = (image.astype(np.uint16) * 12 + 100)  # a 16-bit camera: offset 100
  clean = nucleus.segment(camera).mask > 0
  rng = np.random.default_rng(1)
  hot = camera.copy()
  hot[rng.integers(0, 128, 40), rng.integers(0, 128, 40)] = 65535
  assert _iou(nucleus.segment(hot).mask > 0, clean) > 0.97
  framed = np.zeros((128, 160), np.uint16)  # the image inside a black stitching frame
  framed[:, 32:] = camera + 1500  # a hazy background
  result = nucleus.segment(framed)
  assert not result.mask[:, :32].any() and 'read as no data' in result.warnings[0]
  assert _iou(result.mask[:, 32:] > 0, nucleus.segment(camera + 1500).mask > 0) > 0.97


def test_diameter_resizes_so_the_objects_match_the_models(nucleus, cells):
  """The shipped nucleus model records its nuclei's diameter (31 px): --diameter=15.5 runs the
  network on the image enlarged twice, exactly as a factor of 2 does, and gives the results
  at the image's own size; within 10 % of 31 nothing is resized."""
  image, _ = cells
  assert nucleus.config.data.object_diameter == 31.0
  result = nucleus.segment(image, diameter=15.5)
  assert result.mask.shape == image.shape
  assert result.warnings[0] == ('image: resized x2 so its objects (15.5 px, --diameter) '
                                "match the model's (31 px)")
  enlarged, _ = nucleus.predictor(segment.Settings()).plane(image, 2.0)
  np.testing.assert_array_equal(result.prob, enlarged[..., 0])
  np.testing.assert_array_equal(result.mask, enlarged[..., 0] > result.threshold)
  same = nucleus.segment(image, diameter=29)
  np.testing.assert_array_equal(same.mask, nucleus.segment(image).mask)
  assert not any('resized' in w for w in same.warnings)
  assert segment.model_factor(nucleus.config, None, 62.0) == (
      0.5, "resized x0.5 so its objects (62 px, --diameter) match the model's (31 px)")
  # Without --diameter, the pixel sizes decide (the shipped models record none: no resizing).
  assert segment.model_factor(nucleus.config, 0.1, None) == (1.0, None)


def test_object_diameter_is_the_area_weighted_median():
  labels = np.zeros((20, 20), np.uint16)
  labels[:2, :2] = 1  # 4 px
  labels[5:9, 5:9] = 2  # 16 px
  labels[10:15, 10:15] = 3  # 25 px: the 4 and 16 px ones cover less than half of the 45 px
  assert segment.object_diameter([labels]) == pytest.approx(2 * np.sqrt(25 / np.pi))
  # Planes are counted apart: object 1 of another plane is another object.
  other = np.zeros((20, 20), np.uint16)
  other[:10, :10] = 1  # 100 px: more than half of all 145
  assert segment.object_diameter([labels, other]) == pytest.approx(2 * np.sqrt(100 / np.pi))
  assert segment.object_diameter([np.zeros((4, 4), np.uint16)]) is None


def test_diameter_zero_measures_the_objects_on_a_first_pass(nucleus, cells):
  """Nuclei enlarged 3x (smooth, without pixel noise: the model finds them in pieces):
  measured larger than the model's, the image is shrunk towards its size."""
  image, truth = cells
  big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
  big_truth = np.kron(truth, np.ones((3, 3), bool))
  measured = nucleus.segment(big, diameter=0)
  note, resized = measured.warnings[:2]
  size = float(note.split('measure ')[1].split(' px')[0])
  assert note == f'image: its objects measure {size:.3g} px across (a first pass)'
  assert size > 1.1 * nucleus.config.data.object_diameter
  assert resized.startswith('image: resized x0.')
  first_pass, _ = nucleus.predictor(segment.Settings()).planes(big[None])
  settings, _ = nucleus.resolved(segment.Settings())
  given = nucleus.segment(big, diameter=segment.estimated_diameter(first_pass, settings)[0])
  np.testing.assert_array_equal(measured.mask, given.mask)
  plain = nucleus.segment(big, rescale=False)
  assert _iou(measured.mask > 0, big_truth) > _iou(plain.mask > 0, big_truth) + 0.05
  with pytest.raises(UserError, match=r'^--diameter=-1: must be a positive size in pixels, '
                     'or 0 to measure it$'):
    nucleus.segment(image, diameter=-1)


def test_the_shipped_nucleus_model_measures_its_objects_by_default(nucleus, cells):
  # Nuclei enlarged 2x: the shipped model measures them and shrinks the image, as
  # diameter=0 does; rescale=False or a diameter given leave its size alone.
  image, _ = cells
  big = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
  shipped = flmiseg.load('nucleus')
  assert shipped.config.eval.measure_diameter
  default = shipped.segment(big)
  assert default.warnings[0].startswith('image: its objects measure ')
  assert default.warnings[1].startswith('image: resized x0.')
  np.testing.assert_array_equal(default.mask, nucleus.segment(big, diameter=0).mask)
  plain = nucleus.segment(big)
  assert not plain.warnings
  for kwargs in ({'rescale': False}, {'diameter': 62}):
    other = shipped.segment(big, **kwargs)
    assert not any('measure' in w for w in other.warnings), (kwargs, other.warnings)
  # The image's pixel size cannot decide for a model that records none: measured still.
  np.testing.assert_array_equal(shipped.segment(big, pixel_size=0.3).mask, default.mask)
  np.testing.assert_array_equal(shipped.segment(big, rescale=False).mask, plain.mask)


def test_diameter_needs_a_model_that_records_one_and_goes_alone(nucleus, cells, tmp_path):
  image, _ = cells
  with pytest.raises(UserError, match=r'^--diameter=12 with --pixel_size: give one'):
    nucleus.segment(image, diameter=12, pixel_size=0.2)
  with pytest.raises(UserError, match=r'^--diameter=12 with --no_rescale: give one'):
    predict.Options(input='x', output='x', diameter=12, rescale=False).check()
  er = flmiseg.load('er')
  assert not er.config.data.get('object_diameter')
  with pytest.raises(UserError, match=r'^--diameter=12: .*er records no object diameter '
                     r'\(config.data.object_diameter\)'):
    er.segment(image, diameter=12)
  io.write_tiff(tmp_path / 'cells.tif', image)  # --mode=predict: refused before any output
  with pytest.raises(UserError, match=r'^--diameter=12: .*er records no object diameter'):
    predict.run(er.config, er.folder, predict.Options(
        input=str(tmp_path / 'cells.tif'), output=str(tmp_path / 'out'), diameter=12))
  assert not (tmp_path / 'out').exists()


def test_default_axes():
  assert model.default_axes((64, 64), None) == 'YX'
  assert model.default_axes((64, 64), 0) == 'YX'  # channel 0 of a one-channel image
  assert model.default_axes((5, 64, 64), None) == 'ZYX'
  assert model.default_axes((2, 5, 64, 64), None) == 'TZYX'
  assert model.default_axes((3, 5, 64, 64), 1) == 'CZYX'
  assert model.default_axes((5, 64, 64, 2), 1) == 'ZYXC'
  assert model.default_axes((64, 64, 3), None, rgb=True) == 'YXS'
  assert model.default_axes((64, 64, 3), 2, rgb=True) == 'YXC'
  with pytest.raises(UserError, match='give them'):
    model.default_axes((2, 2, 2, 64, 64), None)


def test_bad_input_is_one_user_error(nucleus):
  image = np.zeros((2, 32, 32), np.uint8)
  with pytest.raises(UserError, match='2 channels'):
    nucleus.segment(image, axes='CYX')
  with pytest.raises(UserError, match='--channel=2'):
    nucleus.segment(image, channel=2)
  with pytest.raises(UserError, match='--threshold'):
    nucleus.segment(image[0], threshold=1.5)
  with pytest.raises(UserError, match='NaN'):
    nucleus.segment(np.full((32, 32), np.nan, np.float32))
  with pytest.raises(UserError, match='axes'):
    nucleus.segment(image, axes='YX')
  with pytest.raises(UserError, match='neither a shipped model'):
    flmiseg.load('nuclei')


def test_a_model_takes_the_config_main_resolves(nucleus, cells):
  """Built from (folder, config) as --mode=predict builds it, the command line's inference
  settings count: a min_size above every nucleus leaves no instance."""
  image, _ = cells
  config = rundir.read_config(nucleus.folder)
  config.eval.min_size = 10 ** 6
  strict = model.Model(nucleus.folder, config)
  assert (strict.min_size, nucleus.min_size) == (10 ** 6, 16)
  assert strict.step == nucleus.step and strict.threshold == nucleus.threshold
  assert strict.threshold_source == 'calibrated' and nucleus.has_instance_head
  assert strict.object_diameter == 31.0 and strict.pixel_size is None
  assert strict.input_stats == nucleus.input_stats and strict.input_stats['images'] > 0
  assert strict.segment(image, instances=True).labels.max() == 0
  assert nucleus.segment(image, instances=True, min_size=10 ** 6).labels.max() == 0
  config.eval.threshold = 1.5
  with pytest.raises(UserError, match=r'^config.eval.threshold=1.5: must be a number in '
                     r'\[0, 1\]$'):
    model.Model(nucleus.folder, config)


def test_loading_a_model_builds_no_training_and_imports_no_file_layer():
  code = ('import sys, numpy, flmiseg; m = flmiseg.load("er"); '
          'r = m.segment(numpy.zeros((40, 40), numpy.uint8)); '
          "print(r.mask.shape, sorted(n for n in sys.modules if n.startswith("
          "('flmiseg.train', 'flmiseg.cli', 'flmiseg.export', 'flmiseg.evaluation', 'optax'))))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, env=helpers.cli_env(1))
  assert out.stdout.strip().splitlines()[-1] == '(40, 40) []'


def test_on_batch_reports_every_tile():
  calls = []
  tiling.sliding_window(lambda t: t, np.zeros((100, 150), np.float32), tile=64,
                           overlap=0.25, batch_size=4,
                           on_batch=lambda done, total: calls.append((done, total)))
  assert calls == [(4, 6), (6, 6)]


def test_core_and_plugin_package_import_without_napari_or_qt():
  code = ('import sys, flmiseg.main, flmiseg.cli.predict, flmiseg.inference.model, flmiseg.napari; '
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'magicgui', 'vispy'}))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == '[]'


def test_diameter_zero_reuses_its_first_pass_when_no_resizing_follows(nucleus, cells,
                                                                       monkeypatch):
  image, _ = cells
  passes = []
  planes = segment.Predictor.planes
  monkeypatch.setattr(segment.Predictor, 'planes',
                      lambda self, *a, **k: passes.append(a[1:2]) or planes(self, *a, **k))
  # Measured at the model's own 31 px: one pass, and the mask of no --diameter at all.
  monkeypatch.setattr(segment, 'object_diameter', lambda _: 31.0)
  measured = nucleus.segment(image, diameter=0)
  assert len(passes) == 1
  assert measured.warnings[0] == 'image: its objects measure 31 px across (a first pass)'
  np.testing.assert_array_equal(measured.prob, nucleus.segment(image).prob)
