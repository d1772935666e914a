"""Training logs: DIR/metrics.jsonl (one JSON line per logged step and per evaluation),
TensorBoard event files in DIR/tensorboard, and DIR/training_curve.png (loss and validation
IoU), drawn at an evaluation when the last drawing (or the logger's start) is at least
PLOT_EVERY_SECONDS old, and when the logger closes.
"""

import json
import os
import pathlib
import time

# Drawing the curve takes most of a second: runs that evaluate often (tiny or test runs) would
# spend more time drawing than training.
PLOT_EVERY_SECONDS = 30.0


def _drop_torn_tail(path: pathlib.Path) -> None:
  """Cuts a last line left unfinished by a crash (disk full, power loss): every line parses."""
  if not path.exists():
    return
  data = path.read_bytes()
  if data and not data.endswith(b'\n'):
    with open(path, 'r+b') as f:
      f.truncate(data.rfind(b'\n') + 1)


class MetricsLogger:
  """Appends scalars to metrics.jsonl and TensorBoard; draws the training curve."""

  def __init__(self, workdir, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    if enabled:
      _drop_torn_tail(self.workdir / 'metrics.jsonl')
    self._writer = None
    # time.monotonic() of the last drawing, or of the start: a run shorter than a period draws
    # its curve once, when the logger closes.
    self._drawn_at = time.monotonic()
    self._stale = False  # records were written since the last drawing
    if enabled:
      # Imported here, like matplotlib in plot(): a process that only predicts or evaluates
      # never pays the second it takes to import them.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(str(self.workdir / 'tensorboard'))

  def write(self, step: int, kind: str, scalars: dict) -> None:
    """Logs `scalars` at `step`; kind is 'train' or 'val' (the TensorBoard prefix)."""
    if not self.enabled:
      return
    record = {'step': int(step), 'kind': kind, **{k: float(v) for k, v in scalars.items()}}
    with open(self.workdir / 'metrics.jsonl', 'a') as f:
      f.write(json.dumps(record) + '\n')
    self._stale = True
    for name, value in scalars.items():
      self._writer.add_scalar(f'{kind}/{name}', float(value), int(step))
    self._writer.flush()

  def read(self) -> list[dict]:
    path = self.workdir / 'metrics.jsonl'
    if not path.exists():
      return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

  def plot(self, force: bool = False) -> None:
    """Redraws DIR/training_curve.png from metrics.jsonl when `force`, or when the last
    drawing (or the logger's start) is PLOT_EVERY_SECONDS old."""
    due = time.monotonic() - self._drawn_at >= PLOT_EVERY_SECONDS
    if not self.enabled or not (force or due):
      return
    self._drawn_at, self._stale = time.monotonic(), False
    records = self.read()
    train = [r for r in records if r['kind'] == 'train' and 'loss' in r]
    val = [r for r in records if r['kind'] == 'val' and 'iou' in r]
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    fig = figure.Figure(figsize=(7, 4))  # no pyplot: no global state, no GUI backend
    ax = fig.add_subplot()
    ax.plot([r['step'] for r in train], [r['loss'] for r in train], color='tab:blue')
    ax.set_xlabel('step')
    ax.set_ylabel('training loss', color='tab:blue')
    if val:
      ax2 = ax.twinx()
      ax2.plot([r['step'] for r in val], [r['iou'] for r in val], 'o-', color='tab:orange')
      ax2.set_ylabel('validation IoU', color='tab:orange')
      ax2.set_ylim(0, 1)
    ax.set_title('training curve')
    fig.tight_layout()
    path = self.workdir / 'training_curve.png'
    tmp = path.with_name(f'.{path.name}.tmp')  # renamed when whole: never seen half-drawn
    fig.savefig(tmp, dpi=100, format='png')
    os.replace(tmp, path)

  def close(self) -> None:
    """Draws the curve if records came since its last drawing; closes TensorBoard's file."""
    if self._stale:
      self.plot(force=True)
    if self._writer is not None:
      self._writer.close()
