"""Evaluation over a prepared source: validation IoU during training, threshold calibration on
the validation split, and the full report on the test set.

Images are batched in order and the last batch padded with masked entries, so every image
counts exactly once whatever the batch size; each image's padding pixels are excluded, and so
are the pixels a sparse mask leaves unlabelled (config.data.ignore_value): from the counts,
the calibration, every host-side metric and the errors drawn in worst_best.png.
The per-image metrics are those the reference reports (IoU, F1, Dice, accuracy, precision,
recall, AUC at threshold 0.5), plus the rest of `flmiseg.metrics`.

Threshold calibration: after training, the best checkpoint's probabilities on the validation
split (never the test set) give, per image, exact tp/fp/fn/tn at every threshold of a fixed
grid (0.01 to 0.99 by 0.01, plus config.eval.threshold) from one sorted pass over its pixels;
the threshold with the highest mean per-image `config.eval.calibrate_metric` is kept in
DIR/calibration.json (ties: the one nearest config.eval.threshold).

Files written by a test evaluation, in DIR/eval/: summary.json (every metric, mean per image
and pooled, at config.eval.threshold and under 'calibrated' at the calibrated threshold),
per_image.csv (at config.eval.threshold), report.md (the same as a Markdown table) and
worst_best.png (the test images with the lowest and highest IoU, with their errors). Each is
written whole (a temporary file renamed over it), by process 0 only; on several processes the
host-side metrics and the calibration are computed once, on process 0, and shared.
"""

import csv
import heapq
import io
import json
import math
import os
import pathlib
from typing import Callable

from absl import logging
import jax
from matplotlib import figure
from matplotlib import patches
import numpy as np

from flmiseg import inference
from flmiseg import instances
from flmiseg import matching
from flmiseg import metrics
from flmiseg import sharding
from flmiseg.data import dataset
from flmiseg.data import pipeline
from flmiseg.errors import UserError

SUMMARY_KEYS = ('iou', 'f1', 'dice', 'accuracy', 'precision', 'recall', 'auc')
CALIBRATION_FILE = 'calibration.json'
# The worst_best.png layout: one row of this height per image, plus a header for the legend.
FIGURE_DPI = 100
ROW_INCHES = 3.0
HEADER_INCHES = 0.8
# Overlay colours (RGB): green, magenta and cyan stay distinct for red-green colour blindness.
OVERLAY_COLOURS = {'true positive': (0.1, 0.85, 0.1), 'false positive': (0.95, 0.1, 0.95),
                   'false negative': (0.1, 0.8, 0.95)}


def predictions(predict, state, source, mesh, batch_size: int, with_probs: bool = True):
  """Yields (index, outputs (h, w, C) or None, counts dict) per image of `source`, in order.

  outputs[..., 0] is the foreground probability; a model with an instance head adds
  outputs[..., 1], its predicted normalised distance.
  """
  # Any batch size works on any number of devices: round up, the padding is masked.
  batch_size = inference.round_up_batch(batch_size, jax.device_count())
  for batch in pipeline.eval_batches(source, global_batch=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    present = batch.pop('present')
    index = batch.pop('index')
    probs, counts = predict(state, sharding.global_batch(batch, mesh))
    counts = sharding.to_host(counts)
    probs = sharding.to_host(probs) if with_probs else None
    if jax.process_count() > 1:
      present = sharding.to_host(sharding.global_batch({'p': present}, mesh))['p']
      index = sharding.to_host(sharding.global_batch({'i': index}, mesh))['i']
    for j in np.flatnonzero(present):
      i = int(index[j])
      h, w = source.shapes[i]
      prob = probs[j, :h, :w] if with_probs else None
      yield i, prob, {k: int(v[j]) for k, v in counts.items()}


def validation_iou(predict, state, source, mesh, batch_size: int) -> float:
  """Mean per-image IoU over `source` at the predict step's threshold."""
  rows = [c for _, _, c in predictions(predict, state, source, mesh, batch_size, False)]
  counts = {k: np.array([r[k] for r in rows]) for k in ('tp', 'fp', 'fn', 'tn')}
  return float(np.mean(metrics.overlap_metrics(**counts)['iou']))


# ------------------------------------------------------------------ threshold calibration

def check_calibrate_metric(name: str) -> None:
  """Raises ValueError unless `name` is '' (off) or a per-image overlap metric."""
  if name and name not in metrics.OVERLAP_NAMES:
    raise ValueError(f'config.eval.calibrate_metric={name!r} is not a per-image overlap '
                     f'metric; valid: {", ".join(metrics.OVERLAP_NAMES)}, or \'\' to keep '
                     'config.eval.threshold')


def threshold_grid(default_threshold: float) -> np.ndarray:
  """Ascending float64 thresholds 0.01, 0.02, ..., 0.99 plus `default_threshold` exactly."""
  return np.unique(np.append(np.arange(1, 100) / 100, float(default_threshold)))


def threshold_counts(prob: np.ndarray, target: np.ndarray,
                     grid: np.ndarray) -> dict[str, np.ndarray]:
  """Exact confusion counts of one image at every threshold of `grid`.

  Args:
    prob: (H, W) or (H, W, 1) foreground probabilities; only real pixels (no padding).
    target: same size, ground truth in {0, 1}.
    grid: (G,) ascending thresholds.

  Returns:
    {'tp', 'fp', 'fn', 'tn'}: int64 arrays of shape (G,); entry k equals
    `metrics.image_metrics(prob, target, threshold=float(grid[k]))`'s counts (a pixel is
    foreground when prob > threshold, compared in prob's float dtype as NumPy and JAX do
    for a Python float threshold).
  """
  prob = np.asarray(prob).ravel()
  truth = np.asarray(target).ravel() > 0.5
  if prob.shape != truth.shape:
    raise ValueError(f'prob has {prob.size} pixels, target {truth.size}')
  dtype = prob.dtype if np.issubdtype(prob.dtype, np.floating) else np.float64
  edges = np.asarray(grid, np.float64).astype(dtype)
  size = len(edges)

  def above(values):  # (G,): how many values exceed each threshold
    # Each value's bin is the number of thresholds strictly below it: v > edges[k] iff k < bin.
    bins = np.searchsorted(edges, values.astype(dtype, copy=False), side='left')
    return len(values) - np.cumsum(np.bincount(bins, minlength=size + 1))[:size]

  tp, fp = above(prob[truth]), above(prob[~truth])
  return {'tp': tp, 'fp': fp, 'fn': int(truth.sum()) - tp, 'tn': int((~truth).sum()) - fp}


def best_threshold_index(scores: np.ndarray, grid: np.ndarray, prefer: float) -> int:
  """argmax of `scores` over `grid`; among (float-rounding) ties, the threshold nearest
  `prefer` (the lower one if two are equally near)."""
  scores = np.asarray(scores, np.float64)
  ties = np.flatnonzero(scores >= np.max(scores) - 1e-12)
  return int(ties[np.argmin(np.abs(np.asarray(grid)[ties] - prefer))])


def calibrate(images, metric: str, default_threshold: float) -> dict:
  """Picks the threshold with the best mean per-image `metric` over `images`.

  Args:
    images: iterable of (prob (H, W), target (H, W)) pairs, the real pixels of each image.
    metric: a name in `metrics.OVERLAP_NAMES`.
    default_threshold: always on the grid; ties go to the threshold nearest it.

  Returns:
    {'threshold', 'metric', 'val_score', 'val_score_at_default', 'default_threshold',
    'num_val_images'}.
  """
  check_calibrate_metric(metric)
  grid = threshold_grid(default_threshold)
  per_image = [threshold_counts(prob, target, grid) for prob, target in images]
  if not per_image:
    raise ValueError('calibration needs at least one image')
  counts = {k: np.stack([c[k] for c in per_image]) for k in metrics.COUNT_NAMES}  # (N, G)
  scores = np.mean(metrics.overlap_metrics(**counts)[metric], axis=0)
  best = best_threshold_index(scores, grid, default_threshold)
  default = int(np.flatnonzero(grid == float(default_threshold))[0])
  return {'threshold': float(grid[best]), 'metric': metric, 'val_score': float(scores[best]),
          'val_score_at_default': float(scores[default]),
          'default_threshold': float(default_threshold), 'num_val_images': len(per_image)}


def _labelled(source, index: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(mask (H, W) in {0, 1}, valid (H, W) bool or None) of image `index` of `source`.

  valid is False on the pixels the mask leaves unlabelled (config.data.ignore_value), None
  when it has none (every pixel counts, as before sparse labels existed).
  """
  valid_map = getattr(source, 'valid_map', None)  # sources without ignored pixels lack it
  return dataset.load_array(source.files[index][1]), (valid_map(index) if valid_map else None)


def _labelled_pixels(prob: np.ndarray, source, index: int) -> tuple[np.ndarray, np.ndarray]:
  """(prob, target) of image `index`, restricted to its labelled pixels (1-D if some are
  unlabelled), for `calibrate`."""
  target, valid = _labelled(source, index)
  return (prob, target) if valid is None else (prob[valid], target[valid])


def calibrate_source(predict, state, source, mesh, batch_size: int, metric: str,
                     default_threshold: float) -> dict:
  """`calibrate` over the model's probabilities on every image of `source` (labelled pixels
  only)."""
  outputs = predictions(predict, state, source, mesh, batch_size)
  if not is_primary():  # process 0 calibrates, and shares the result
    drain(outputs)
    return sharding.from_primary(None)
  images = (_labelled_pixels(prob[..., 0], source, i) for i, prob, _ in outputs)
  return sharding.from_primary(calibrate(images, metric, default_threshold))


def is_primary() -> bool:
  """Whether this is process 0, which alone computes the host-side metrics and writes files."""
  return jax.process_index() == 0


def drain(outputs) -> None:
  """Runs a `predictions` loop without the host-side work: on processes other than 0, which
  must take part in its collectives."""
  for _ in outputs:
    pass


def write_atomic(path, write: Callable[[pathlib.Path], None],
                 failure: str | None = None) -> None:
  """Calls write(temporary path) and renames the file to `path` (os.replace), so readers see
  the old file or the whole new one, never half of it.

  The temporary name is per process: hosts sharing a workdir may write concurrently. A failed
  write leaves `path` as it was and raises a UserError `<failure> (<reason>)`, by default
  `<path>: cannot write it`.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.{jax.process_index()}.tmp')
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise UserError(f'{failure or f"{path}: cannot write it"} ({e.strerror})') from e


def write_text_atomic(path, text: str, failure: str | None = None) -> None:
  """`text` into `path` (`write_atomic`)."""
  write_atomic(path, lambda tmp: tmp.write_text(text), failure)


def write_json_atomic(path, obj, failure: str | None = None) -> None:
  """`obj` as JSON into `path` (`write_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n', failure)


def read_calibration(workdir) -> dict | None:
  """DIR/calibration.json as a dict, or None when missing or unreadable."""
  path = pathlib.Path(workdir) / CALIBRATION_FILE
  try:
    stored = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning('Ignoring %s: unreadable (%s)', path, e)
    return None
  if not isinstance(stored, dict) or not isinstance(stored.get('threshold'), (int, float)):
    logging.warning('Ignoring %s: no threshold in it', path)
    return None
  return stored


def calibrated_dynamic(workdir, best_step: int) -> float | None:
  """The instance seeds' dynamic calibrated for the best checkpoint, or None."""
  stored = read_calibration(workdir)
  if stored is None or stored.get('checkpoint_step') != best_step:
    return None
  value = stored.get('seed_dynamic')
  return float(value) if isinstance(value, (int, float)) else None


def calibrated_threshold(workdir, best_step: int) -> float | None:
  """The threshold calibrated for the best checkpoint of `workdir` (step `best_step`), or
  None when there is none (no calibration.json, or one made for another checkpoint)."""
  stored = read_calibration(workdir)
  if stored is None or stored.get('checkpoint_step') != best_step:
    return None
  return float(stored['threshold'])


# ------------------------------------------------------------------ test-set evaluation

class _Extremes:
  """The k lowest- and k highest-IoU images seen so far, with packed binary predictions
  (1 bit per pixel, never the probabilities), so memory stays bounded for any test set."""

  def __init__(self, k: int):
    self.k = k
    self.low, self.high = [], []  # heaps of (-iou, -index) and of (iou, index)
    self.masks = {}  # index -> (np.packbits of the prediction, its shape)

  def add(self, index: int, iou: float, pred: np.ndarray) -> None:
    self.masks[index] = (np.packbits(pred), pred.shape)
    heapq.heappush(self.low, (-iou, -index))
    heapq.heappush(self.high, (iou, index))
    dropped = [-heapq.heappop(self.low)[1]] if len(self.low) > self.k else []
    dropped += [heapq.heappop(self.high)[1]] if len(self.high) > self.k else []
    kept = {-i for _, i in self.low} | {i for _, i in self.high}
    for i in set(dropped) - kept:
      del self.masks[i]

  def selection(self) -> list[tuple[str, int, float, np.ndarray]]:
    """[(label, index, iou, pred (H, W) bool)]: worst first, then best; each image once."""
    worst = sorted((-v, -i) for v, i in self.low)
    shown = {i for _, i in worst}
    best = [(v, i) for v, i in sorted(self.high, reverse=True) if i not in shown]
    out = []
    for kind, entries in (('worst', worst), ('best', best)):
      for rank, (iou, i) in enumerate(entries, 1):
        packed, shape = self.masks[i]
        pred = np.unpackbits(packed, count=math.prod(shape)).reshape(shape).astype(bool)
        out.append((f'{kind} {rank}', i, iou, pred))
    return out


def predicted_instances(outputs: np.ndarray, threshold: float, dynamic: float,
                        min_size: int) -> np.ndarray:
  """uint16 instance labels of one image's outputs (h, w, C): split by the instance head's
  distance where the model has one (C > 1), else connected components of the mask."""
  mask = outputs[..., 0] > threshold
  if outputs.shape[-1] > 1:
    return instances.from_distance(mask, outputs[..., 1], dynamic, min_size)
  return instances.connected_components(mask, min_size)


def calibrate_dynamic(predict, state, source, mesh, batch_size: int, threshold: float,
                      min_size: int, default: float) -> dict:
  """The seeds' h-maxima dynamic (instances.from_distance) that gives the best pooled
  instance AP at IoU 0.5 on `source` (the validation split, label images) at `threshold`.

  Tries instances.DYNAMIC_GRID (plus `default`); ties go to the value nearest `default`.
  Returns {'seed_dynamic', 'seed_dynamic_ap_0.5': {value: ap}}.
  """
  grid = sorted(set(instances.DYNAMIC_GRID) | {float(default)})
  found = {h: [] for h in grid}
  images = predictions(predict, state, source, mesh, batch_size)
  if not is_primary():  # process 0 matches the instances, and shares the result
    drain(images)
    return sharding.from_primary(None)
  for i, outputs, _ in images:
    truth, valid = source.label_image(i), _labelled(source, i)[1]
    for h in grid:
      found[h].append(matching.match(
          truth, predicted_instances(outputs, threshold, h, min_size), (0.5,), valid=valid))
  scores = {h: matching.combine(rows)[0]['ap'] if rows else 0.0 for h, rows in found.items()}
  best = max(grid, key=lambda h: (scores[h], -abs(h - default)))
  return sharding.from_primary(
      {'seed_dynamic': best, 'seed_dynamic_ap_0.5': {f'{h:g}': scores[h] for h in grid}})


def evaluate(predict, state, source, mesh, batch_size: int, threshold: float,
             out_dir=None, extra: dict | None = None, calibration: dict | None = None,
             num_extremes: int = 3, dynamic: float = instances.SEED_DYNAMIC,
             min_size: int = 0) -> dict:
  """Every metric per image and over the set; writes the report files into `out_dir`.

  With several processes, process 0 alone computes the metrics on the host and writes the
  files (each whole: `write_atomic`); every process returns its summary.

  Args:
    threshold: the fixed threshold (config.eval.threshold) of the main summary.
    out_dir: where summary.json, per_image.csv, report.md and worst_best.png go (None: none).
    extra: entries added to the summary (e.g. the checkpoint's step).
    calibration: a `calibrate` result; its threshold gives summary['calibrated'].
    num_extremes: how many worst and best images worst_best.png shows.
    dynamic, min_size: instance post-processing (`predicted_instances`).

  Returns:
    The summary: `metrics.summarize` at `threshold`, 'num_images', 'threshold', `extra`, and
    with a calibration 'calibrated': {'threshold', 'metric', and the same metrics}. When some
    test mask is a label image, 'instances': `matching.summary` of the predicted instances
    (at the calibrated threshold if any) against the true ones over the whole set, with the
    method ('distance' or 'connected_components') and threshold; the per-image rows then get
    the same scores of their own image.
  """
  tuned = None if calibration is None else float(calibration['threshold'])
  shown_at = threshold if tuned is None else tuned
  rows, tuned_rows, extremes, matches = [], [], _Extremes(num_extremes), []
  with_instances = getattr(source, 'has_labels', False)
  channels = 1
  if not is_primary():  # process 0 computes the metrics and writes the files
    drain(predictions(predict, state, source, mesh, batch_size))
    return sharding.from_primary(None)
  for i, outputs, _ in predictions(predict, state, source, mesh, batch_size):
    prob, channels = outputs[..., 0], outputs.shape[-1]
    target, valid = _labelled(source, i)
    row = metrics.image_metrics(prob, target, threshold=threshold, valid=valid)
    rows.append({'name': source.names[i], **row})
    if tuned is not None:
      tuned_rows.append(row if tuned == threshold else
                        metrics.image_metrics(prob, target, threshold=tuned, valid=valid))
    if with_instances:
      found = predicted_instances(outputs, shown_at, dynamic, min_size)
      matches.append(matching.match(source.label_image(i), found, valid=valid))
      rows[-1].update(matching.summary(matches[-1]))
      rows[-1].update(num_true=matches[-1][0]['n_true'], num_found=matches[-1][0]['n_pred'])
    # Unlabelled pixels are neither right nor wrong: the figure draws no error there.
    pred = prob > shown_at if valid is None else (prob > shown_at) & valid
    extremes.add(i, (row if tuned is None else tuned_rows[-1])['iou'], pred)
  summary = metrics.summarize(rows)
  summary['num_images'] = len(rows)
  summary['threshold'] = threshold
  summary.update(extra or {})
  if tuned is not None:
    summary['calibrated'] = {'threshold': tuned, 'metric': calibration['metric'],
                             **metrics.summarize(tuned_rows)}
  if with_instances:
    method = 'distance' if channels > 1 else 'connected_components'
    summary['instances'] = {**matching.summary(matching.combine(matches)),
                            'method': method, 'threshold': shown_at}
    if channels > 1:
      summary['instances']['seed_dynamic'] = dynamic
  if out_dir is not None:
    write_report(rows, summary, out_dir)
    write_text_atomic(pathlib.Path(out_dir) / 'report.md', markdown_report(summary, calibration))
    write_worst_best(source, extremes.selection(), shown_at,
                     pathlib.Path(out_dir) / 'worst_best.png')
  return sharding.from_primary(summary)


def write_report(rows: list[dict], summary: dict, out_dir) -> None:
  """DIR/eval/summary.json and per_image.csv (each written whole: `write_atomic`)."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(out_dir / 'summary.json', summary)
  fields = ['name'] + [k for k in rows[0] if k != 'name'] if rows else ['name']
  table = io.StringIO(newline='')
  writer = csv.DictWriter(table, fieldnames=fields)
  writer.writeheader()
  writer.writerows(rows)
  write_atomic(out_dir / 'per_image.csv',
               lambda tmp: tmp.write_text(table.getvalue(), newline=''))


def _cell(summary: dict | None, key: str) -> str:
  value = None if summary is None else summary.get(key)
  if value is None:
    return ''
  return 'n/a' if math.isnan(value) else f'{value:.4f}'


def markdown_report(summary: dict, calibration: dict | None = None) -> str:
  """DIR/eval/report.md: every metric of `summary`, mean and pooled, fixed and calibrated."""
  tuned = summary.get('calibrated')
  t = summary['threshold']
  lines = ['# Test-set evaluation', '',
           f'- Test images: {summary.get("num_images", "?")}; best checkpoint: step '
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
  """Draws `_Extremes.selection()` rows (image | coloured errors) into `path`; returns rows."""
  rows = max(len(selection), 1)
  height = ROW_INCHES * rows + HEADER_INCHES
  fig = figure.Figure(figsize=(8, height), dpi=FIGURE_DPI)
  grid = fig.add_gridspec(rows, 2, top=1 - HEADER_INCHES / height, bottom=0.01,
                          left=0.02, right=0.98, hspace=0.15, wspace=0.05)
  for row, (label, i, iou, pred) in enumerate(selection):
    gray = _display(np.squeeze(dataset.load_array(source.files[i][0])).astype(np.float64))
    truth = np.squeeze(dataset.load_array(source.files[i][1])) > 0.5
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
  write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=FIGURE_DPI, format='png'))
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
