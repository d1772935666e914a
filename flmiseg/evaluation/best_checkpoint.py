"""The best checkpoint of a run: restored, its threshold calibrated, evaluated on the test set.

`evaluate_best(config, workdir, predict)` (training's last step, and --mode=eval) evaluates the
best checkpoint of a run on the test set and writes DIR/eval/; `calibrate_best` calibrates the
probability threshold (and the instance seeds' dynamic) of that checkpoint on the validation
split, or reuses DIR/calibration.json when it was made for it (a fine-tuned run with a small
validation split keeps its source model's, `keep_source_calibration`). `predict` is the jitted
predict step (flmiseg/train/steps.py: `jit_predict`, or the ONNX backend's), which the caller
gives.
"""

import pathlib

from absl import logging
import jax

from flmiseg.core import sharding
from flmiseg.core.errors import UserError
from flmiseg.data import loader
from flmiseg.evaluation import calibration as calibration_lib
from flmiseg.evaluation import evaluate
from flmiseg.store import checkpoint
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import settings
from flmiseg.store import weights


def restore_best(workdir, state):
  """(`state` with the params and batch_stats of the best checkpoint of `workdir`, its step).

  Evaluation needs the weights only: the optimizer state (twice the parameters for Adam) is
  not read, and `state` keeps its own."""
  weights = {'params': state.params}
  if state.batch_stats:
    weights['batch_stats'] = state.batch_stats
  target = checkpoint.abstract(weights)
  restored = checkpoint.restore_best_variables(workdir, target)
  if restored is None:
    raise UserError(f'{workdir}: no trained checkpoint (train first with --mode=train)')
  variables, step = restored
  return state.replace(**variables), step


def calibrate_best(config, workdir, data, mesh, state, predict, step: int) -> dict | None:
  """The threshold calibration of the best checkpoint (step `step`, weights `state`).

  Reuses DIR/calibration.json when it was made for this checkpoint, metric and default
  threshold; otherwise sweeps the validation split and writes it. Returns None when
  config.eval.calibrate_metric is '' or there is no validation split.
  """
  ev = config.eval
  if not ev.calibrate_metric:
    return None
  stored = calibration_lib.read_calibration(workdir)
  head = bool(config.model.get('instance_head'))
  if stored is not None and (stored.get('checkpoint_step'), stored.get('metric'),
                             stored.get('default_threshold')) == (
                                 step, ev.calibrate_metric, ev.threshold) and (
                                     not head or 'seed_dynamic' in stored):
    logging.info('Reusing the threshold %g calibrated for step %d (%s)', stored['threshold'],
                 step, workdir / calibration_lib.CALIBRATION_FILE)
    return stored
  if data.val is None and data.train is None and config.data.val_fraction > 0:
    data = loader.load(config, workdir / 'cache')  # --mode=eval loaded only the test set
  if data.val is None:
    logging.info('No validation split (config.data.val_fraction=0): not calibrating the '
                 'threshold; config.eval.threshold=%g is used.', ev.threshold)
    return None
  result = calibration_lib.calibrate_source(predict, state, data.val, mesh, ev.batch_size,
                                            ev.calibrate_metric, ev.threshold)
  result['checkpoint_step'] = step
  if head:  # the seeds of the instance head, at the calibrated threshold
    result['seed_dynamic'] = None  # binary validation masks: no true instances to tune on
    if data.val.has_labels:
      result.update(calibration_lib.calibrate_dynamic(
          predict, state, data.val, mesh, ev.batch_size, result['threshold'],
          settings.min_size(config), settings.configured_dynamic(config)))
      logging.info('Calibrated the instance seeds\' dynamic %g on the validation split '
                   '(instance AP@0.5 %.4f)', result['seed_dynamic'],
                   result['seed_dynamic_ap_0.5'][f'{result["seed_dynamic"]:g}'])
  if config.train.init_from:
    keep_source_calibration(config, result, head)
  if jax.process_index() == 0:
    calibration_lib.write_calibration(workdir, result)
  if 'swept_threshold' not in result:
    logging.info('Calibrated threshold %g on %d validation images: mean %s %.4f (%.4f at %g)',
                 result['threshold'], result['num_val_images'], result['metric'],
                 result['val_score'], result['val_score_at_default'], ev.threshold)
  return result


def keep_source_calibration(config, result: dict, head: bool) -> None:
  """A fine-tuned run keeps its source model's calibrated threshold when its validation
  split has fewer than calibration.MIN_IMAGES_TO_RECALIBRATE images (a threshold chosen on
  three crops follows their noise), and the source's seed dynamic when its validation masks
  give none; `result` (calibrate_best's) records both values."""
  folder = rundir.check_trained(pretrained.resolve_model(config.train.init_from,
                                                         'config.train.init_from'))
  source = calibration_lib.read_calibration(folder) or {}
  if (source.get('threshold') is not None and
      result['num_val_images'] < calibration_lib.MIN_IMAGES_TO_RECALIBRATE):
    logging.info('Keeping the threshold %g of config.train.init_from=%s (%d validation images '
                 'are too few to recalibrate; the sweep chose %g)', source['threshold'],
                 config.train.init_from, result['num_val_images'], result['threshold'])
    result['swept_threshold'], result['threshold'] = result['threshold'], source['threshold']
    result['threshold_from'] = 'config.train.init_from'
  if head and result.get('seed_dynamic') is None and source.get('seed_dynamic') is not None:
    result['seed_dynamic'] = source['seed_dynamic']


def evaluate_best(config, workdir, predict, data=None, mesh=None, state=None) -> dict:
  """Evaluates the best checkpoint of `workdir` on the test set; writes DIR/eval/.

  `predict(state, batch)` is the predict step at config.eval.threshold (steps.jit_predict).
  `data`, `mesh` and `state` are the training's (its datasets, mesh and a train state whose
  weights the best checkpoint's replace); None (--mode=eval): the test set is loaded, and the
  best checkpoint's weights alone. Every metric is computed at config.eval.threshold and, when
  the threshold is calibrated (`calibrate_best`, done here if it is missing), again at the
  calibrated one. Returns the test summary (also DIR/eval/summary.json).
  """
  workdir = pathlib.Path(workdir)
  if data is None:
    data = loader.load(config, workdir / 'cache', need_train=False)
  if data.test is None:
    raise UserError('config.data.test_list is empty: nothing to evaluate')
  if state is None:  # --mode=eval: the weights alone, no optimizer or training batch
    mesh = sharding.make_mesh()
    state, step = weights.load(config, workdir, mesh)
  else:
    state, step = restore_best(workdir, state)
  calibration = calibrate_best(config, workdir, data, mesh, state, predict, step)
  return evaluate.evaluate(predict, state, data.test, mesh, config.eval.batch_size,
                           config.eval.threshold, out_dir=workdir / 'eval',
                           extra={'checkpoint_step': step}, calibration=calibration,
                           dynamic=settings.seed_dynamic(config, calibration, step),
                           min_size=settings.min_size(config))
