"""Packed and shipped models: a hash-checked, pickle-free copy of a run that predicts alike;
fine-tuning from one; early stopping."""

import json

import jax
import numpy as np
import pytest
import tifffile

from flmiseg.evaluation import calibration
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import weights
from flmiseg.core import sharding
from flmiseg.train import finetune
from flmiseg.train import trainer
from flmiseg.configs import finetune as finetune_config
from flmiseg.core.errors import UserError
from tests import helpers


@pytest.fixture(scope='module')
def packed(tiny_run, tmp_path_factory):
  """(run folder, its float32 packed copy, its float16 packed copy)."""
  _, run = tiny_run
  root = tmp_path_factory.mktemp('packed')
  weights.pack(run, root / 'f32', 'float32', provenance={'note': 'test'})
  weights.pack(run, root / 'f16', 'float16')
  return run, root / 'f32', root / 'f16'


def _variables(folder):
  config = rundir.read_config(folder)
  state, step = weights.load(config, folder, sharding.make_mesh(jax.local_devices()[:1]))
  return jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}), step


def test_pack_keeps_the_weights_and_the_runs_files(packed):
  run, f32, f16 = packed
  original, step = _variables(run)
  exact, packed_step = _variables(f32)
  assert packed_step == step
  jax.tree.map(np.testing.assert_array_equal, exact, original)
  half, _ = _variables(f16)  # float16 storage: within its rounding, read back as float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
               half, original)
  assert {x.dtype for x in jax.tree.leaves(half)} == {np.dtype('float32')}
  info = json.loads((f32 / 'weights.json').read_text())
  assert info['sha256'] == pretrained.sha256(f32 / 'weights.msgpack')
  assert info['dtype'] == 'float32' and info['note'] == 'test' and info['params'] == 122389
  for name in ('config.json', 'calibration.json', 'input_stats.json'):
    assert (f32 / name).read_bytes() == (run / name).read_bytes()
  assert (f16 / 'weights.msgpack').stat().st_size < 0.55 * (f32 / 'weights.msgpack').stat().st_size
  with pytest.raises(UserError, match='not empty'):
    weights.pack(run, f32)


def test_a_tampered_or_mismatched_file_is_refused_with_one_line(packed, tmp_path):
  _, f32, _ = packed
  copy = tmp_path / 'copy'
  copy.mkdir()
  for p in f32.iterdir():
    (copy / p.name).write_bytes(p.read_bytes())
  data = bytearray((copy / 'weights.msgpack').read_bytes())
  data[len(data) // 2] ^= 0xFF
  (copy / 'weights.msgpack').write_bytes(bytes(data))
  config = rundir.read_config(copy)
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  with pytest.raises(UserError, match=r'weights.msgpack: SHA-256 .* does not match .* not '
                     r'loading it$'):
    weights.load(config, copy, mesh)
  config.model.width = 8  # the file's arrays do not fit this architecture
  (copy / 'weights.msgpack').write_bytes((f32 / 'weights.msgpack').read_bytes())
  with pytest.raises(UserError, match='weights.msgpack: (does not fit|an array of shape)'):
    weights.load(config, copy, mesh)


def test_predict_with_model_equals_predict_with_the_run(packed, tmp_path):
  run, f32, _ = packed
  image = np.random.default_rng(0).integers(0, 4000, (50, 70)).astype(np.uint16)
  tifffile.imwrite(tmp_path / 'cell.tif', image)
  for name, source in (('run', f'--workdir={run}'), ('packed', f'--model={f32}')):
    result = helpers.run_cli(['--mode=predict', source, '--save_prob',
                              f'--input={tmp_path / "cell.tif"}', f'--output={tmp_path / name}'])
    assert result.returncode == 0, result.stderr[-2000:]
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'packed' / 'cell_prob.tif'),
                                tifffile.imread(tmp_path / 'run' / 'cell_prob.tif'))


def test_resolve_model_names_shipped_models_and_folders(tmp_path):
  with pytest.raises(UserError, match=r'^--model=nucleus2: neither a shipped model \(er, '
                     r'mito, nucleus\) nor a folder$'):
    pretrained.resolve_model('nucleus2')
  assert pretrained.resolve_model(str(tmp_path)) == tmp_path


def test_fine_tuning_starts_from_the_source_weights(packed, tmp_path):
  run, f32, _ = packed
  data = helpers.write_blob_dataset(tmp_path / 'data', num_train=8, num_test=2, seed=5)
  config = helpers.tiny_config(data, **{'train.num_steps': 2, 'eval.every_steps': 2,
                                        'optim.lr': 1e-9, 'train.init_from': str(f32)})
  trainer.train_and_evaluate(config, tmp_path / 'tuned')
  tuned, _ = _variables(tmp_path / 'tuned')
  source, _ = _variables(f32)
  # lr 1e-9: two Adam steps move each parameter by at most 2e-9, so the weights are the
  # source's, not a fresh initialisation.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               tuned['params'], source['params'])
  # Packed, the fine-tuned model names its source in weights.json only: its config starts
  # nothing from a folder that exists on this machine alone.
  info = weights.pack(tmp_path / 'tuned', tmp_path / 'tuned_packed', 'float32')
  assert info['init_from'] == str(f32)
  run_config = json.loads((tmp_path / 'tuned' / 'config.json').read_text())
  packed_config = json.loads((tmp_path / 'tuned_packed' / 'config.json').read_text())
  assert run_config['train']['init_from'] == str(f32)
  run_config['train']['init_from'] = ''
  assert packed_config == run_config
  config.model.width = 8
  config.train.init_from = str(f32)
  with pytest.raises(UserError, match=r"^config.train.init_from=.*: its config.model.width=4, "
                     r"this run's is 8; fine-tuning needs the same architecture$"):
    trainer.train_and_evaluate(config, tmp_path / 'mismatch')


def test_fine_tuning_keeps_the_source_when_training_makes_it_worse(packed, tmp_path):
  _, f32, _ = packed
  data = helpers.write_blob_dataset(tmp_path / 'data', num_train=8, num_test=2, seed=5)
  # lr 0.5: two Adam steps move every weight by about 1, which ruins the model.
  config = helpers.tiny_config(data, **{'train.num_steps': 2, 'eval.every_steps': 2,
                                        'optim.lr': 0.5, 'optim.schedule': 'constant',
                                        'optim.warmup_steps': 0,
                                        'train.init_from': str(f32)})
  trainer.train_and_evaluate(config, tmp_path / 'tuned')
  vals = [json.loads(l) for l in (tmp_path / 'tuned' / 'metrics.jsonl').read_text().splitlines()]
  vals = {r['step']: r['iou'] for r in vals if r['kind'] == 'val'}
  assert sorted(vals) == [0, 2] and vals[0] > vals[2]
  tuned, step = _variables(tmp_path / 'tuned')  # the best checkpoint: the source's, step 0
  source, _ = _variables(f32)
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, tuned, source)
  # Two validation images are too few to recalibrate: the source's threshold is kept.
  calibrated = json.loads((tmp_path / 'tuned' / 'calibration.json').read_text())
  assert calibrated['num_val_images'] < calibration.MIN_IMAGES_TO_RECALIBRATE
  assert calibrated['threshold'] == json.loads((f32 / 'calibration.json').read_text())[
      'threshold'] and calibrated['threshold_from'] == 'config.train.init_from'
  assert 'swept_threshold' in calibrated


def test_fine_tuning_adopts_the_sources_instance_head(packed, tmp_path):
  _, f32, _ = packed  # a semantic model: no instance head
  data = helpers.write_blob_dataset(tmp_path / 'data', num_train=8, num_test=2, seed=5)
  config = helpers.tiny_config(data, **{'train.num_steps': 1, 'eval.every_steps': 1,
                                        'train.init_from': str(f32),
                                        'model.instance_head': 'distance'})
  trainer.train_and_evaluate(config, tmp_path / 'tuned')
  assert rundir.read_config(tmp_path / 'tuned').model.instance_head == ''


def test_fine_tuning_keeps_the_sources_object_diameter():
  """A run from the shipped nucleus model records its 31 px (predict --diameter works on
  it); one that sets its own keeps it."""
  config = finetune_config.get_config()
  config.train.init_from = 'nucleus'
  finetune.adopt_source_settings(config)
  assert config.data.object_diameter == 31.0
  config.data.object_diameter = 12.0
  finetune.adopt_source_settings(config)
  assert config.data.object_diameter == 12.0


@pytest.mark.parametrize('freeze', [False, True])
def test_freeze_batch_stats_keeps_the_source_statistics(packed, tmp_path, freeze):
  _, f32, _ = packed
  data = helpers.write_blob_dataset(tmp_path / 'data', num_train=8, num_test=2, seed=6)
  config = helpers.tiny_config(data, **{'train.num_steps': 2, 'eval.every_steps': 2,
                                        'data.val_fraction': 0.0, 'optim.lr': 1e-9,
                                        'train.init_from': str(f32),
                                        'train.freeze_batch_stats': freeze})
  trainer.train_and_evaluate(config, tmp_path / 'tuned')
  tuned, step = _variables(tmp_path / 'tuned')
  source, _ = _variables(f32)
  assert step == 2
  same = jax.tree.leaves(jax.tree.map(np.array_equal, tuned['batch_stats'],
                                      source['batch_stats']))
  assert all(same) if freeze else not any(same)


def test_early_stopping_ends_the_run_and_a_rerun_does_not_train_on(tmp_path):
  data = helpers.write_blob_dataset(tmp_path / 'data', num_train=8, num_test=2)
  config = helpers.tiny_config(data, **{'train.num_steps': 40, 'eval.every_steps': 2,
                                        'optim.lr': 1e-9, 'optim.schedule': 'constant',
                                        'train.early_stop_patience': 2})
  trainer.train_and_evaluate(config, tmp_path / 'run')  # lr ~0: the IoU hardly moves
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  best, since, expected = -1.0, 0, 40  # the rule, applied to the recorded validations
  for record in (l for l in lines if l['kind'] == 'val'):
    best, since = (record['iou'], 0) if record['iou'] > best else (best, since + 1)
    if since >= 2:
      expected = record['step']
      break
  assert expected < 40  # it did stop early
  assert max(l['step'] for l in lines) == expected
  trainer.train_and_evaluate(config, tmp_path / 'run')
  again = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  assert len(again) == len(lines)  # resumed, saw it had stopped, did not train on
