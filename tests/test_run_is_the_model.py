"""A trained run directory is a self-contained inference artifact, through the real CLI.

eval, predict and summary need only --workdir; the same intensities in any container give the
same mask; axes, channels and pixel size are read from the file and written back; the model's
pixel size rescales images; the console holds no library log lines; bad inference input gives
one line, exit status 2 and creates nothing. All subprocesses start together in one fixture
(4 at a time) and each test checks its own.
"""

import concurrent.futures
import json
import pathlib
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import tifffile

from flmiseg.data import io
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
# Lines that absl, jax, orbax or XLA would print in their own formats.
LIBRARY_LINE = re.compile(r'^([IWEF]\d{4} \d\d:\d\d|WARNING:absl|INFO:absl|.*orbax|.*Platform '
                          r"'\w+'|.*TPU)", re.MULTILINE)


def _run(args, cwd=REPO, console_script=False, fresh=False):
  """The command in a process forked from the test CLI server; `console_script`: the
  installed `flmiseg` command, and `fresh`: a new interpreter (a quiet console from the
  first import on)."""
  if not console_script:
    return helpers.run_cli(args, devices=3, backend_level_0=True, cwd=cwd, fresh=fresh)
  return subprocess.run(['flmiseg', *map(str, args)], cwd=cwd, capture_output=True,
                        env=helpers.cli_env(3, backend_level_0=True), text=True, timeout=300)


def _cells(rng, shape=(48, 64)) -> np.ndarray:
  """uint8 blobs (max 235) on a noisy background."""
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  image = 30 + rng.normal(0, 10, shape)
  for _ in range(3):
    cy, cx = rng.uniform(8, shape[0] - 8), rng.uniform(8, shape[1] - 8)
    image += 150 * (((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(20, 60))
  return np.clip(np.round(image), 0, 235).astype(np.uint8)


def _write_inputs(root: pathlib.Path) -> dict:
  rng = np.random.default_rng(0)
  u8 = _cells(rng)
  containers = {'u8': u8, 'u16': u8.astype(np.uint16), 'u12': u8.astype(np.uint16) * 16,
                'unit': u8.astype(np.float32) / 255, 'counts': u8 * np.float32(12.5) + 100}
  (root / 'dtypes').mkdir(parents=True)
  for name, image in containers.items():
    tifffile.imwrite(root / 'dtypes' / f'{name}.tif', image)
  tifffile.imwrite(root / 'dtypes' / 'constant.tif', np.full((40, 40), 300, np.uint16))
  nearly = np.full((40, 40), 300, np.uint16)
  nearly[3, 4] = 301
  tifffile.imwrite(root / 'dtypes' / 'nearly.tif', nearly)

  (root / 'axes').mkdir()
  hyper = np.stack([_cells(rng) for _ in range(2 * 3 * 2)]).reshape(2, 3, 2, 48, 64)
  tifffile.imwrite(root / 'axes' / 'hyper.tif', hyper.astype(np.uint16) * 16, imagej=True,
                   metadata={'axes': 'TZCYX', 'unit': 'um'}, resolution=(1 / 0.1, 1 / 0.1))
  tifffile.imwrite(root / 'axes' / 'cells.ome.tif', hyper[0, 0], ome=True,
                   metadata={'axes': 'CYX', 'PhysicalSizeX': 0.25, 'PhysicalSizeY': 0.25,
                             'PhysicalSizeXUnit': 'µm', 'Channel': {'Name': ['DAPI', 'GFP']}})
  # A colour composite: the plane below in green, other cells in red (--channel=1: green).
  composite = np.stack([hyper[0, 1, 0], hyper[0, 0, 1], np.zeros_like(hyper[0, 0, 1])], -1)
  cv2.imwrite(str(root / 'axes' / 'composite.png'), composite.astype(np.uint8)[..., ::-1])
  (root / 'plane').mkdir()  # channel 1 of the hyperstack's first T and Z, on its own
  tifffile.imwrite(root / 'plane' / 'plane.tif', hyper[0, 0, 1].astype(np.uint16) * 16)
  (root / 'noaxes').mkdir()
  tifffile.imwrite(root / 'noaxes' / 'raw.tif', hyper[0, 0], photometric='minisblack')

  (root / 'scale').mkdir()  # the same cells at the model's 0.2 um and at 0.2/3 um
  small = _cells(rng, (40, 56))
  tifffile.imwrite(root / 'scale' / 'small.tif', small, imagej=True,
                   metadata={'unit': 'um'}, resolution=(1 / 0.2, 1 / 0.2))
  big = cv2.resize(small, (168, 120), interpolation=cv2.INTER_LINEAR)
  tifffile.imwrite(root / 'scale' / 'big.tif', big, imagej=True, metadata={'unit': 'um'},
                   resolution=(3 / 0.2, 3 / 0.2))
  return {'u8': u8, 'hyper': hyper, 'small': small, 'big': big}


def _commands(root: pathlib.Path, run: pathlib.Path) -> dict:
  """name -> (args, cwd, console_script)."""
  predict = ['--mode=predict', f'--workdir={run}']
  scaled = root / 'run_at_0.2um'
  empty = root / 'empty_run'
  return {
      'dtypes': (predict + [f'--input={root / "dtypes"}', f'--output={root / "o_dtypes"}',
                            '--save_prob'], REPO, False),
      'axes': (predict + [f'--input={root / "axes"}', f'--output={root / "o_axes"}',
                          '--channel=1', '--save_prob', '--instances'], REPO, False),
      'plane': (predict + [f'--input={root / "plane"}', f'--output={root / "o_plane"}',
                           '--save_prob'], REPO, False),
      'noaxes': (predict + [f'--input={root / "noaxes"}', f'--output={root / "o_noaxes"}',
                            '--axes=CYX', '--channel=1'], REPO, False),
      'rescale': (['--mode=predict', f'--workdir={scaled}', f'--input={root / "scale"}',
                   f'--output={root / "o_scale"}', '--save_prob'], REPO, False),
      'no_rescale': (['--mode=predict', f'--workdir={scaled}', '--no_rescale',
                      f'--input={root / "scale" / "big.tif"}',
                      f'--output={root / "o_no_rescale"}', '--save_prob'], REPO, False),
      'domain': (predict + [f'--input={root / "domain"}', f'--output={root / "o_domain"}'],
                 REPO, False),
      'eval': (['--mode=eval', f'--workdir={root / "run_copy"}', '--config.eval.batch_size=4'],
               REPO, False),
      'summary': (['--mode=summary', f'--workdir={root / "run_copy_summary"}'], REPO, False),
      'console_script': (['--config=default', '--mode=summary', '--config.model.width=4',
                          '--config.data.crop_size=32', f'--workdir={root / "script"}'],
                         root, True),
      # Bad input: one line, exit status 2, nothing created.
      'no_channel': (predict + [f'--input={root / "axes" / "cells.ome.tif"}',
                                f'--output={root / "x_no_channel"}'], REPO, False),
      'wrong_channel': (predict + [f'--input={root / "axes" / "cells.ome.tif"}',
                                   f'--output={root / "x_wrong_channel"}', '--channel=2'],
                        REPO, False),
      'unknown_axes': (predict + [f'--input={root / "noaxes" / "raw.tif"}',
                                  f'--output={root / "x_unknown_axes"}', '--axes=QYX'],
                       REPO, False),
      'wrong_axes_length': (predict + [f'--input={root / "noaxes" / "raw.tif"}',
                                       f'--output={root / "x_wrong_axes_length"}',
                                       '--axes=YX'], REPO, False),
      'zero_pixel_size': (predict + [f'--input={root / "plane"}', '--pixel_size=0',
                                     f'--output={root / "x_zero_pixel_size"}'], REPO, False),
      'no_model': (['--mode=predict', f'--workdir={empty}', f'--input={root / "plane"}',
                    f'--output={root / "x_no_model"}'], REPO, False),
      'missing_workdir': (['--mode=eval', f'--workdir={root / "nowhere"}'], REPO, False),
      'conflicting_width': (predict + [f'--input={root / "plane"}', '--config.model.width=8',
                                       f'--output={root / "x_conflicting_width"}'],
                            REPO, False),
      'conflicting_normalization': (
          predict + ['--config.data.normalization=zscore', f'--input={root / "plane"}',
                     f'--output={root / "x_conflicting_normalization"}'], REPO, False),
      'another_config': (predict + ['--config=default', f'--input={root / "plane"}',
                                    f'--output={root / "x_another_config"}'], REPO, False),
  }


@pytest.fixture(scope='module')
def cli(tiny_run, tmp_path_factory):
  """(root, run, inputs, {name: CompletedProcess}) for every command of `_commands`."""
  _, run = tiny_run
  root = tmp_path_factory.mktemp('run_is_the_model')
  inputs = _write_inputs(root)
  ignore = shutil.ignore_patterns('eval', 'tensorboard', 'cache')
  for copy in ('run_copy', 'run_copy_summary', 'run_at_0.2um'):
    shutil.copytree(run, root / copy, ignore=ignore)
  config = json.loads((root / 'run_at_0.2um' / 'config.json').read_text())
  config['data']['pixel_size'] = 0.2
  (root / 'run_at_0.2um' / 'config.json').write_text(json.dumps(config))
  (root / 'empty_run').mkdir()
  (root / 'domain').mkdir()  # a training image, and an image unlike any of them
  first_image = (pathlib.Path(tiny_run[0].data.train_list).parent / 'train' / 'images')
  shutil.copy(sorted(first_image.iterdir())[0], root / 'domain' / 'like_training.tif')
  dark = np.random.default_rng(1).normal(1000, 3, (32, 32)).astype(np.uint16)  # noise only
  tifffile.imwrite(root / 'domain' / 'noise.tif', dark)
  commands = _commands(root, run)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    # 'dtypes' checks the quiet console: a new interpreter, whose imports print nothing.
    results = dict(zip(commands, pool.map(
        lambda item: _run(*item[1], fresh=item[0] == 'dtypes'), commands.items())))
  return root, run, inputs, results


def _ok(result) -> None:
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert 'Traceback' not in result.stderr


def test_predict_from_the_workdir_alone_with_a_quiet_console(cli):
  root, _, _, results = cli
  result = results['dtypes']
  _ok(result)
  assert 'Predicted 7 image(s)' in result.stdout
  output = result.stdout + result.stderr
  assert not LIBRARY_LINE.search(output), LIBRARY_LINE.search(output).group(0)
  for line in result.stderr.splitlines():  # progress bars and our own one-line messages
    assert line.startswith(('Predicting', 'warning: ', '\r', 'images:', 'tiles:')) or (
        not line.strip()), line


def test_the_same_intensities_in_any_container_give_the_same_mask(cli):
  root, _, inputs, results = cli
  _ok(results['dtypes'])
  expected = tifffile.imread(root / 'o_dtypes' / 'u8_prob.tif')
  mask = tifffile.imread(root / 'o_dtypes' / 'u8_mask.tif')
  assert mask.shape == inputs['u8'].shape and mask.dtype == np.uint8
  for name in ('u16', 'u12', 'unit', 'counts'):
    np.testing.assert_allclose(tifffile.imread(root / 'o_dtypes' / f'{name}_prob.tif'),
                               expected, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(tifffile.imread(root / 'o_dtypes' / f'{name}_mask.tif'),
                                  mask, err_msg=name)
  for name in ('constant', 'nearly'):  # predicted, never a division by zero
    prob = tifffile.imread(root / 'o_dtypes' / f'{name}_prob.tif')
    assert prob.shape == (40, 40) and np.all(np.isfinite(prob))


def test_a_warning_names_each_image_unlike_the_training_images(cli):
  _, _, _, results = cli
  _ok(results['domain'])
  warnings = [l for l in results['domain'].stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1, results['domain'].stderr
  # The key facts: the file, and a statistic of it whose value lies outside the training range.
  found = re.search(r'noise\.tif: unlike the training images: (p1|p50|p99|mean|std) '
                    r'(\S+) \(training (\S+)\.\.(\S+)\)', warnings[0])
  assert found, warnings[0]
  value, low, high = map(float, found.group(2, 3, 4))
  assert not low <= value <= high, warnings[0]


def test_axes_channels_and_pixel_size_are_read_and_written_back(cli):
  root, _, inputs, results = cli
  _ok(results['axes'])
  hyper = io.read_image_file(root / 'o_axes' / 'hyper_mask.tif')
  assert hyper.axes == 'TZYX' and hyper.data.shape == (2, 3, 48, 64)
  assert hyper.pixel_size == pytest.approx(0.1)
  labels = io.read_image_file(root / 'o_axes' / 'hyper_instances.tif')
  assert labels.axes == 'TZYX' and labels.data.dtype == np.uint16
  ome = io.read_image_file(root / 'o_axes' / 'cells_mask.ome.tif')
  assert ome.ome and ome.axes == 'YX' and ome.pixel_size == pytest.approx(0.25)
  assert not (root / 'o_axes' / 'cells.ome_mask.tif').exists()
  # Channel 1 of plane (t=0, z=0) is predicted exactly as that plane alone.
  _ok(results['plane'])
  alone = tifffile.imread(root / 'o_plane' / 'plane_prob.tif')
  np.testing.assert_allclose(tifffile.imread(root / 'o_axes' / 'hyper_prob.tif')[0, 0],
                             alone, atol=1e-6)
  # --channel=1 of an RGB image is its green: the same plane, in 8 bits.
  np.testing.assert_allclose(tifffile.imread(root / 'o_axes' / 'composite_prob.tif'), alone,
                             atol=1e-6)
  # A file without metadata: --axes=CYX --channel=1 picks the same plane (its 8-bit copy).
  _ok(results['noaxes'])
  assert tifffile.imread(root / 'o_noaxes' / 'raw_mask.tif').shape == (48, 64)
  np.testing.assert_array_equal(tifffile.imread(root / 'o_noaxes' / 'raw_mask.tif'),
                                tifffile.imread(root / 'o_plane' / 'plane_mask.tif'))


def test_images_are_rescaled_to_the_models_pixel_size(cli):
  root, _, inputs, results = cli
  _ok(results['rescale'])
  assert 'big.tif: resized x0.333' in results['rescale'].stderr
  assert 'small.tif: resized' not in results['rescale'].stderr
  small = tifffile.imread(root / 'o_scale' / 'small_prob.tif')
  big = io.read_image_file(root / 'o_scale' / 'big_prob.tif')
  assert small.shape == inputs['small'].shape and big.data.shape == inputs['big'].shape
  assert big.pixel_size == pytest.approx(0.2 / 3)
  # Seen at the model's pixel size, the big image gives nearly the small one's
  # probabilities; without rescaling, the model sees cells 3x larger than it was trained on.
  down = lambda prob: cv2.resize(prob, small.shape[::-1], interpolation=cv2.INTER_AREA)
  rescaled_error = np.abs(down(big.data) - small).mean()
  _ok(results['no_rescale'])
  assert 'resized' not in results['no_rescale'].stderr
  unscaled = tifffile.imread(root / 'o_no_rescale' / 'big_prob.tif')
  assert rescaled_error < 0.03 and rescaled_error < 0.5 * np.abs(down(unscaled) - small).mean()


def test_eval_and_summary_from_the_workdir_alone(cli):
  root, _, _, results = cli
  _ok(results['eval'])  # batch 4 on 3 devices: padded, not refused
  summary = json.loads((root / 'run_copy' / 'eval' / 'summary.json').read_text())
  assert summary['num_images'] == 3
  _ok(results['summary'])
  assert json.loads((root / 'run_copy_summary' / 'model_summary.json').read_text())[
      'params'] == 122389  # the width-4 U-Net of the tiny run


def test_console_script_and_stock_config_names_work_from_any_folder(cli):
  root, _, _, results = cli
  _ok(results['console_script'])
  assert '122,389 parameters' in results['console_script'].stdout


BAD = {
    'no_channel': ('cells.ome.tif: 2 channels (0: DAPI, 1: GFP); choose one with --channel=N',),
    'wrong_channel': ('--channel=2: ', 'cells.ome.tif has 2 channel(s)'),
    'unknown_axes': ("--axes=QYX: unknown letter 'Q'",),
    'wrong_axes_length': ('--axes=YX', 'raw.tif has 3 dimensions'),
    'zero_pixel_size': ('--pixel_size=0.0: must be a positive size',),
    'no_model': ('empty_run: not a trained run (no config.json)',),
    'missing_workdir': ('nowhere: not a trained run (no such folder)',),
    'conflicting_width': ('--config.model.width=8, but the model in', 'was trained with 4'),
    'conflicting_normalization': ("--config.data.normalization='zscore', but the model",
                                  "trained with 'auto'"),
    'another_config': ('--config.data.crop_size=128, but the model in', 'trained with 32'),
}


@pytest.mark.parametrize('name', BAD)
def test_bad_inference_input_gives_one_line_and_creates_nothing(cli, name):
  root, _, _, results = cli
  result = results[name]
  output = result.stdout + result.stderr
  assert 'Traceback' not in output, output[-3000:]
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and result.returncode == 2, output[-3000:]
  for fragment in BAD[name]:
    assert fragment in errors[0], errors[0]
  assert not (root / f'x_{name}').exists()
