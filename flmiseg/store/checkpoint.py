"""Checkpoints with orbax: one CheckpointManager in DIR/checkpoints keeps the latest few and the
best one (by the validation score: IoU, with AP@0.5 for instance models).

Each checkpoint holds the train state, the data iterator state (so a resumed run sees exactly
the batches an uninterrupted run would), a small JSON record (step, validation IoU and
instance AP@0.5, the early stopping counters) and, when it competes for the best, orbax's
metrics (`best_metrics`). Which checkpoints stay is orbax's preservation policy: the latest
`max_to_keep`, or the best by `best_key` (the highest `selection_score`, the earliest step on
ties; without a validation split the latest). The score is the validation IoU, or for a model
with an instance head validated on label images the mean of its IoU and instance AP@0.5;
metrics and records written before hold the IoU only and rank by it. The threshold calibrated for the best checkpoint lives beside them in
DIR/calibration.json. Nothing is pickled: arrays go to tensorstore, the rest to JSON.

Runs written before kept the best in a second folder, DIR/checkpoints_best (without the data
iterator state or metrics). That folder is still read, never written: its checkpoint competes
for the best with those of DIR/checkpoints by the IoU of its record, so an old run evaluates,
predicts and resumes as before.

Crash safety (kill -9 at any moment, disk full):
  * orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so
    a half-written checkpoint never becomes the latest; such unfinished folders (a kill, a
    failed write) are removed by the next training: the manager starts removing them when it
    opens and finishes before its first save (`cleanup_tmp_directories`).
  * One save per step: a rerun resumes from the latest checkpoint, so it never saves a step
    that exists.
  * A save that fails for lack of space or permission stops the run with a
    CheckpointWriteError (a UserError); orbax deletes old checkpoints only after a new one is
    complete, so the last good one is kept.
    Each save first checks that one checkpoint fits in the free space.
  * `check_disk_space` refuses to start a run whose checkpoints cannot fit.

Replicated arrays (the train state, replicated over the mesh) are written whole by one replica
(`_write_replicated_arrays_whole`), as orbax already does on GPUs.
"""

import errno
import functools
import logging as py_logging
import math
import os
import pathlib
import re
import shutil

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from flmiseg.data import io
from flmiseg.core.errors import CheckpointWriteError
from flmiseg.core.errors import UserError

# On-disk overhead of one checkpoint beyond the raw array bytes, measured with orbax 0.12.8:
# tree metadata and sharding JSON (about 0.7 KiB per array) plus the JSON records.
BYTES_PER_LEAF = 1024
BYTES_PER_CHECKPOINT = 64 * 1024
# metrics.jsonl, TensorBoard events, the training curve and eval/ outputs.
LOG_BYTES = 8 * 1024 * 1024
CHECKPOINTS = 'checkpoints'
LEGACY_BEST = 'checkpoints_best'  # the best checkpoint of runs written before; read only
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


def selection_score(val_iou: float, val_ap: float | None = None) -> float:
  """The validation figure checkpoints are chosen by: the mean per-image IoU, or with an
  instance AP@0.5 (a model with an instance head validated on label images) the mean of the
  two. Both are in [0, 1] and weigh alike: IoU alone cannot see merged or split objects,
  which AP@0.5 counts, and AP@0.5 alone cannot see boundaries drawn too tight or too wide."""
  return val_iou if val_ap is None else (val_iou + val_ap) / 2


def best_metrics(step: int, val_iou: float | None, val_ap: float | None = None) -> dict:
  """The orbax metrics of a checkpoint that competes for the best (see `best_key`):
  'step', 'val_iou' and, with an instance AP@0.5, 'val_ap_0.5'."""
  metrics = {'step': step, 'val_iou': val_iou}
  if val_ap is not None:
    metrics['val_ap_0.5'] = val_ap
  return metrics


def best_key(metrics) -> tuple[float, float]:
  """The rank of a checkpoint by its metrics (or record): higher is better.

  A validated checkpoint ranks by its `selection_score` (its IoU, or the mean of its IoU and
  'val_ap_0.5' where it has one; metrics written before hold the IoU only), the earlier step
  first on ties (training counts a validation as better only when its score is higher); a
  NaN score ranks last. Without a validation split every checkpoint competes with val_iou
  None, and the latest is the best.
  """
  iou, step = metrics.get('val_iou'), metrics['step']
  if iou is None:
    return (-math.inf, step)
  score = selection_score(iou, metrics.get('val_ap_0.5'))
  return (-math.inf, -math.inf) if math.isnan(score) else (score, -step)


@functools.cache
def _write_replicated_arrays_whole() -> None:
  """Makes orbax write each replicated jax.Array from one replica, whole.

  Its default on CPUs ('replica-parallel') has each of the R replicas write 1/R of every
  array, which compiles a slicing program per array shape and device on every save: 80
  compilations and about 2 s per save of a small U-Net over 8 CPU devices, for arrays of a few
  MB where parallel writes gain nothing. On GPUs orbax already writes whole arrays. The jax.Array
  handler is the process's (orbax's global registry), registered once.
  """
  quiet = _DropMessages('overriding')  # orbax warns that a handler is replaced
  logging.get_absl_logger().addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
        override=True)
  finally:
    logging.get_absl_logger().removeFilter(quiet)


class _DropMessages(py_logging.Filter):
  """Drops log records whose message contains `text`."""

  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record) -> bool:
    return self.text not in record.getMessage()


class Checkpointer:
  """The checkpoints of one workdir: one orbax CheckpointManager in DIR/checkpoints (and, for a
  run written before, its DIR/checkpoints_best, read only)."""

  def __init__(self, workdir, max_to_keep: int = 2, read_only: bool = False):
    workdir = pathlib.Path(workdir).absolute()
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, best_fn=best_key)
    else:
      _write_replicated_arrays_whole()
      managers = ocp.checkpoint_managers
      options = ocp.CheckpointManagerOptions(
          create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True,
          best_fn=best_key,  # saves the metrics; `best_step` ranks by them
          preservation_policy=managers.AnyPreservationPolicy([
              managers.LatestN(n=max_to_keep),
              managers.BestN(get_metric_fn=best_key, n=1,
                             keep_checkpoints_without_metrics=False)]))
    self.manager = ocp.CheckpointManager(workdir / CHECKPOINTS, options=options)
    legacy = workdir / LEGACY_BEST
    self.legacy = ocp.CheckpointManager(legacy, options=ocp.CheckpointManagerOptions(
        read_only=True)) if legacy.is_dir() else None

  def save(self, step: int, state, data_state: dict, record: dict,
           metrics: dict | None) -> None:
    """Saves a checkpoint; `metrics` (`best_metrics`) when it competes for the best, else
    None. Orbax then deletes those its preservation policy no longer keeps."""
    manager = self.manager
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                 record=ocp.args.JsonSave(record))
    if shutil.disk_usage(manager.directory).free < checkpoint_bytes(*tree_bytes(state)):
      # Refuse before writing: a write failing half-way makes tensorstore print noise.
      raise _save_error(manager, step, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    quiet = _NoTraceback()
    logging.get_absl_logger().addFilter(quiet)
    try:
      manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
      manager.wait_until_finished()
    except OSError as e:
      raise _save_error(manager, step, e) from e
    except ValueError as e:  # tensorstore reports a failed write as ValueError.
      if 'os_error_code=' in str(e):
        raise _save_error(manager, step, e) from e
      raise
    finally:
      logging.get_absl_logger().removeFilter(quiet)

  def latest_step(self) -> int | None:
    """The step of the latest checkpoint (the one a rerun resumes from), or None."""
    return self.manager.latest_step()

  def best(self) -> tuple[ocp.CheckpointManager, int] | None:
    """(manager, step) of the best checkpoint, or None when no checkpoint competes yet.

    Orbax ranks those of DIR/checkpoints by their metrics; a run written before adds the one of
    DIR/checkpoints_best, ranked by its record.
    """
    candidates = []
    step = self.manager.best_step()
    if step is not None:
      candidates.append((best_key(self.manager.metrics(step)), step, self.manager))
    old = self.legacy.latest_step() if self.legacy is not None else None
    if old is not None:
      record = self.legacy.restore(old, args=ocp.args.Composite(
          record=ocp.args.JsonRestore())).record
      candidates.append((best_key(record), old, self.legacy))
    if not candidates:
      return None
    _, step, manager = max(candidates, key=lambda c: c[0])
    return manager, step

  def best_step(self) -> int | None:
    """The step of the best checkpoint (`best`), or None."""
    best = self.best()
    return None if best is None else best[1]

  def restore_last(self, abstract_state):
    """(state, data_state, record) of the latest checkpoint, or None if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        record=ocp.args.JsonRestore()))
    return restored.state, restored.data, restored.record

  def close(self) -> None:
    self.manager.close()
    if self.legacy is not None:
      self.legacy.close()


def restore_best_variables(workdir, target):
  """(variables, step) of the best checkpoint of `workdir`, or None when there is none.

  Only the subtrees of the saved train state that `target` names (`params` and
  `batch_stats`, as ShapeDtypeStructs with shardings) are read; the optimizer state is not.
  The checkpoint folders are opened read-only.
  """
  workdir = pathlib.Path(workdir).absolute()
  if not any((workdir / name).is_dir() for name in (CHECKPOINTS, LEGACY_BEST)):
    return None
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    best = ckpt.best()
    if best is None:
      return None
    manager, step = best
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)))
  finally:
    ckpt.close()
  return dict(restored.state), step


class _NoTraceback(py_logging.Filter):
  """Keeps orbax's error log lines during a save but drops their tracebacks: a failed save
  reaches the user as one UserError line (--debug shows the chained traceback)."""

  def filter(self, record):
    record.exc_info, record.exc_text = None, None
    return True


def _save_error(manager, step: int, error: Exception) -> UserError:
  """A one-line UserError for a failed save. Its unfinished folder is left to orbax, which
  removes it before the next training's first save (tensorstore's other writes of the failed
  save may still be landing in it now); `check_disk_space` counts it as free."""
  directory = pathlib.Path(manager.directory)
  kept = [s for s in manager.all_steps() if s != step]
  kept_text = (f'the last complete checkpoint (step {max(kept)}) is kept' if kept
               else 'no earlier checkpoint exists')
  reason = getattr(error, 'strerror', None)
  if not reason:  # tensorstore: "...: File too large [os_error_code='27']"
    found = re.search(r"\[os_error_code='(\d+)'\]", str(error))
    reason = os.strerror(int(found.group(1))) if found else ' '.join(str(error).split())[:200]
  return CheckpointWriteError(
      f'{directory}: cannot write the checkpoint of step {step} ({reason}); {kept_text}; free '
      'some space (or fix the permissions) and rerun the same command to resume')


def abstract(state):
  """ShapeDtypeStructs (with shardings) of a state pytree, as a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def tree_bytes(tree) -> tuple[int, int]:
  """(total bytes, number of arrays) of a pytree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  total = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
  return total, len(leaves)


def checkpoint_bytes(state_bytes: int, num_arrays: int) -> int:
  """Disk bytes of one checkpoint of a state of `num_arrays` arrays, `state_bytes` in all."""
  return state_bytes + num_arrays * BYTES_PER_LEAF + BYTES_PER_CHECKPOINT


def estimate_disk_bytes(state_bytes: int, num_arrays: int, max_to_keep: int,
                        existing: int = 0) -> int:
  """Disk bytes a run still needs for its checkpoints and logs, at the peak.

  At the peak DIR/checkpoints holds the `max_to_keep` latest checkpoints, the best one (when
  it is older than those) and one being written (orbax deletes old ones only after the new
  one is complete); the `existing` checkpoints of a resumed run already take their share.
  """
  one = checkpoint_bytes(state_bytes, num_arrays)
  return max(max_to_keep + 2 - existing, 0) * one + LOG_BYTES


def _folder_bytes(folder: pathlib.Path) -> int:
  total = 0
  for path in folder.rglob('*'):
    try:
      total += path.stat().st_size if path.is_file() else 0
    except OSError:  # removed while we looked
      pass
  return total


def check_disk_space(workdir, state, max_to_keep: int) -> int:
  """Raises UserError before training when the checkpoints of the run cannot fit.

  The unfinished folders of a save cut short (orbax removes them before the first save) count
  as free space. Returns the estimated bytes needed.
  """
  folder = pathlib.Path(workdir) / CHECKPOINTS
  names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
  existing = sum(1 for name in names if name.isdigit())
  reclaimable = sum(_folder_bytes(folder / name) for name in names
                    if name.endswith(_TMP_SUFFIX))
  needed = estimate_disk_bytes(*tree_bytes(state), max_to_keep, existing)
  io.check_free_space(workdir, needed - reclaimable, 'the checkpoints and logs of this run')
  return needed
