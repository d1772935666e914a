"""Checkpoints: one orbax manager keeps the latest few and the best by validation IoU (its
preservation policy, nothing deleted by hand), and run directories written in the layout
before (DIR/checkpoints + DIR/checkpoints_best) still evaluate, predict and resume."""

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from flmiseg.store import checkpoint
from flmiseg.store import weights
from flmiseg.store import rundir
from flmiseg.core import sharding
from flmiseg.train import trainer


def _state(value):
  return {'w': np.full((8,), value, np.float32)}


def _target():
  """The restore target of `_state`: its shape and dtype, on the first device."""
  return {'w': jax.ShapeDtypeStruct((8,), np.float32, sharding=jax.sharding.
                                    SingleDeviceSharding(jax.devices()[0]))}


def _steps(folder: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _save(ckpt, step, val_iou, competes=True):
  ckpt.save(step, _state(step), {'position': step}, {'step': step, 'val_iou': val_iou},
            checkpoint.best_metrics(step, val_iou) if competes else None)


def test_one_manager_keeps_the_latest_and_the_best(tmp_path):
  """The validated checkpoints compete by IoU (the earlier step on ties, as training counts
  only a higher IoU as better); the others (checkpoint_every_steps between validations) are
  kept only while among the latest."""
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  ious = {1: 0.5, 2: 0.7, 3: None, 4: 0.6, 5: 0.7, 6: 0.4, 7: None, 8: 0.3}
  kept = {1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 3, 4], 5: [2, 4, 5], 6: [2, 5, 6],
          7: [2, 6, 7], 8: [2, 7, 8]}
  for step, iou in ious.items():
    _save(ckpt, step, iou, competes=iou is not None)
    assert _steps(tmp_path / 'checkpoints') == kept[step], step
    assert ckpt.best_step() == (1 if step == 1 else 2)
  assert ckpt.latest_step() == 8
  variables, step = checkpoint.restore_best_variables(tmp_path, _target())
  assert step == 2 and np.all(np.asarray(variables['w']) == 2)
  state, data_state, record = ckpt.restore_last(checkpoint.abstract(_state(0)))
  assert np.all(state['w'] == 8) and data_state == {'position': 8} and record['step'] == 8
  ckpt.close()
  assert not (tmp_path / 'checkpoints_best').exists()
  # A reopened manager (a resumed run) reads the metrics back and keeps the same best.
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  _save(ckpt, 9, 0.65)
  assert _steps(tmp_path / 'checkpoints') == [2, 8, 9] and ckpt.best_step() == 2
  _save(ckpt, 10, 0.8)
  assert _steps(tmp_path / 'checkpoints') == [9, 10] and ckpt.best_step() == 10
  ckpt.close()
  variables, step = checkpoint.restore_best_variables(tmp_path, _target())
  assert step == 10 and np.all(np.asarray(variables['w']) == 10)


def test_without_a_validation_split_the_latest_is_the_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  for step in (2, 4, 6):
    _save(ckpt, step, None)
    assert _steps(tmp_path / 'checkpoints') == [step] and ckpt.best_step() == step
  ckpt.close()
  assert checkpoint.best_key({'step': 3, 'val_iou': float('nan')}) < checkpoint.best_key(
      {'step': 9, 'val_iou': 0.0})


def test_instance_models_rank_by_the_mean_of_iou_and_ap(tmp_path):
  """With an instance AP@0.5 a checkpoint ranks by (IoU + AP) / 2, not by its IoU; metrics
  without one (semantic models, and every record written before) rank by their IoU, in the
  same order as before, among the others. The figures are binary fractions: exact means."""
  assert checkpoint.best_metrics(3, 0.75) == {'step': 3, 'val_iou': 0.75}  # semantic: as before
  assert checkpoint.best_metrics(3, 0.75, 0.25) == {'step': 3, 'val_iou': 0.75,
                                                    'val_ap_0.5': 0.25}
  assert checkpoint.best_key(checkpoint.best_metrics(3, 0.75, 0.25)) == (0.5, -3)
  assert checkpoint.best_key({'step': 3, 'val_iou': 0.75}) == (0.75, -3)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  # (IoU, AP) per step and the best after each save: step 2 (score 0.5625) beats step 1's
  # higher IoU (score 0.5) by its AP, step 3's still higher IoU does not (0.5), step 4 ties
  # step 2 (the earlier stays), step 5 wins by its AP (0.625) with the lowest IoU.
  saves = {1: (0.75, 0.25), 2: (0.625, 0.5), 3: (0.875, 0.125), 4: (0.5625, 0.5625),
           5: (0.5, 0.75)}
  best = {1: 1, 2: 2, 3: 2, 4: 2, 5: 5}
  for step, (iou, ap) in saves.items():
    ckpt.save(step, _state(step), {'position': step}, {'step': step, 'val_iou': iou},
              checkpoint.best_metrics(step, iou, ap))
    assert ckpt.best_step() == best[step], step
  assert _steps(tmp_path / 'checkpoints') == [5]
  # Metrics written before (IoU only) compete by their IoU: 0.625 ties step 5's score (the
  # earlier stays), 0.6875 beats it.
  _save(ckpt, 6, 0.625)
  assert ckpt.best_step() == 5
  _save(ckpt, 7, 0.6875)
  assert ckpt.best_step() == 7
  ckpt.close()
  nan = checkpoint.best_metrics(8, 0.875, float('nan'))
  assert checkpoint.best_key(nan) < checkpoint.best_key(checkpoint.best_metrics(9, 0.0, 0.0))


def test_a_deletion_cut_short_is_never_restored_and_is_deleted_again(tmp_path):
  """A kill while orbax deletes an old checkpoint leaves part of its folder: it is older than
  the latest and ranks below the best, so it is never restored, and the next save deletes it."""
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  for step, iou in ((1, 0.5), (2, 0.9), (3, 0.6)):
    _save(ckpt, step, iou)
  ckpt.close()
  folder = tmp_path / 'checkpoints'
  assert _steps(folder) == [2, 3]
  shutil.copytree(folder / '3', folder / '1')  # step 1, half deleted: its metrics remain
  (folder / '1' / 'metrics' / 'metrics').write_text(json.dumps({'step': 1, 'val_iou': 0.5}))
  shutil.rmtree(folder / '1' / 'state')
  (folder / '1' / '_CHECKPOINT_METADATA').unlink()
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=1)
  assert ckpt.latest_step() == 3 and ckpt.best_step() == 2
  assert ckpt.restore_last(checkpoint.abstract(_state(0)))[2]['step'] == 3
  _save(ckpt, 4, 0.1)
  ckpt.close()
  assert _steps(folder) == [2, 4]


def _write_old_layout(workdir, saves, best):
  """What flmiseg wrote before, with the same orbax calls: DIR/checkpoints (the latest 2, with
  the data iterator state) and DIR/checkpoints_best (the best, without it); no orbax metrics.

  saves: (step, state, data_state, record) in order; best: (step, state, record).
  """
  options = dict(create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True)
  last = ocp.CheckpointManager(workdir / 'checkpoints', options=ocp.CheckpointManagerOptions(
      max_to_keep=2, **options))
  for step, state, data_state, record in saves:
    last.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record),
        data=ocp.args.JsonSave(data_state)), force=True)
  last.close()
  step, state, record = best
  manager = ocp.CheckpointManager(workdir / 'checkpoints_best',
                                  options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             record=ocp.args.JsonSave(record)), force=True)
  manager.close()


def test_a_run_in_the_old_layout_loads_and_resumes(tmp_path):
  """Its best (DIR/checkpoints_best) competes with the new checkpoints by the IoU of its
  record; the resume reads DIR/checkpoints as before; nothing is written to the old folder."""
  records = {4: {'step': 4, 'val_iou': 0.8, 'best_iou': 0.8, 'since_best': 0},
             5: {'step': 5, 'val_iou': None, 'best_iou': 0.8, 'since_best': 0},
             6: {'step': 6, 'val_iou': 0.6, 'best_iou': 0.8, 'since_best': 1}}
  _write_old_layout(tmp_path, [(s, _state(s), {'position': s}, r) for s, r in records.items()],
                    (4, _state(4), {'step': 4, 'val_iou': 0.8, 'best_iou': 0.8}))
  (tmp_path / 'config.json').write_text('{}')
  rundir.check_trained(tmp_path)
  assert checkpoint.check_disk_space(tmp_path, _state(0), 2) == (
      checkpoint.estimate_disk_bytes(*checkpoint.tree_bytes(_state(0)), 2, existing=2))
  target = _target()
  variables, step = checkpoint.restore_best_variables(tmp_path, target)
  assert step == 4 and np.all(np.asarray(variables['w']) == 4)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  state, data_state, record = ckpt.restore_last(checkpoint.abstract(_state(0)))
  assert np.all(state['w'] == 6) and data_state == {'position': 6} and record == records[6]
  assert ckpt.best_step() == 4
  _save(ckpt, 7, 0.8)  # a tie: the earlier step stays the best
  assert ckpt.best_step() == 4
  assert checkpoint.restore_best_variables(tmp_path, target)[1] == 4
  _save(ckpt, 8, 0.9)
  assert ckpt.best_step() == 8 and _steps(tmp_path / 'checkpoints') == [7, 8]
  ckpt.close()
  assert _steps(tmp_path / 'checkpoints_best') == [4]
  assert checkpoint.restore_best_variables(tmp_path, target)[1] == 8


def test_an_old_run_without_validation_resumes_with_the_latest_as_the_best(tmp_path):
  _write_old_layout(tmp_path, [(2, _state(2), {'position': 2}, {'step': 2, 'val_iou': None})],
                    (2, _state(2), {'step': 2, 'val_iou': None}))
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.best_step() == 2
  _save(ckpt, 4, None)
  assert ckpt.best_step() == 4
  ckpt.close()


def test_a_trained_run_in_the_old_layout_evaluates_alike(tiny_run, tmp_path):
  """The tiny trained run rewritten in the old layout (its own checkpoints, with the orbax
  calls of the code before): the same weights and step for eval/predict/pack, and --mode=train
  on it finds the run finished and evaluates the same best checkpoint with the same calibration
  to the same test metrics."""
  config, run = tiny_run
  old = tmp_path / 'old'
  old.mkdir()
  for name in ('config.json', 'calibration.json', 'input_stats.json'):
    shutil.copyfile(run / name, old / name)
  abstract = checkpoint.abstract(trainer.build(config, (32, 32), 8).state)
  ckpt = checkpoint.Checkpointer(run, read_only=True)
  saves = []
  for step in ckpt.manager.all_steps():
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
        record=ocp.args.JsonRestore()))
    saves.append((step, restored.state, restored.data, restored.record))
  best = ckpt.best_step()
  ckpt.close()
  step, state, _, record = next(s for s in saves if s[0] == best)
  _write_old_layout(old, saves, (step, state, {**record, 'best_iou': record['val_iou']}))
  assert not list((old / 'checkpoints').glob('*/metrics'))

  mesh = sharding.make_mesh(jax.local_devices()[:1])
  rundir.check_trained(old)
  (new_state, new_step), (old_state, old_step) = (weights.load(config, d, mesh)
                                                  for d in (run, old))
  assert old_step == new_step == best
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get((new_state.params, new_state.batch_stats)),
               jax.device_get((old_state.params, old_state.batch_stats)))
  trainer.train_and_evaluate(config, old)
  for name in ('eval/summary.json', 'calibration.json'):
    assert json.loads((old / name).read_text()) == json.loads((run / name).read_text()), name
  assert _steps(old / 'checkpoints_best') == [best] and not list(old.glob('checkpoints/*/metrics'))
