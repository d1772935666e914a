"""Checkpoints with orbax: the latest few in DIR/checkpoints, the best one (by validation IoU)
in DIR/checkpoints_best.

Each checkpoint holds the train state, the data iterator state (so a resumed run sees exactly
the batches an uninterrupted run would) and a small JSON record (step, validation IoU).
The threshold calibrated for the best checkpoint lives beside them in DIR/calibration.json.
Nothing is pickled: arrays go to tensorstore, the rest to JSON.

Crash safety (kill -9 at any moment, disk full):
  * orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so
    a half-written checkpoint never becomes the latest; leftover tmp folders are removed when
    the managers open (`cleanup_tmp_directories`).
  * A rerun may save a step that already exists (a kill between the best and the latest
    save of one step); the old copy is replaced instead of failing.
  * A save that fails for lack of space or permission stops the run with a
    CheckpointWriteError (a UserError); old checkpoints are only deleted after a new one is
    complete, so the last good one is kept.
    Each save first checks that one checkpoint fits in the free space.
  * `check_disk_space` refuses to start a run whose checkpoints cannot fit.
"""

import errno
import logging as py_logging
import os
import pathlib
import re
import shutil
import time

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from flmiseg.data import io
from flmiseg.errors import CheckpointWriteError
from flmiseg.errors import UserError

# On-disk overhead of one checkpoint beyond the raw array bytes, measured with orbax 0.12.8:
# tree metadata and sharding JSON (about 0.7 KiB per array) plus the JSON records.
BYTES_PER_LEAF = 1024
BYTES_PER_CHECKPOINT = 64 * 1024
# metrics.jsonl, TensorBoard events, the training curve and eval/ outputs.
LOG_BYTES = 8 * 1024 * 1024
_TMP_SUFFIX = '.orbax-checkpoint-tmp'


class Checkpointer:
  """The 'last' and 'best' checkpoint managers of one workdir."""

  def __init__(self, workdir, max_to_keep: int = 2):
    workdir = pathlib.Path(workdir).absolute()
    options = dict(create=True, enable_async_checkpointing=False,
                   cleanup_tmp_directories=True)
    self.last = ocp.CheckpointManager(
        workdir / 'checkpoints', options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, **options))
    self.best = ocp.CheckpointManager(
        workdir / 'checkpoints_best', options=ocp.CheckpointManagerOptions(
            max_to_keep=1, **options))

  @staticmethod
  def _save(manager, step: int, state, data_state: dict | None, record: dict) -> None:
    items = dict(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))
    if data_state is not None:
      items['data'] = ocp.args.JsonSave(data_state)
    if shutil.disk_usage(manager.directory).free < checkpoint_bytes(*tree_bytes(state)):
      # Refuse before writing: a write failing half-way makes tensorstore print noise.
      raise _save_error(manager, step, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    if step in manager.all_steps():
      _discard_step(manager, step)
    quiet = _NoTraceback()
    logging.get_absl_logger().addFilter(quiet)
    try:
      manager.save(step, args=ocp.args.Composite(**items), force=True)
      manager.wait_until_finished()
    except OSError as e:
      raise _save_error(manager, step, e) from e
    except ValueError as e:  # tensorstore reports a failed write as ValueError.
      if 'os_error_code=' in str(e):
        raise _save_error(manager, step, e) from e
      raise
    finally:
      logging.get_absl_logger().removeFilter(quiet)

  def save_last(self, step: int, state, data_state: dict | None, record: dict) -> None:
    self._save(self.last, step, state, data_state, record)

  def save_best(self, step: int, state, record: dict) -> None:
    self._save(self.best, step, state, None, record)

  @staticmethod
  def _restore(manager, abstract_state, step: int | None, with_data: bool):
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    items = dict(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore())
    if with_data:
      items['data'] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored.state, (restored.data if with_data else None), restored.record

  def restore_last(self, abstract_state):
    """(state, data_state, record) of the latest checkpoint, or None if there is none."""
    return self._restore(self.last, abstract_state, None, True)

  def restore_best(self, abstract_state):
    """(state, None, record) of the best checkpoint, or None if there is none."""
    return self._restore(self.best, abstract_state, None, False)

  def close(self) -> None:
    self.last.close()
    self.best.close()


def restore_best_variables(workdir, target):
  """(variables, step) of the best checkpoint of `workdir`, or None when there is none.

  Only the subtrees of the saved train state that `target` names (`params` and
  `batch_stats`, as ShapeDtypeStructs with shardings) are read; the optimizer state is not.
  The checkpoint folder is opened read-only.
  """
  folder = pathlib.Path(workdir).absolute() / 'checkpoints_best'
  if not folder.is_dir():
    return None
  manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step()
    if step is None:
      return None
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)))
  finally:
    manager.close()
  return dict(restored.state), step


def _discard_step(manager, step: int) -> None:
  """Atomically turns an existing step folder into an unfinished one, which orbax ignores.

  It was left by a run killed between the best and the latest save of one step; the rerun
  reaches that step again. A rename (not orbax's rmtree, which a kill can interrupt half-way)
  means the folder is either the complete old checkpoint or ignored, never a broken one; the
  next save (or manager) removes it.
  """
  directory = pathlib.Path(manager.directory)
  logging.info('Replacing the existing checkpoint of step %d in %s', step, directory)
  if ocp.multihost.is_primary_host(0):
    trash = directory / f'{step}{_TMP_SUFFIX}'
    shutil.rmtree(trash, ignore_errors=True)
    (directory / str(step)).rename(trash)
  ocp.multihost.sync_global_processes(f'flmiseg_discard_{directory.name}_{step}')
  manager.reload()


class _NoTraceback(py_logging.Filter):
  """Keeps orbax's error log lines during a save but drops their tracebacks: a failed save
  reaches the user as one UserError line (--debug shows the chained traceback)."""

  def filter(self, record):
    record.exc_info, record.exc_text = None, None
    return True


def _remove_unfinished(folder: pathlib.Path, settle_s: float = 1.0,
                       timeout_s: float = 30.0) -> None:
  """Removes the folder of a failed save once it stays removed for `settle_s`.

  After the first write fails, tensorstore's other writes of the same save are still in flight
  and recreate their parent folders as they land, so one rmtree can come too early (seen on a
  loaded 2-core CI machine). Orbax would also remove the folder when a manager next opens.
  """
  deadline = time.monotonic() + timeout_s
  absent_since = None
  while time.monotonic() < deadline:
    if folder.exists():
      shutil.rmtree(folder, ignore_errors=True)
      absent_since = None
    elif absent_since is None:
      absent_since = time.monotonic()
    elif time.monotonic() - absent_since >= settle_s:
      return
    time.sleep(0.05)
  logging.warning('Could not remove the unfinished checkpoint folder %s', folder)


def _save_error(manager, step: int, error: Exception) -> UserError:
  """A one-line UserError for a failed save, after removing its half-written folder."""
  directory = pathlib.Path(manager.directory)
  _remove_unfinished(directory / f'{step}{_TMP_SUFFIX}')
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

  At the peak there are `max_to_keep` latest checkpoints, one best and one being written
  (orbax deletes the oldest only after the new one is complete); the `existing` checkpoints
  of a resumed run already take their share.
  """
  one = checkpoint_bytes(state_bytes, num_arrays)
  return max(max_to_keep + 2 - existing, 0) * one + LOG_BYTES


def check_disk_space(workdir, state, max_to_keep: int) -> int:
  """Raises UserError before training when the checkpoints of the run cannot fit.

  Returns the estimated bytes needed.
  """
  workdir = pathlib.Path(workdir)
  existing = sum(1 for sub in ('checkpoints', 'checkpoints_best') if (workdir / sub).is_dir()
                 for p in (workdir / sub).iterdir() if p.name.isdigit())
  needed = estimate_disk_bytes(*tree_bytes(state), max_to_keep, existing)
  io.check_free_space(workdir, needed, 'the checkpoints and logs of this run')
  return needed
