"""Training system end to end at a tiny size: loss goes down, resume is exact, sharding
agrees with one device, summary counts, every config loads."""

import functools
import importlib.util
import json
import pathlib
import types

import jax
import numpy as np
import pytest

from flmiseg import models
from flmiseg.configs import default
from flmiseg.store import checkpoint
from flmiseg.train import losses
from flmiseg.train import optim
from flmiseg.core import sharding
from flmiseg.train import steps
from flmiseg.models import summary
from flmiseg.train import trainer
from flmiseg.core.errors import UserError
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return helpers.write_blob_dataset(tmp_path_factory.mktemp('blobs'))


def _final_params(workdir, config):
  """The params of the latest checkpoint of workdir, as numpy."""
  state = trainer.build(config, (32, 32), 9).state
  ckpt = checkpoint.Checkpointer(workdir)
  restored, _, record = ckpt.restore_last(checkpoint.abstract(state))
  ckpt.close()
  return record['step'], jax.device_get(restored.params)


def test_training_lowers_loss_and_writes_outputs(data_root, tmp_path):
  config = helpers.tiny_config(data_root, **{'train.num_steps': 16, 'eval.every_steps': 8})
  result = trainer.train_and_evaluate(config, tmp_path / 'run')
  records = [json.loads(l) for l in (tmp_path / 'run/metrics.jsonl').read_text().splitlines()]
  train_losses = [r['loss'] for r in records if r['kind'] == 'train']
  assert train_losses[-1] < train_losses[0]
  assert [r['step'] for r in records if r['kind'] == 'val'] == [8, 16]
  # The best checkpoint, evaluated on the test set: the highest validation IoU (the earlier
  # on ties), kept by orbax's preservation policy in DIR/checkpoints beside the latest.
  best = -max((r['iou'], -r['step']) for r in records if r['kind'] == 'val')[1]
  assert result['checkpoint_step'] == best
  assert not (tmp_path / 'run/checkpoints_best').exists()
  for name in ('config.json', 'training_curve.png', 'eval/summary.json', 'eval/per_image.csv'):
    assert (tmp_path / 'run' / name).exists(), name
  assert list((tmp_path / 'run/tensorboard').iterdir())
  assert result['num_images'] == 4
  for key in ('iou', 'f1', 'dice', 'accuracy', 'precision', 'recall', 'auc'):
    assert 0.0 <= result[key] <= 1.0, key
  rows = (tmp_path / 'run/eval/per_image.csv').read_text().splitlines()
  assert len(rows) == 1 + 4


def test_resume_after_interruption_is_exact(data_root, tmp_path, monkeypatch):
  config = helpers.tiny_config(data_root)
  trainer.train_and_evaluate(config, tmp_path / 'straight')
  original = trainer._Trainer.checkpoint

  def crash_after_step_4(self, step, data_iter, val_iou):
    original(self, step, data_iter, val_iou)
    if step == 4:
      raise KeyboardInterrupt('simulated kill')

  monkeypatch.setattr(trainer._Trainer, 'checkpoint', crash_after_step_4)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(config, tmp_path / 'resumed')
  monkeypatch.setattr(trainer._Trainer, 'checkpoint', original)
  assert _final_params(tmp_path / 'resumed', config)[0] == 4
  trainer.train_and_evaluate(config, tmp_path / 'resumed')
  step_a, params_a = _final_params(tmp_path / 'straight', config)
  step_b, params_b = _final_params(tmp_path / 'resumed', config)
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  # A finished run does not retrain.
  lines = (tmp_path / 'resumed/metrics.jsonl').read_text()
  trainer.train_and_evaluate(config, tmp_path / 'resumed')
  assert (tmp_path / 'resumed/metrics.jsonl').read_text() == lines


def test_workdir_of_another_config_is_refused(data_root, tmp_path):
  config = helpers.tiny_config(data_root)
  trainer.prepare_workdir(config, tmp_path / 'w')
  other = helpers.tiny_config(data_root, **{'model.width': 8})
  with pytest.raises(UserError, match='model.width'):
    trainer.prepare_workdir(other, tmp_path / 'w')
  other.train.resume_mismatch = 'allow'
  trainer.prepare_workdir(other, tmp_path / 'w')


def _saved(workdir) -> dict:
  return json.loads((workdir / 'config.json').read_text())


def test_config_json_records_the_completed_config_and_resumes(data_root, tmp_path):
  # The blob images are 32 px: a crop of 48 trains on crops of 32, and config.json says so.
  workdir = tmp_path / 'w'
  trainer.complete_config(helpers.tiny_config(data_root, **{'data.crop_size': 48}), workdir)
  assert _saved(workdir)['data']['crop_size'] == 32
  # The same command again (resume): its completed config equals the one written.
  config = helpers.tiny_config(data_root, **{'data.crop_size': 48})
  trainer.complete_config(config, workdir)
  assert config.data.crop_size == 32 and _saved(workdir)['data']['crop_size'] == 32
  # A run written before the completed config was recorded (config.json: the crop as given)
  # resumes too, and then records it.
  saved = _saved(workdir)
  saved['data']['crop_size'] = 48
  (workdir / 'config.json').write_text(json.dumps(saved))
  trainer.complete_config(helpers.tiny_config(data_root, **{'data.crop_size': 48}), workdir)
  assert _saved(workdir)['data']['crop_size'] == 32
  # Another crop is another config, completed or not.
  with pytest.raises(UserError, match=r'made by a different config \(data.crop_size differ'):
    trainer.complete_config(helpers.tiny_config(data_root, **{'data.crop_size': 16}), workdir)


def test_fine_tuning_on_binary_masks_records_the_untrained_instance_head(data_root, tmp_path):
  # The shipped nucleus model has an instance head; binary masks do not train it.
  given = {'train.init_from': 'nucleus', 'train.instance_weight': 8.0}
  trainer.complete_config(helpers.tiny_config(data_root, **given), tmp_path / 'w')
  saved = _saved(tmp_path / 'w')
  assert saved['model']['instance_head'] == 'distance' and saved['data']['kind'] == 'nucleus'
  assert saved['train']['instance_weight'] == 0.0
  trainer.complete_config(helpers.tiny_config(data_root, **given), tmp_path / 'w')  # resumes
  saved['train']['instance_weight'] = 8.0  # as a run written before recorded it
  (tmp_path / 'w' / 'config.json').write_text(json.dumps(saved))
  trainer.complete_config(helpers.tiny_config(data_root, **given), tmp_path / 'w')
  assert _saved(tmp_path / 'w')['train']['instance_weight'] == 0.0


def test_the_loss_is_checked_before_anything_is_written(data_root, tmp_path):
  config = helpers.tiny_config(data_root, **{'train.loss': 'bce+dcie'})
  with pytest.raises(UserError, match=r"^config.train.loss='bce\+dcie': 'dcie' is not a loss"):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_sharded_step_equals_single_device(data_root, tmp_path):
  assert jax.device_count() == 8
  # SGD, not Adam: Adam's first step is lr * sign(grad), which amplifies float noise in the
  # exactly-zero gradients of conv biases that BatchNorm cancels.
  config = helpers.tiny_config(data_root, **{'optim.name': 'sgd', 'optim.lr': 0.1})
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 32, 32, 1)).astype(np.float32),
           'mask': (rng.random((8, 32, 32, 1)) > 0.7).astype(np.float32),
           'valid': np.ones((8, 32, 32, 1), np.float32)}
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    setup = trainer.build(config, (32, 32), 9)
    model, schedule = setup.model, setup.schedule
    state = steps.create_train_state(model, optim.make_optimizer(
        config.optim, schedule), (32, 32), 0, mesh)
    step = jax.jit(functools.partial(
        steps.train_step, loss_fn=losses.make_loss('bce+dice'), schedule=schedule,
        dropout_key=jax.random.key(1)))
    new_state, scalars = step(state, sharding.global_batch(batch, mesh))
    assert len(sharding.global_batch(batch, mesh)['image'].sharding.device_set) == len(devices)
    results.append((float(scalars['loss']), jax.device_get(new_state.params),
                    jax.device_get(new_state.batch_stats)))
  (loss1, params1, stats1), (loss8, params8, stats8) = results
  np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               (params1, stats1), (params8, stats8))


def test_summary_reports_reference_unet_count():
  config = default.get_config()
  config.model.width = 64
  assert summary.count_params(models.create_model(config.model, np.float32)) == 31042369


def test_every_config_loads():
  files = sorted((REPO / 'configs').glob('*.py'))
  files = [f for f in files if f.name != '__init__.py']
  assert len(files) >= 4
  for path in files:
    spec = importlib.util.spec_from_file_location(f'cfg_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert {'data', 'model', 'train', 'optim', 'eval'} <= set(config.keys()), path.name


def test_bfloat16_training_keeps_float32_params(data_root, tmp_path):
  config = helpers.tiny_config(data_root, **{'train.dtype': 'bfloat16', 'train.num_steps': 2,
                                             'eval.every_steps': 2})
  result = trainer.train_and_evaluate(config, tmp_path / 'bf16')
  _, params = _final_params(tmp_path / 'bf16', config)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}
  assert 0.0 <= result['iou'] <= 1.0


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
  config = helpers.tiny_config(data_root, **{'optim.name': 'sgd', 'optim.lr': 1e30,
                                             'optim.momentum': 0.0, 'train.num_steps': 8,
                                             'train.log_every_steps': 1})
  with pytest.raises(trainer.TrainingDiverged, match=r'loss became nan at step \d+.*lower '
                     r'learning rate, e.g. --config.optim.lr=1e\+29'):
    trainer.train_and_evaluate(config, tmp_path / 'nan')
  ckpt = checkpoint.Checkpointer(tmp_path / 'nan')
  latest = ckpt.latest_step()
  ckpt.close()
  if latest is not None:  # every kept checkpoint holds finite parameters
    _, params = _final_params(tmp_path / 'nan', config)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def _scripted_train_steps(monkeypatch, edit):
  """Makes every training's train step pass its scalars through edit(call number, scalars)."""
  original = steps.jit_steps
  calls = [0]

  def jit_steps(*args, **kwargs):
    train_step, predict = original(*args, **kwargs)

    def scripted(state, batch):
      calls[0] += 1
      state, scalars = train_step(state, batch)
      return state, edit(calls[0], scalars)
    return scripted, predict
  monkeypatch.setattr(trainer.steps_lib, 'jit_steps', jit_steps)


def test_nan_is_caught_before_a_validation_or_checkpoint_off_the_log_steps(
    data_root, tmp_path, monkeypatch):
  # Step 3 validates and saves; it is neither a log step nor a checkpoint_every_steps step.
  config = helpers.tiny_config(data_root, **{
      'train.num_steps': 6, 'train.log_every_steps': 100, 'eval.every_steps': 3,
      'train.checkpoint_every_steps': 5})
  _scripted_train_steps(monkeypatch, lambda call, scalars: (
      {**scalars, 'loss': np.float32(np.nan)} if call == 3 else scalars))
  with pytest.raises(trainer.TrainingDiverged,
                     match='^loss became nan at step 3; no checkpoint was written yet;'):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  metrics = tmp_path / 'run/metrics.jsonl'
  assert not metrics.exists() or 'val' not in metrics.read_text()  # never validated
  assert not [p for p in (tmp_path / 'run').glob('*/*') if p.name.isdigit()]  # nor saved


def test_images_per_second_counts_training_time_only(data_root, tmp_path, monkeypatch):
  # A fake clock: each training step takes 1 s, each validation and checkpoint 100 s.
  clock = [0.0]
  monkeypatch.setattr(trainer, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))

  def tick(call, scalars):
    clock[0] += 1.0
    return scalars
  _scripted_train_steps(monkeypatch, tick)
  for name in ('validate', 'checkpoint'):
    original = getattr(trainer._Trainer, name)

    def slow(self, *args, original=original):
      clock[0] += 100.0
      return original(self, *args)
    monkeypatch.setattr(trainer._Trainer, name, slow)
  # Validations at 2, 4, 6; checkpoints also at 4; log lines at 3, 4, 6.
  config = helpers.tiny_config(data_root, **{
      'train.num_steps': 6, 'train.log_every_steps': 3, 'eval.every_steps': 2,
      'train.checkpoint_every_steps': 4})
  trainer.train_and_evaluate(config, tmp_path / 'run')
  records = [json.loads(l) for l in (tmp_path / 'run/metrics.jsonl').read_text().splitlines()]
  rates = {r['step']: r['images_per_s'] for r in records if r['kind'] == 'train'}
  assert rates == {3: 8.0, 4: 8.0, 6: 8.0}  # batch 8 per 1 s step


class _Saves:
  """A Checkpointer stand-in that keeps what `_Trainer.checkpoint` saves."""

  def __init__(self):
    self.saved = []

  def save(self, step, state, data_state, record, metrics):
    self.saved.append((record, metrics))


def test_the_validation_score_drives_the_best_and_early_stopping():
  """An instance model's validations count as better by (IoU + AP@0.5) / 2: a higher IoU with
  a lower score is no improvement for early stopping; a semantic model counts its IoU as
  before; a record written before (best_iou, no best_score) resumes with its best."""
  def fake_trainer(patience):
    config = types.SimpleNamespace(train=types.SimpleNamespace(early_stop_patience=patience))
    return types.SimpleNamespace(config=config, data=types.SimpleNamespace(val=object()),
                                 best_score=-1.0, since_best=0, stopped_early=False,
                                 ckpt=_Saves(), state=None, last_good=None)

  data_iter = types.SimpleNamespace(get_state=dict)
  run = fake_trainer(patience=2)
  for step, val in enumerate([{'iou': 0.75, 'ap_0.5': 0.25}, {'iou': 0.625, 'ap_0.5': 0.5},
                              {'iou': 0.875, 'ap_0.5': 0.125}, None,
                              {'iou': 0.9375, 'ap_0.5': 0.125}], start=1):
    trainer._Trainer.checkpoint(run, step, data_iter, val)
  records = [r for r, _ in run.ckpt.saved]
  assert [r['best_score'] for r in records] == [0.5, 0.5625, 0.5625, 0.5625, 0.5625]
  assert [r['since_best'] for r in records] == [0, 0, 1, 1, 2]
  assert run.stopped_early and [r['stopped_early'] for r in records] == [False] * 4 + [True]
  assert records[1]['val_ap_0.5'] == 0.5 and records[3]['val_iou'] is None
  assert run.ckpt.saved[1][1] == {'step': 2, 'val_iou': 0.625, 'val_ap_0.5': 0.5}
  semantic = fake_trainer(patience=0)
  for step, iou in enumerate([0.5, 0.75, 0.625], start=1):
    trainer._Trainer.checkpoint(semantic, step, data_iter, {'iou': iou})
  assert [r for r, _ in semantic.ckpt.saved][-1] == {
      'step': 3, 'val_iou': 0.625, 'best_score': 0.75, 'since_best': 1, 'stopped_early': False}
  assert semantic.ckpt.saved[-1][1] == {'step': 3, 'val_iou': 0.625}
  old = fake_trainer(patience=0)
  old.workdir = 'old_run'
  old.ckpt.restore_last = lambda _: (None, {'position': 4}, {'step': 4, 'val_iou': 0.5,
                                                              'best_iou': 0.75, 'since_best': 1})
  assert trainer._Trainer.restore(old) == {'position': 4}
  assert (old.best_score, old.since_best, old.last_good) == (0.75, 1, 4)
