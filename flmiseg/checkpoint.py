"""Checkpoints with orbax: the latest few in DIR/checkpoints, the best one (by validation IoU)
in DIR/checkpoints_best.

Each checkpoint holds the train state, the data iterator state (so a resumed run sees exactly
the batches an uninterrupted run would) and a small JSON record (step, validation IoU,
calibrated threshold). Orbax writes into a temporary folder and renames it when complete, so a
checkpoint interrupted half-way never becomes the latest. Nothing is pickled: arrays go to
tensorstore, the rest to JSON.
"""

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """The 'last' and 'best' checkpoint managers of one workdir."""

  def __init__(self, workdir, max_to_keep: int = 2):
    workdir = pathlib.Path(workdir).absolute()
    options = dict(create=True, enable_async_checkpointing=False)
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
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()

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


def abstract(state):
  """ShapeDtypeStructs (with shardings) of a state pytree, as a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
