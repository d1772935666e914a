"""ONNX export, the bioimage.io package (checked by bioimage.io's own `test_model`) and the
ONNX Runtime backend of predict and eval.

Needs the optional extra (pip install "flmiseg[export]"); skipped where it is missing.
"""

import concurrent.futures
import json
import os
import pathlib
import shutil

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
import yaml

pytest.importorskip('jax2onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('bioimageio.core')

# pylint: disable=g-import-not-at-top,wrong-import-position
from flmiseg import models
from flmiseg.cli import predict
from flmiseg.core import sharding
from flmiseg.evaluation import best_checkpoint
from flmiseg.train import steps as steps_lib
from flmiseg.data import io
from flmiseg.data import preprocess
from flmiseg.export import bioimage
from flmiseg.export import onnx_backend
from flmiseg.export import onnx_graph
from flmiseg.inference import model as model_lib
from flmiseg.inference import tiling
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import weights
from flmiseg.train import trainer
from experiments.benchmarks import benchmark
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def unet_run(tiny_run, tmp_path_factory):
  """(config, workdir): a copy of the session's tiny U-Net run (CLAHE normalisation), which
  the ONNX backend may write its cache into."""
  config, workdir = tiny_run
  copy = tmp_path_factory.mktemp('unet') / 'run'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('cache', 'tensorboard'))
  return rundir.read_config(copy), copy


@pytest.fixture(scope='module')
def lowlevel_model(tmp_path_factory):
  """(config, folder) of a packed SegNet lowlevel model with an instance head (two output
  channels) and percentile normalisation (exported without loss), at its initial weights:
  packing them costs no training."""
  folder = tmp_path_factory.mktemp('lowlevel') / 'packed'
  folder.mkdir()
  config = helpers.tiny_config('unused', **{
      'model.name': 'segnet', 'model.variant': 'lowlevel', 'model.instance_head': 'distance',
      'data.normalization': 'percentile', 'data.kind': 'nucleus'})
  model = models.create_model(config.model, jnp.float32)
  key = jax.random.key(0)
  variables = model.init({'params': key, 'dropout': key}, jnp.zeros((1, 32, 32, 1)))
  host = jax.tree.map(np.asarray, {'params': variables['params'],
                                   'batch_stats': variables['batch_stats']})
  (folder / pretrained.WEIGHTS_FILE).write_bytes(
      serialization.msgpack_serialize(serialization.to_state_dict(host)))
  (folder / pretrained.WEIGHTS_INFO).write_text(json.dumps(
      {'sha256': pretrained.sha256(folder / pretrained.WEIGHTS_FILE), 'step': 0}))
  (folder / rundir.CONFIG_FILE).write_text(config.to_json())
  return rundir.read_config(folder), folder


def passes_test_model(package: pathlib.Path):
  from bioimageio.core import test_model  # pylint: disable=g-import-not-at-top
  summary = test_model(package / 'rdf.yaml')
  failed = [f'{d.name}: {[e.msg[:300] for e in d.errors]}' for d in summary.details
            if d.status != 'passed']
  assert summary.status == 'passed', failed


def test_unet_package_passes_bioimageio_test_model(unet_run, tmp_path):
  config, workdir = unet_run
  result = bioimage.run(config, workdir, bioimage.Options(output=str(tmp_path / 'pkg')))
  package = tmp_path / 'pkg'
  assert result['layout'].dynamic and result['layout'].multiple == 16
  for name in ('rdf.yaml', 'weights.onnx', 'test_input.npy', 'test_output.npy', 'cover.png',
               'README.md', 'LICENSE.txt'):
    assert (package / name).is_file(), name
  # The tiny run normalises with CLAHE, which the spec cannot express: said in one warning
  # line and in the package's documentation.
  assert len(result['warnings']) == 1 and 'CLAHE' in result['warnings'][0]
  assert '**Limitation.**' in (package / 'README.md').read_text()
  rdf = (package / 'rdf.yaml').read_text()
  assert '10.1007/978-3-030-88010-1_32' in rdf and 'flmiseg contributors' in rdf
  passes_test_model(package)


def test_lowlevel_package_passes_bioimageio_test_model(lowlevel_model, tmp_path):
  config, folder = lowlevel_model
  config.authors = 'Ada Lovelace, Alan Turing'
  result = bioimage.run(config, folder, bioimage.Options(output=str(tmp_path / 'pkg')))
  layout = result['layout']
  # jax2onnx cannot trace SegNet's unpooling with symbolic sizes: fixed tiles, any batch.
  assert not layout.dynamic and layout.tile == 32 and layout.batch == 0
  assert layout.channels == 2 and not result['warnings']  # percentile: no loss
  rdf = yaml.safe_load((tmp_path / 'pkg' / 'rdf.yaml').read_text())
  assert [a['name'] for a in rdf['authors']] == ['Ada Lovelace', 'Alan Turing']
  assert [p['id'] for p in rdf['inputs'][0]['preprocessing']] == [
      'ensure_dtype', 'scale_range', 'ensure_dtype']
  assert rdf['outputs'][0]['axes'][-1]['channel_names'] == ['foreground', 'distance']
  passes_test_model(tmp_path / 'pkg')


def test_package_preprocessing_is_flmiseg_percentile_normalisation():
  image = np.random.default_rng(0).gamma(2.0, 900.0, (64, 48)).astype(np.uint16)
  steps = bioimage.PREPROCESSING['percentile'][0]
  np.testing.assert_allclose(bioimage.apply_steps(image, steps),
                             preprocess.normalize(image, 'percentile'), atol=1e-5)
  steps = bioimage.PREPROCESSING['zscore'][0]
  np.testing.assert_allclose(bioimage.apply_steps(image, steps),
                             preprocess.normalize(image, 'zscore'), atol=1e-5)


def _test_images(config) -> list[np.ndarray]:
  lines = pathlib.Path(config.data.test_list).read_text().split()
  folder = pathlib.Path(config.data.test_list).parent
  return [io.read_image_file(folder / p).data for p in lines[::2]]


def test_onnx_probabilities_equal_flmiseg_probabilities(unet_run):
  config, workdir = unet_run
  path, layout, step = onnx_graph.cached_onnx(config, workdir)
  assert path.parent == workdir / 'export' and layout.dynamic
  mtime = path.stat().st_mtime_ns
  assert onnx_graph.cached_onnx(config, workdir)[0].stat().st_mtime_ns == mtime  # converted once
  tiles = np.stack([preprocess.normalize(image, config.data.normalization, config.data.kind)
                    for image in _test_images(config)])[..., None]
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  state, jax_step = weights.load(config, workdir, mesh)
  want = tiling.prob_fn(state, mesh, tta=False)(tiles)
  got = onnx_backend.Runner(path, layout)(tiles)
  assert step == jax_step and got.shape == want.shape
  assert np.abs(got - want).max() < 1e-4
  # sizes that are not multiples of the graph's: padded as the model pads itself
  want = tiling.prob_fn(state, mesh, tta=False)(tiles[:, :27, :21])
  assert np.abs(onnx_backend.Runner(path, layout)(tiles[:, :27, :21]) - want).max() < 1e-4


def test_onnx_backend_with_fixed_tiles_and_two_channels(lowlevel_model):
  config, folder = lowlevel_model
  image = np.random.default_rng(1).gamma(2.0, 900.0, (45, 70)).astype(np.uint16)
  outputs = {}
  model = model_lib.Model(folder, config)
  for backend in ('jax', 'onnx'):
    options = predict.Options(input='', output='', backend=backend, tta=True)
    outputs[backend] = predict.load_predictor(model, options).plane(image)[0]
  assert model.step == 0 and outputs['onnx'].shape == (45, 70, 2)
  assert np.abs(outputs['onnx'] - outputs['jax']).max() < 1e-4


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize('tta', [False, True])
def test_onnx_backend_masks_equal_jax_masks(unet_run, tmp_path, tta):
  config, workdir = unet_run
  inputs = pathlib.Path(config.data.test_list).parent / 'test' / 'images'
  for backend in ('jax', 'onnx'):
    predict.run(config, workdir, predict.Options(
        input=str(inputs), output=str(tmp_path / backend), tta=tta, backend=backend))
  for mask in sorted((tmp_path / 'jax').glob('*_mask.tif')):
    jax_mask = tifffile.imread(mask) > 0
    onnx_mask = tifffile.imread(tmp_path / 'onnx' / mask.name) > 0
    assert jax_mask.any() and _iou(jax_mask, onnx_mask) >= 0.99, mask.name


def test_onnx_backend_eval_equals_jax_eval(unet_run):
  config, workdir = unet_run
  jax_summary = best_checkpoint.evaluate_best(config, workdir,
                                              steps_lib.jit_predict(config.eval.threshold))
  onnx_summary = best_checkpoint.evaluate_best(config, workdir, onnx_backend.predict_step(
      config, workdir, config.eval.threshold))
  assert onnx_summary['num_images'] == jax_summary['num_images']
  assert onnx_summary['iou'] == pytest.approx(jax_summary['iou'], abs=0.01)


def test_backend_benchmark_times_both_backends(unet_run):
  _, workdir = unet_run
  result = benchmark.backend_times(str(workdir), size=48, repeats=1)
  assert result['tile'] == 32 and result['tiles'] == 4
  for backend in ('jax', 'onnx'):
    for key in ('load_s', 'first_image_s', 'image_s', 'network_s'):
      assert result['backends'][backend][key] > 0, (backend, key)
  assert result['jax_over_onnx'] > 0


def test_cli_export_errors_and_onnx_predict(unet_run, tmp_path):
  """Bad input: one `error:` line, status 2; and --backend=onnx through the command line."""
  config, workdir = unet_run
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  shutil.copy(workdir / rundir.CONFIG_FILE, untrained)
  full = tmp_path / 'full'
  full.mkdir()
  (full / 'notes.txt').write_text('mine')
  # An extra that is not installed: a jax2onnx that cannot be imported comes first on the path.
  fake = tmp_path / 'fake' / 'jax2onnx'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text("raise ImportError('No module named jax2onnx')\n")
  cases = [
      (['--mode=export', f'--workdir={untrained}', f'--output={tmp_path}/a'], None,
       'not a trained run (no checkpoint)'),
      (['--mode=export', f'--workdir={workdir}', f'--output={full}'], None, 'is not empty'),
      (['--mode=export', f'--workdir={workdir}', f'--output={tmp_path}/b'],
       {'PYTHONPATH': f'{tmp_path / "fake"}{os.pathsep}{REPO}'}, 'pip install "flmiseg[export]"'),
  ]
  inputs = pathlib.Path(config.data.test_list).parent / 'test' / 'images'
  predict = ['--mode=predict', f'--workdir={workdir}', f'--input={inputs}',
             f'--output={tmp_path}/masks', '--backend=onnx']
  # The case with its own PYTHONPATH gets a new interpreter: imports must fail there.
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    predicting, *results = pool.map(
        lambda case: helpers.run_cli(case[0], devices=1, env=case[1], fresh=bool(case[1])),
        [(predict, None, None), *cases])
  assert predicting.returncode == 0, predicting.stderr[-2000:]
  assert len(list((tmp_path / 'masks').glob('*_mask.tif'))) == len(os.listdir(inputs))
  for result, (_, _, message) in zip(results, cases):
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], (
        result.stderr)
    assert 'Traceback' not in result.stderr + result.stdout
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
  assert os.listdir(full) == ['notes.txt']
