"""Training: `train_and_evaluate(config, workdir)`.

Checks the config (`config_checks.validate`) and builds the loss once, before anything is
loaded or written; completes the config (a fine-tuned run adopts its source model's
preprocessing and instance head, flmiseg/train/finetune.py; the crops and the instance head's
weight fit the loaded training data, `fit_to_data`), and only then writes it as DIR/config.json
(`prepare_workdir`, which refuses a workdir made by another config). Trains with validation
every `config.eval.every_steps`, keeps the latest checkpoints and the best one by the
validation score (`checkpoint.selection_score`: the mean per-image IoU; for a model with an
instance head validated on label images, the mean of the IoU and the pooled instance AP@0.5),
which early stopping follows too, then calibrates and evaluates the best one
(flmiseg/evaluation/best_checkpoint.py).
Rerunning the same command resumes from the latest checkpoint (a finished run does not
retrain).
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

from flmiseg import models
from flmiseg.core import files
from flmiseg.core import logs
from flmiseg.core import runlock
from flmiseg.core import sharding
from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import loader
from flmiseg.data import pipeline
from flmiseg.data import preprocess
from flmiseg.evaluation import best_checkpoint
from flmiseg.evaluation import evaluate
from flmiseg.store import checkpoint
from flmiseg.store import rundir
from flmiseg.store import settings
from flmiseg.store import weights
from flmiseg.train import config_checks
from flmiseg.train import finetune
from flmiseg.train import losses
from flmiseg.train import optim
from flmiseg.train import steps as steps_lib


class TrainingDiverged(UserError):
  """The loss became NaN or inf."""


def prepare_workdir(config, workdir, as_given: dict | None = None) -> pathlib.Path:
  """Creates workdir, refuses one made by a different config, writes config.json.

  `config` is the completed config (`complete_config`), `as_given` the same config before
  completion, as JSON: a field of an existing config.json matches when it holds either value,
  so runs written before the completed values were recorded resume too. Fields whose rule lets
  them differ on resume (config_checks) are not compared. config.json is only ever parsed as
  JSON, and written by process 0 only. Raises UserError when the workdir cannot be created or
  written, or holds the work of another config.
  """
  workdir = make_workdir(workdir)
  new = json.loads(config.to_json())
  path = workdir / 'config.json'
  if path.exists() and config.train.resume_mismatch != 'allow':
    _check_same_config(path, rundir.flatten(new), rundir.flatten(as_given or new))
  if jax.process_index() == 0:
    files.write_json_atomic(path, new, failure=f'--workdir={workdir}: not writable')
  return workdir


def _check_same_config(path: pathlib.Path, new: dict, given: dict) -> None:
  """Raises UserError unless the config.json at `path` holds, in every field it has that may
  not differ on resume, the value of `new` (completed) or of `given` (flattened configs)."""
  try:
    saved = rundir.flatten(json.loads(path.read_text()))
  except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON, not a dict.
    raise UserError(f'{path}: unreadable ({e}); use a new --workdir, or '
                    '--config.train.resume_mismatch=allow to overwrite it') from e
  # Fields absent from the old config were added to flmiseg since; their defaults keep the
  # old behaviour (or `rundir.with_legacy_fields` gives their old meaning).
  old = rundir.with_legacy_fields(saved)
  diff = [k for k, v in new.items() if k in old and old[k] != v and old[k] != given.get(k, v)
          and not config_checks.may_differ_on_resume(k)]
  if diff:
    hint = (f' (a run made before config.data.seed existed simulated its data with '
            f'config.seed: add --config.data.seed={old["data.seed"]})'
            if 'data.seed' in diff and 'data.seed' not in saved else '')
    raise UserError(f'{path.parent} was made by a different config ({", ".join(diff[:4])} '
                    'differ); use a new --workdir, or --config.train.resume_mismatch=allow'
                    + hint)


def make_workdir(workdir) -> pathlib.Path:
  """Creates the run directory (and its parents); UserError when it cannot."""
  return io.make_dir(workdir, f'--workdir={workdir}', 'it')


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
  model = models.create_model(config.model, dtype)
  per_epoch = optim.steps_per_epoch(num_train, config.train.batch_size)
  total = config.train.num_steps or config.train.num_epochs * per_epoch
  schedule = optim.make_schedule(config.optim, per_epoch, total)
  tx = optim.make_optimizer(config.optim, schedule)
  mesh = sharding.make_mesh()
  state = steps_lib.create_train_state(model, tx, sample_hw, config.seed, mesh)
  return TrainSetup(model, schedule, mesh, state, total)


def make_loss(config) -> losses.Loss:
  """The training loss of `config` (config.train.loss, .loss_weights, and the instance head's
  term weighted by config.train.instance_weight: `losses.from_config`): the one place a
  training builds it, once (`train_and_evaluate`, once the config is complete; its names
  were checked before the data was loaded: `config_checks.validate`); `_Trainer` gives it
  to `steps.jit_steps`. A name that is no registered loss, or weights that do not
  fit its terms, raise a one-line UserError naming the setting."""
  try:
    return losses.from_config(config)
  except (ValueError, TypeError) as e:
    raise UserError(' '.join(str(e).split())) from e


def instance_validation(config, val) -> tuple[float, float, int] | None:
  """(threshold, seed dynamic, min size) of the instances a validation matches, or None.

  A model with an instance head whose validation split has label images is validated on its
  instance AP@0.5 too: instances at the predict step's threshold (config.eval.threshold) with
  the configured seed dynamic and min size (flmiseg/store/settings.py); calibration comes
  after training, on the best checkpoint."""
  if not config.model.get('instance_head') or val is None or not val.has_labels:
    return None
  return (config.eval.threshold, settings.configured_dynamic(config), settings.min_size(config))


def describe_validation(val: dict) -> str:
  """'validation IoU 0.8123', with 'AP@0.5 0.7000 (score 0.7562)' added where it has one."""
  text = f'validation IoU {val["iou"]:.4f}'
  if 'ap_0.5' in val:
    text += f', AP@0.5 {val["ap_0.5"]:.4f} (score {val["score"]:.4f})'
  return text


class _Trainer:
  """The loop's mutable pieces: state, data iterator, pending metrics, best validation score."""

  def __init__(self, config, workdir, data, setup: TrainSetup, loss_fn: losses.LossFn):
    self.config, self.workdir, self.data, self.mesh = config, workdir, data, setup.mesh
    self.state, self.total_steps = setup.state, setup.total_steps
    self.ckpt = checkpoint.Checkpointer(workdir, config.train.max_checkpoints)
    self.logger = logs.MetricsLogger(workdir, enabled=jax.process_index() == 0)
    # The training's one loss (`make_loss`) is bound into the jitted train step here.
    shardings = jax.tree.map(lambda x: x.sharding, setup.state)
    self.train_step, self.predict = steps_lib.jit_steps(config, loss_fn, setup.schedule,
                                                        setup.mesh, shardings)
    self.instances_at = instance_validation(config, data.val)
    self.score_name = 'score' if self.instances_at else 'IoU'
    self.best_score, self.last_good = -1.0, None
    # Step metrics: still on the device (pending), and fetched but not yet logged.
    self.pending, self.fetched = [], []
    # Early stopping: validations since the best one, and whether the run stopped early.
    self.since_best, self.stopped_early = 0, False

  def restore(self) -> dict | None:
    restored = self.ckpt.restore_last(checkpoint.abstract(self.state))
    if restored is None:
      return None
    self.state, data_state, record = restored
    # Records written before validation scores hold the best IoU (their score).
    self.best_score = record.get('best_score', record.get('best_iou', -1.0))
    self.last_good = record['step']
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

  def checkpoint(self, step: int, data_iter, val: dict | None) -> None:
    """Saves a checkpoint of `step` with its validation (`validate`'s dict, or None when
    this step was not validated), and counts the validations since the best for early
    stopping."""
    iou, ap = (None, None) if val is None else (val['iou'], val.get('ap_0.5'))
    score = None if val is None else checkpoint.selection_score(iou, ap)
    if score is not None and score > self.best_score:
      self.best_score, self.since_best = score, 0
    elif score is not None:
      self.since_best += 1
    patience = self.config.train.early_stop_patience
    self.stopped_early = bool(patience and self.since_best >= patience)
    # Orbax keeps the best (checkpoint.best_key): the validated checkpoints compete by their
    # score; without a validation split every one competes and the latest wins.
    competes = val is not None or self.data.val is None
    record = {'step': step, 'val_iou': iou, 'best_score': self.best_score,
              'since_best': self.since_best, 'stopped_early': self.stopped_early}
    if ap is not None:
      record['val_ap_0.5'] = ap
    self.ckpt.save(step, self.state, data_iter.get_state(), record,
                   checkpoint.best_metrics(step, iou, ap) if competes else None)
    self.last_good = step

  def validate(self, step: int) -> dict | None:
    """{'iou'}, and for instance validation (`instance_validation`) 'ap_0.5' and 'score'
    (`checkpoint.selection_score`), of the current weights on the validation split, logged
    as a 'val' row of metrics.jsonl; None without a validation split."""
    if self.data.val is None:
      return None
    val = evaluate.validation_scores(self.predict, self.state, self.data.val, self.mesh,
                                     self.config.eval.batch_size, self.instances_at)
    if 'ap_0.5' in val:
      val['score'] = checkpoint.selection_score(val['iou'], val['ap_0.5'])
    self.logger.write(step, 'val', val)
    self.logger.plot()
    return val

  def validate_source(self, data_iter) -> None:
    """Validates and checkpoints the fine-tuning source as step 0, so it competes for the
    best checkpoint: a fine-tuned run never ends worse on validation than its start."""
    val = self.validate(0)
    logging.info('The source model (config.train.init_from): %s', describe_validation(val))
    self.checkpoint(0, data_iter, val)

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
      val = self.validate(step) if evaluate_now else None
      if val is not None:
        bar.write(f'step {step}: {describe_validation(val)}')
      if save_now:
        self.checkpoint(step, data_iter, val)
        tick, tick_step = time.perf_counter(), step
      if self.stopped_early:
        bar.write(f'step {step}: stopping early, no better validation {self.score_name} in '
                  f'the last {self.since_best} validations (config.train.early_stop_patience)')
        break
    bar.close()


def train_and_evaluate(config, workdir) -> dict:
  """Trains per `config` in `workdir` (resuming if possible), calibrates the threshold of the
  best checkpoint on the validation split, then evaluates it on the test set.

  `config` is checked first (`config_checks.validate`: a UserError of one line naming the
  first invalid field) and completed in place before it is written to DIR/config.json (the
  module docstring). Returns the test summary (also written to DIR/eval/summary.json), or {}
  without a test set. The run directory is locked meanwhile (DIR/run.lock,
  flmiseg/core/runlock.py): a second training started on it while this one lives is refused
  (runlock.RunDirectoryInUse).
  """
  config_checks.validate(config)
  losses.check_spec(config.train.loss, config.train.loss_weights)  # before the data loads
  with lock_run(make_workdir(workdir)):
    return _train_and_evaluate(config, pathlib.Path(workdir))


def _train_and_evaluate(config, workdir: pathlib.Path) -> dict:
  """`train_and_evaluate` in a run directory that this process has locked."""
  data = complete_config(config, workdir)
  loss_fn = make_loss(config)  # of the completed config (its instance weight)
  # The 'invert' augmentation's mirror point: images seen as mirror - x count as training
  # images for the domain warnings too.
  mirror = (preprocess.mirror_point(config.data.normalization, config.data.kind)
            if 'invert' in pipeline.parse_augment(config.data.augment) else None)
  if jax.process_index() == 0 and rundir.read_input_stats(workdir) is None:
    rundir.write_input_stats(workdir, rundir.input_stats(data.train, mirror=mirror))
  crop = config.data.crop_size
  setup = build(config, (crop, crop), len(data.train))
  checkpoint.check_disk_space(workdir, setup.state, config.train.max_checkpoints)
  trainer = _Trainer(config, workdir, data, setup, loss_fn)
  data_state = trainer.restore()
  start, total = int(trainer.state.step), setup.total_steps
  if data_state is None and config.train.init_from:
    trainer.state = finetune.initialize_from(config, trainer.state, setup.mesh)
  if start < total and not trainer.stopped_early:
    it = iter(pipeline.train_dataset(
        data.train, crop_size=crop, global_batch=config.train.batch_size, num_steps=total,
        seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.data.num_workers,
        flips=config.data.flips, augment=config.data.augment, mirror=mirror,
        scale_range=tuple(config.data.get('scale_range', pipeline.SCALE_RANGE)),
        dim_range=tuple(config.data.get('dim_range', pipeline.DIM_RANGE))))
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
  return _evaluate_best(config, workdir, data, trainer)


def _evaluate_best(config, workdir: pathlib.Path, data, trainer: _Trainer) -> dict:
  """Calibrates the best checkpoint and evaluates it on the test set ({} without one)."""
  if data.test is None:
    state, step = best_checkpoint.restore_best(workdir, trainer.state)
    best_checkpoint.calibrate_best(config, workdir, data, trainer.mesh, state, trainer.predict,
                                   step)
    return {}
  return best_checkpoint.evaluate_best(config, workdir, trainer.predict, data=data,
                                       mesh=trainer.mesh, state=trainer.state)


def complete_config(config, workdir: pathlib.Path) -> loader.Datasets:
  """Completes `config` in place and writes it to DIR/config.json; returns the loaded data.

  A fine-tuned run first takes its source model's preprocessing and instance head
  (`finetune.adopt_source_settings`, which the data loading depends on), then the crops and the
  instance head's weight are fitted to the loaded training data (`fit_to_data`); only the
  completed config is written (`prepare_workdir`, which compares it with an existing
  config.json first).
  """
  as_given = json.loads(config.to_json())
  if config.train.init_from:
    finetune.adopt_source_settings(config)
  data = loader.load(config, workdir / 'cache')
  fit_to_data(config, data.train)
  prepare_workdir(config, workdir, as_given)
  return data


def fit_to_data(config, train) -> None:
  """Fits `config` to the training source `train` (a dataset.PreparedSource), with a
  one-line warning for each change: crops no larger than its largest image, and an instance
  head that a fine-tuned run does not train on binary masks (config.train.instance_weight=0).
  """
  largest = max(max(shape) for shape in train.shapes)
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
      config.train.instance_weight and not train.has_labels):
    # Binary masks give touching objects one distance peak: training the head on them would
    # teach it to merge what the source model separates.
    logging.warning('config.train.init_from=%s: the training masks are binary, not label '
                    'images, so the instance head is not trained (config.train.'
                    'instance_weight=0); give label images to fine-tune it',
                    config.train.init_from)
    config.train.instance_weight = 0.0
