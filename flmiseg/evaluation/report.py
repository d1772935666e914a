"""The test-set report: the files of DIR/eval/ and the console table.

Files (each written whole by `files.write_atomic`, by process 0 only):
  summary.json    every metric, mean per image and pooled, at config.eval.threshold and under
                  'calibrated' at the calibrated threshold (flmiseg/evaluation/calibration.py);
  per_image.csv   one row per test image, at config.eval.threshold;
  report.md       the summary as a Markdown table;
  worst_best.png  the test images with the lowest and highest IoU, with their errors
                  (`Extremes` keeps them while the evaluation runs).
`format_table` is the text table that `python -m flmiseg.main` prints.
"""

import csv
import heapq
import io
import math
import pathlib

import numpy as np

from flmiseg.core import files
from flmiseg.objects import matching
from flmiseg.evaluation import metrics
from flmiseg.data import dataset

SUMMARY_KEYS = ('iou', 'f1', 'dice', 'accuracy', 'precision', 'recall', 'auc')
# The worst_best.png layout: one row of this height per image, plus a header for the legend.
FIGURE_DPI = 100
ROW_INCHES = 3.0
HEADER_INCHES = 0.8
# Overlay colours (RGB): green, magenta and cyan stay distinct for red-green colour blindness.
OVERLAY_COLOURS = {'true positive': (0.1, 0.85, 0.1), 'false positive': (0.95, 0.1, 0.95),
                   'false negative': (0.1, 0.8, 0.95)}


class Extremes:
  """The k lowest- and k highest-IoU images seen so far, with their packed binary prediction
  and ground truth (1 bit per pixel each, never the probabilities), so memory stays bounded
  for any test set and worst_best.png reads no mask again."""

  def __init__(self, k: int):
    self.k = k
    self.low, self.high = [], []  # heaps of (-iou, -index) and of (iou, index)
    self.masks = {}  # index -> (np.packbits of the prediction, of the truth, their shape)

  def add(self, index: int, iou: float, pred: np.ndarray, truth: np.ndarray) -> None:
    """Offers image `index`: its IoU, prediction and ground truth ((H, W) bool each)."""
    self.masks[index] = (np.packbits(pred), np.packbits(truth), pred.shape)
    heapq.heappush(self.low, (-iou, -index))
    heapq.heappush(self.high, (iou, index))
    dropped = [-heapq.heappop(self.low)[1]] if len(self.low) > self.k else []
    dropped += [heapq.heappop(self.high)[1]] if len(self.high) > self.k else []
    kept = {-i for _, i in self.low} | {i for _, i in self.high}
    for i in set(dropped) - kept:
      del self.masks[i]

  def selection(self) -> list[tuple[str, int, float, np.ndarray, np.ndarray]]:
    """[(label, index, iou, pred, truth (H, W) bool)]: worst first, then best; each image
    once."""
    worst = sorted((-v, -i) for v, i in self.low)
    shown = {i for _, i in worst}
    best = [(v, i) for v, i in sorted(self.high, reverse=True) if i not in shown]
    out = []
    for kind, entries in (('worst', worst), ('best', best)):
      for rank, (iou, i) in enumerate(entries, 1):
        packed_pred, packed_truth, shape = self.masks[i]
        pred, truth = (np.unpackbits(p, count=math.prod(shape)).reshape(shape).astype(bool)
                       for p in (packed_pred, packed_truth))
        out.append((f'{kind} {rank}', i, iou, pred, truth))
    return out


def write_files(out_dir, rows: list[dict], summary: dict, calibration: dict | None, source,
                selection, threshold: float) -> None:
  """Every file of DIR/eval/ into `out_dir`: `write_report`, report.md (`markdown_report`)
  and worst_best.png (`write_worst_best` of `selection`, predictions at `threshold`)."""
  out_dir = pathlib.Path(out_dir)
  write_report(rows, summary, out_dir)
  files.write_text_atomic(out_dir / 'report.md', markdown_report(summary, calibration))
  write_worst_best(source, selection, threshold, out_dir / 'worst_best.png')


def write_report(rows: list[dict], summary: dict, out_dir) -> None:
  """DIR/eval/summary.json and per_image.csv (each written whole: `files.write_atomic`)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  files.write_json_atomic(out_dir / 'summary.json', summary)
  fields = ['name'] + [k for k in rows[0] if k != 'name'] if rows else ['name']
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  files.write_atomic(out_dir / 'per_image.csv',
                     lambda tmp: tmp.write_text(table.getvalue(), newline=''))


def _cell(summary: dict | None, key: str) -> str:
  value = None if summary is None else summary.get(key)
  if value is None:
    return ''
  return 'n/a' if math.isnan(value) else f'{value:.4f}'


def _threshold_lines(summary: dict, calibration: dict | None) -> list[str]:
  """report.md's bullet lines: the test set, the fixed and the calibrated threshold."""
  tuned = summary.get('calibrated')
  t = summary['threshold']
  lines = [f'- Test images: {summary.get("num_images", "?")}; best checkpoint: step '
           f'{summary.get("checkpoint_step", "?")}.',
           f'- Fixed threshold: {t:g} (config.eval.threshold; the paper\'s is 0.5).']
  if tuned is not None:
    source = ''
    if calibration is not None:
      source = (f', chosen on {calibration["num_val_images"]} validation images by mean '
                f'per-image {calibration["metric"]} ({calibration["val_score"]:.4f} there; '
                f'{calibration["val_score_at_default"]:.4f} at {t:g})')
    lines.append(f'- Calibrated threshold: {tuned["threshold"]:g}{source}.')
  else:
    lines.append('- Calibrated threshold: none (config.eval.calibrate_metric is \'\', or no '
                 'validation split).')
  return lines


def markdown_report(summary: dict, calibration: dict | None = None) -> str:
  """DIR/eval/report.md: every metric of `summary`, mean and pooled, fixed and calibrated."""
  tuned = summary.get('calibrated')
  t = summary['threshold']
  lines = ['# Test-set evaluation', ''] + _threshold_lines(summary, calibration)
  lines += ['', '"Mean" averages each image\'s own score, so every image weighs the same; '
            '"pooled" adds the tp/fp/fn/tn counts of all test images first and scores them '
            'as one big image, so large and crowded images weigh more. AUC does not depend on '
            'the threshold; hd and hd95 are in pixels and the Betti errors are counts (lower '
            'is better for those).', '']
  header = ['metric', f'mean (t={t:g})', f'pooled (t={t:g})']
  if tuned is not None:
    header += [f'mean (t={tuned["threshold"]:g})', f'pooled (t={tuned["threshold"]:g})']
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name in metrics.METRIC_NAMES:
    if name not in summary:
      continue
    cells = [name, _cell(summary, name), _cell(summary, f'pooled_{name}')]
    if tuned is not None:
      cells += [_cell(tuned, name), _cell(tuned, f'pooled_{name}')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  found = summary.get('instances')
  if found:
    lines += ['', '## Instances', '',
              f'Objects found by {found["method"].replace("_", " ")} at threshold '
              f'{found["threshold"]:g}, matched one-to-one to the true objects (label images) '
              'as StarDist does: a match needs IoU >= the threshold of the column; ap = '
              'TP / (TP + FP + FN), counted over all test images; pq: panoptic quality at '
              '0.5.', '', '| metric | value |', '|---|---|']
    lines += [f'| {k} | {found[k]:.4f} |' for k in matching.SUMMARY_KEYS]
  return '\n'.join(lines) + '\n'


def _display(image: np.ndarray) -> np.ndarray:
  """An image scaled to [0, 1] by its 1st and 99th percentiles (robust to hot pixels)."""
  lo, hi = np.percentile(image, [1, 99])
  return np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def write_worst_best(source, selection, threshold: float, path) -> int:
  """Draws `Extremes.selection()` rows (image | coloured errors) into `path`; returns rows.

  Reads each shown image from `source`'s cache; the prediction and truth come with the
  selection.
  """
  # matplotlib is imported here: only a report draws, and predict never does.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  rows = max(len(selection), 1)
  height = ROW_INCHES * rows + HEADER_INCHES
  fig = figure.Figure(figsize=(8, height), dpi=FIGURE_DPI)
  grid = fig.add_gridspec(rows, 2, top=1 - HEADER_INCHES / height, bottom=0.01,
                          left=0.02, right=0.98, hspace=0.15, wspace=0.05)
  for row, (label, i, iou, pred, truth) in enumerate(selection):
    gray = _display(np.squeeze(dataset.load_array(source.files[i][0])).astype(np.float64))
    overlay = np.repeat(gray[..., None] * 0.6, 3, axis=-1)
    for mask, name in ((pred & truth, 'true positive'), (pred & ~truth, 'false positive'),
                       (~pred & truth, 'false negative')):  # blended: the texture shows
      overlay[mask] = 0.3 * gray[mask, None] + 0.7 * np.asarray(OVERLAY_COLOURS[name])
    for col, (picture, title) in enumerate(((gray, f'{label}: {source.names[i]}'),
                                            (overlay, f'{source.names[i]}: IoU {iou:.3f}'))):
      ax = fig.add_subplot(grid[row, col])
      ax.imshow(picture, cmap='gray' if picture.ndim == 2 else None, vmin=0, vmax=1,
                interpolation='nearest')
      ax.set_title(title, fontsize=9)
      ax.set_axis_off()
  fig.suptitle(f'Worst and best test images by IoU (threshold {threshold:g})',
               y=1 - 0.05 / height, va='top', fontsize=10)
  handles = [patches.Patch(color=c, label=n) for n, c in OVERLAY_COLOURS.items()]
  fig.legend(handles=handles, loc='upper center', bbox_to_anchor=(0.5, 1 - 0.28 / height),
             ncol=3, fontsize=8, frameon=False)
  files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=FIGURE_DPI, format='png'))
  return len(selection)


def format_table(summary: dict) -> str:
  """A text table of the reference's summary metrics; with a calibration, a third column."""
  tuned = summary.get('calibrated')
  value = f'value (t={summary["threshold"]:g})' if 'threshold' in summary else 'value'
  header = f'{"metric":<12}{value:>16}'
  if tuned is not None:
    header += f'{"calibrated (t=" + format(tuned["threshold"], "g") + ")":>22}'
  lines = [header, '-' * len(header)]
  for key in SUMMARY_KEYS:
    if key in summary:
      line = f'{key:<12}{summary[key]:>16.4f}'
      if tuned is not None:
        line += f'{tuned[key]:>22.4f}'
      lines.append(line)
  found = summary.get('instances')
  if found:
    for key in ('ap_0.5', 'ap_0.75', 'mean_ap', 'pq'):
      lines.append(f'{"inst " + key:<12}{found[key]:>16.4f}')
  return '\n'.join(lines)
