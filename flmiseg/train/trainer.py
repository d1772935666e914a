"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate_best`.

Trains with validation every `config.eval.every_steps`, keeps the latest checkpoints and the
best one by validation IoU, calibrates the best one's probability threshold on the validation
split (DIR/calibration.json), then evaluates the best on the test set. Rerunning the same command
resumes from the latest checkpoint (a finished run does not retrain).
"""

import dataclasses
import json
import pathlib
import time

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import optax
import tqdm

from flmiseg.evaluation import calibration as calibration_lib
from flmiseg.store import checkpoint
from flmiseg.evaluation import evaluate
from flmiseg.core import files
from flmiseg.store import settings
from flmiseg.store import weights
from flmiseg.train import losses
from flmiseg import models
from flmiseg.train import optim
from flmiseg.core import sharding
from flmiseg.train import steps as steps_lib
from flmiseg.core import logs
from flmiseg.store import rundir
from flmiseg.core import runlock
from flmiseg.data import loader
from flmiseg.data import preprocess
from flmiseg.data import pipeline
from flmiseg.core.errors import UserError

# Fields that may differ between runs on one workdir without mixing incompatible work.
_FREE_FIELDS = ('eval', 'train.log_every_steps', 'train.resume_mismatch', 'data.num_workers',
                'data.synthetic_dir')


RESUME_MISMATCH = ('refuse', 'allow')


class TrainingDiverged(UserError):
  """The loss became NaN or inf."""


def prepare_workdir(config, workdir) -> pathlib.Path:
  """Creates workdir, refuses one made by a different config, writes config.json.

  config.json is only ever parsed as JSON, and written by process 0 only. Raises UserError
  when the workdir cannot be created or written, or holds the work of another config;
  ValueError for an invalid config.train.resume_mismatch.
  """
  if config.train.resume_mismatch not in RESUME_MISMATCH:
    raise ValueError(f'config.train.resume_mismatch={config.train.resume_mismatch!r}; valid: '
                     f'{", ".join(RESUME_MISMATCH)}')
  workdir = make_workdir(workdir)
  new = json.loads(config.to_json())
  path = workdir / 'config.json'
  if path.exists() and config.train.resume_mismatch != 'allow':
    try:
      saved = rundir.flatten(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON, not a dict.
      raise UserError(f'{path}: unreadable ({e}); use a new --workdir, or '
                      '--config.train.resume_mismatch=allow to overwrite it') from e
    # Fields absent from the old config were added to flmiseg since; their defaults keep the
    # old behaviour (or `rundir.with_legacy_fields` gives their old meaning).
    old = rundir.with_legacy_fields(saved)
    diff = [k for k, v in rundir.flatten(new).items()
            if k in old and old[k] != v and not k.startswith(_FREE_FIELDS)]
    if diff:
      hint = (f' (a run made before config.data.seed existed simulated its data with '
              f'config.seed: add --config.data.seed={old["data.seed"]})'
              if 'data.seed' in diff and 'data.seed' not in saved else '')
      raise UserError(f'{workdir} was made by a different config ({", ".join(diff[:4])} '
                      'differ); use a new --workdir, or --config.train.resume_mismatch=allow'
                      + hint)
  if jax.process_index() == 0:
    files.write_json_atomic(path, new, failure=f'--workdir={workdir}: not writable')
  return workdir


def make_workdir(workdir) -> pathlib.Path:
  """Creates the run directory (and its parents); UserError when it cannot."""
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'--workdir={workdir}: cannot create it ({e.strerror})') from e
  return workdir


def lock_run(workdir) -> runlock.RunLock:
  """DIR/run.lock taken by process 0 (flmiseg/core/runlock.py); raises RunDirectoryInUse on every
  process when a live training holds it."""
  lock = runlock.RunLock(workdir, enabled=jax.process_index() == 0)
  refusal = None
  try:
    lock.acquire()
  except UserError as e:
    refusal = e
  if jax.process_count() > 1:  # the other processes must stop too, not wait for process 0
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused and refusal is None:
      raise runlock.RunDirectoryInUse(f'--workdir={workdir}: process 0 could not lock it '
                                      '(its error line says why)')
  if refusal is not None:
    raise refusal
  return lock


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What `build` makes of a config: the pieces of a training."""
  model: nn.Module
  schedule: optax.Schedule  # step -> learning rate
  mesh: jax.sharding.Mesh
  state: steps_lib.TrainState  # initial, replicated over `mesh`
  total_steps: int  # config.train.num_steps, or num_epochs over the training images


def build(config, sample_hw, num_train: int) -> TrainSetup:
  """The model, schedule, mesh and initial train state of `config`, for `num_train` training
  images of crops `sample_hw` (H, W)."""
  dtype = weights.compute_dtype(config)
  sharding.check_batch_size(config.train.batch_size)
  losses.make_loss(config.train.loss, config.train.loss_weights)  # a bad name fails here
  model = models.create_model(config.model, dtype)
  per_epoch = optim.steps_per_epoch(num_train, config.train.batch_size)
  total = config.train.num_steps or config.train.num_epochs * per_epoch
  schedule = optim.make_schedule(config.optim, per_epoch, total)
  tx = optim.make_optimizer(config.optim, schedule)
  mesh = sharding.make_mesh()
  state = steps_lib.create_train_state(model, tx, sample_hw, config.seed, mesh)
  return TrainSetup(model, schedule, mesh, state, total)


class _Trainer:
  """The loop's mutable pieces: state, data iterator, pending metrics, best IoU."""

  def __init__(self, config, workdir, data, state, schedule, mesh, total_steps):
    self.config, self.workdir, self.data, self.mesh = config, workdir, data, mesh
    self.state, self.total_steps = state, total_steps
    self.ckpt = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    self.logger = logs.MetricsLogger(workdir, enabled=jax.process_index() == 0)
    loss_fn = losses.make_loss(config.train.loss, config.train.loss_weights)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    self.train_step, self.predict = steps_lib.jit_steps(config, loss_fn, schedule, mesh,
                                                        shardings)
    self.best_iou, self.last_good = -1.0, None
    # Step metrics: still on the device (pending), and fetched but not yet logged.
    self.pending, self.fetched = [], []
    # Early stopping: validations since the best one, and whether the run stopped early.
    self.since_best, self.stopped_early = 0, False

  def restore(self) -> dict | None:
    restored = self.ckpt.restore_last(checkpoint.abstract(self.state))
    if restored is None:
      return None
    self.state, data_state, record = restored
    self.best_iou, self.last_good = record.get('best_iou', -1.0), record['step']
    self.since_best = record.get('since_best', 0)
    self.stopped_early = record.get('stopped_early', False)
    logging.info('Resuming from step %d of %s', record['step'], self.workdir)
    return data_state

  def check_finite(self, step: int) -> None:
    """Fetches the pending step metrics of the steps up to `step` (waiting for the device) and
    raises TrainingDiverged if a loss is NaN or inf; they stay for the next `flush`."""
    fetched = jax.device_get(self.pending)
    self.pending = []
    first = step - len(fetched) + 1
    for offset, m in enumerate(fetched):
      if not np.isfinite(m['loss']):
        kept = (f'the last good checkpoint (step {self.last_good}) is kept'
                if self.last_good is not None else 'no checkpoint was written yet')
        raise TrainingDiverged(
            f'loss became {m["loss"]} at step {first + offset}; {kept}; try a lower '
            f'learning rate, e.g. --config.optim.lr={self.config.optim.lr / 10:g}')
    self.fetched.extend(fetched)

  def flush(self, step: int) -> dict:
    """`check_finite`, then the mean of the step metrics since the last flush."""
    self.check_finite(step)
    fetched, self.fetched = self.fetched, []
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}

  def checkpoint(self, step: int, data_iter, val_iou: float | None) -> None:
    if val_iou is not None and val_iou > self.best_iou:
      self.best_iou, self.since_best = val_iou, 0
    elif val_iou is not None:
      self.since_best += 1
    patience = self.config.train.early_stop_patience
    self.stopped_early = bool(patience and self.since_best >= patience)
    # Orbax keeps the best (checkpoint.best_key): the validated checkpoints compete by their
    # IoU; without a validation split every one competes and the latest wins.
    competes = val_iou is not None or self.data.val is None
    self.ckpt.save(step, self.state, data_iter.get_state(),
                   {'step': step, 'val_iou': val_iou, 'best_iou': self.best_iou,
                    'since_best': self.since_best, 'stopped_early': self.stopped_early},
                   checkpoint.best_metrics(step, val_iou) if competes else None)
    self.last_good = step

  def validate(self, step: int) -> float | None:
    if self.data.val is None:
      return None
    iou = evaluate.validation_iou(self.predict, self.state, self.data.val, self.mesh,
                                  self.config.eval.batch_size)
    self.logger.write(step, 'val', {'iou': iou})
    self.logger.plot()
    return iou

  def validate_source(self, data_iter) -> None:
    """Validates and checkpoints the fine-tuning source as step 0, so it competes for the
    best checkpoint: a fine-tuned run never ends worse on validation than its start."""
    val_iou = self.validate(0)
    logging.info('The source model (config.train.init_from): validation IoU %.4f', val_iou)
    self.checkpoint(0, data_iter, val_iou)

  def run(self, data_iter, start: int) -> None:
    cfg = self.config.train
    every_eval = self.config.eval.every_steps
    every_ckpt = cfg.checkpoint_every_steps or every_eval
    bar = tqdm.tqdm(total=self.total_steps, initial=start, desc='train', unit='step',
                    disable=jax.process_index() != 0, dynamic_ncols=True)
    # Images/s counts the training steps since (tick_step, tick) only: both are reset together
    # after each log line and after each validation and checkpoint, whose time is excluded.
    tick, tick_step = time.perf_counter(), start
    for step in range(start + 1, self.total_steps + 1):
      batch = sharding.global_batch(next(data_iter), self.mesh)
      self.state, scalars = self.train_step(self.state, batch)
      self.pending.append(scalars)
      bar.update(1)
      last = step == self.total_steps
      evaluate_now = step % every_eval == 0 or last
      save_now = evaluate_now or step % every_ckpt == 0
      if step % cfg.log_every_steps == 0 or last or step % every_ckpt == 0:  # a log line
        mean = self.flush(step)  # waits for the device, so the rate below is real
        rate = (step - tick_step) * cfg.batch_size / (time.perf_counter() - tick)
        self.logger.write(step, 'train', {**mean, 'images_per_s': rate})
        bar.set_postfix(loss=f'{mean["loss"]:.4f}', lr=f'{mean["lr"]:.2e}',
                        img_s=f'{rate:.1f}')
        tick, tick_step = time.perf_counter(), step
      elif save_now:
        self.check_finite(step)  # never validate or save diverged weights, whatever the logging
      val_iou = self.validate(step) if evaluate_now else None
      if val_iou is not None:
        bar.write(f'step {step}: validation IoU {val_iou:.4f}')
      if save_now:
        self.checkpoint(step, data_iter, val_iou)
        tick, tick_step = time.perf_counter(), step
      if self.stopped_early:
        bar.write(f'step {step}: stopping early, no better validation IoU in the last '
                  f'{self.since_best} validations (config.train.early_stop_patience)')
        break
    bar.close()


def train_and_evaluate(config, workdir) -> dict:
  """Trains per `config` in `workdir` (resuming if possible), calibrates the threshold of the
  best checkpoint on the validation split, then evaluates it on the test set.

  Returns the test summary (also written to DIR/eval/summary.json), or {} without a test set.
  The run directory is locked meanwhile (DIR/run.lock, flmiseg/core/runlock.py): a second training
  started on it while this one lives is refused (runlock.RunDirectoryInUse).
  """
  with lock_run(make_workdir(workdir)):
    return _train_and_evaluate(config, pathlib.Path(workdir))


def _train_and_evaluate(config, workdir: pathlib.Path) -> dict:
  """`train_and_evaluate` in a run directory that this process has locked."""
  if config.train.init_from:
    adopt_source_settings(config)
  workdir = prepare_workdir(config, workdir)
  calibration_lib.check_calibrate_metric(config.eval.calibrate_metric)  # before training
  data = loader.load(config, workdir / 'cache')
  largest = max(max(shape) for shape in data.train.shapes)
  if config.data.crop_size > largest:
    # Every crop would be mostly padding (a user's small annotated crops under a recipe made
    # for larger images): train on crops that fit, a multiple of pipeline.SIZE_MULTIPLE (so
    # no stock network pads them inside). The networks take any size, so predict's default
    # tile (the configured crop) still works.
    multiple = pipeline.SIZE_MULTIPLE
    crop = largest if largest < multiple else largest // multiple * multiple
    logging.warning('config.data.crop_size=%d is larger than every training image (largest '
                    'side %d): training on crops of %d', config.data.crop_size, largest, crop)
    config.data.crop_size = crop
  if (config.train.init_from and config.model.get('instance_head') and
      config.train.instance_weight and not data.train.has_labels):
    # Binary masks give touching objects one distance peak: training the head on them would
    # teach it to merge what the source model separates.
    logging.warning('config.train.init_from=%s: the training masks are binary, not label '
                    'images, so the instance head is not trained (config.train.'
                    'instance_weight=0); give label images to fine-tune it',
                    config.train.init_from)
    config.train.instance_weight = 0.0
  # The 'invert' augmentation's mirror point: images seen as mirror - x count as training
  # images for the domain warnings too.
  mirror = (preprocess.mirror_point(config.data.normalization, config.data.kind)
            if 'invert' in pipeline.parse_augment(config.data.augment) else None)
  if jax.process_index() == 0 and rundir.read_input_stats(workdir) is None:
    rundir.write_input_stats(workdir, rundir.input_stats(data.train, mirror=mirror))
  crop = config.data.crop_size
  setup = build(config, (crop, crop), len(data.train))
  mesh, total = setup.mesh, setup.total_steps
  checkpoint.check_disk_space(workdir, setup.state, config.train.max_checkpoints)
  trainer = _Trainer(config, workdir, data, setup.state, setup.schedule, mesh, total)
  data_state = trainer.restore()
  start = int(trainer.state.step)
  if data_state is None and config.train.init_from:
    trainer.state = initialize_from(config, trainer.state, mesh)
  if start < total and not trainer.stopped_early:
    it = iter(pipeline.train_dataset(
        data.train, crop_size=crop, global_batch=config.train.batch_size, num_steps=total,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers,
        flips=config.data.flips, augment=config.data.augment,
        mirror=mirror))
    if data_state is not None:
      it.set_state(data_state)
    elif config.train.init_from and data.val is not None:
      trainer.validate_source(it)
    logging.info('Training %s/%s for %d steps (%d images, batch %d, %d devices)',
                 config.model.name, config.model.variant, total, len(data.train),
                 config.train.batch_size, jax.device_count())
    trainer.run(it, start)
  else:
    logging.info('%s already finished training (%d steps); not retraining.', workdir, total)
  trainer.ckpt.close()
  trainer.logger.close()
  if data.test is None:
    state, step = restore_best(workdir, trainer.state)
    calibrate_best(config, workdir, data, mesh, state, trainer.predict, step)
    return {}
  return evaluate_best(config, workdir, data=data, mesh=mesh, state=trainer.state,
                       predict=trainer.predict)


def _init_source(config):
  """(folder, config) of the model config.train.init_from names."""
  from flmiseg.store import pretrained  # pylint: disable=g-import-not-at-top
  folder = rundir.check_trained(pretrained.resolve_model(config.train.init_from,
                                                         'config.train.init_from'))
  return folder, rundir.read_config(folder)


def adopt_source_settings(config) -> None:
  """With config.train.init_from, sets config.data.kind and .normalization to the source
  model's when they would give its weights other inputs than it was trained on, and
  config.model.instance_head to the source's (a one-line warning says so for each):
  fine-tuning a nucleus model must see nucleus preprocessing and keep its instance head. A
  config that records no object diameter takes the source's (config.data.object_diameter),
  so predict's --diameter works on the fine-tuned model as on its source."""
  _, source = _init_source(config)
  if not config.data.get('object_diameter') and source.data.get('object_diameter'):
    config.data.object_diameter = source.data.object_diameter
  head = source.model.get('instance_head', '')
  if config.model.get('instance_head', '') != head:
    logging.warning('config.train.init_from=%s: using its instance head (%r) instead of %r',
                    config.train.init_from, head, config.model.get('instance_head', ''))
    config.model.instance_head = head
  resolve = lambda data: preprocess.resolve(data.normalization, data.kind)
  if resolve(source.data) != resolve(config.data):
    logging.warning('config.train.init_from=%s: using its preprocessing (kind %s, '
                    'normalization %s) instead of %s/%s', config.train.init_from,
                    source.data.kind, source.data.normalization, config.data.kind,
                    config.data.normalization)
    config.data.kind, config.data.normalization = source.data.kind, source.data.normalization


def initialize_from(config, state, mesh):
  """`state` with the params and batch_stats of config.train.init_from (a shipped model's
  name, or a run or packed folder), for fine-tuning; the optimizer state stays fresh. The
  preprocessing was matched before by `adopt_source_settings`."""
  folder, source = _init_source(config)
  mine = rundir.flatten(config.model.to_dict())
  for key, value in rundir.flatten(source.model.to_dict()).items():
    if mine.get(key) != value:
      raise UserError(f'config.train.init_from={config.train.init_from}: its '
                      f'config.model.{key}={value!r}, this run\'s is {mine.get(key)!r}; '
                      'fine-tuning needs the same architecture')
  loaded, step = weights.load(source, folder, mesh)
  logging.info('Initialised from %s (step %d)', folder, step)
  return state.replace(params=loaded.params, batch_stats=loaded.batch_stats)


def restore_best(workdir, state):
  """(`state` with the params and batch_stats of the best checkpoint of `workdir`, its step).

  Evaluation needs the weights only: the optimizer state (twice the parameters for Adam) is
  not read, and `state` keeps its own."""
  wanted = {'params': state.params}
  if state.batch_stats:
    wanted['batch_stats'] = state.batch_stats
  target = checkpoint.abstract(wanted)
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
  calibration_lib.check_calibrate_metric(ev.calibrate_metric)
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
  folder, _ = _init_source(config)
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


def evaluate_best(config, workdir, data=None, mesh=None, state=None, predict=None) -> dict:
  """Evaluates the best checkpoint of `workdir` on the test set; writes DIR/eval/.

  Every metric is computed at config.eval.threshold and, when the threshold is calibrated
  (`calibrate_best`, done here if it is missing), again at the calibrated one.
  """
  workdir = pathlib.Path(workdir)
  calibration_lib.check_calibrate_metric(config.eval.calibrate_metric)
  if data is None:
    data = loader.load(config, workdir / 'cache', need_train=False)
  if data.test is None:
    raise UserError('config.data.test_list is empty: nothing to evaluate')
  if state is None:  # --mode=eval: the weights alone, no optimizer or training batch
    mesh = sharding.make_mesh()
    state, step = weights.load(config, workdir, mesh)
  else:
    state, step = restore_best(workdir, state)
  predict = predict or steps_lib.jit_predict(config.eval.threshold)
  calibration = calibrate_best(config, workdir, data, mesh, state, predict, step)
  return evaluate.evaluate(predict, state, data.test, mesh, config.eval.batch_size,
                           config.eval.threshold, out_dir=workdir / 'eval',
                           extra={'checkpoint_step': step}, calibration=calibration,
                           dynamic=settings.seed_dynamic(config, calibration, step),
                           min_size=settings.min_size(config))
