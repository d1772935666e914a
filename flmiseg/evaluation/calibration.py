"""Calibration on the validation split (never the test set): the probability threshold and
the instance seeds' dynamic, kept in DIR/calibration.json for the best checkpoint.

Threshold: the best checkpoint's probabilities give, per image, exact tp/fp/fn/tn at every
threshold of a fixed grid (0.01 to 0.99 by 0.01, plus config.eval.threshold) from one sorted
pass over its labelled pixels; the threshold with the highest mean per-image
`config.eval.calibrate_metric` is kept (ties: the one nearest config.eval.threshold).

Seeds (models with an instance head, on label images): the h-maxima dynamic of
`instances.from_distance` with the best pooled instance AP at IoU 0.5, at the calibrated
threshold (`calibrate_dynamic`).

On several processes, process 0 alone computes the calibration and shares it.
"""

import numpy as np

from flmiseg.evaluation import evaluate
from flmiseg.core import files
from flmiseg.objects import instances
from flmiseg.objects import matching
from flmiseg.evaluation import metrics
from flmiseg.core import sharding
# calibration.json is read and written in flmiseg/store/settings.py; its functions are
# re-exported here for the callers of this module.
from flmiseg.store.settings import (  # noqa: F401 pylint: disable=unused-import
    CALIBRATION_FILE, calibrated_dynamic, calibrated_threshold, read_calibration,
    write_calibration)

# A fine-tuned run with fewer validation images keeps its source model's threshold
# (best_checkpoint.keep_source_calibration).
MIN_IMAGES_TO_RECALIBRATE = 10


def check_calibrate_metric(name: str) -> None:
  """Raises ValueError unless `name` is '' (off) or a per-image overlap metric (the rule of
  config.eval.calibrate_metric, flmiseg/train/config_checks.py)."""
  if not isinstance(name, str) or (name and name not in metrics.OVERLAP_NAMES):
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


def _labelled_pixels(prob: np.ndarray, source, index: int) -> tuple[np.ndarray, np.ndarray]:
  """(prob, target) of image `index`, restricted to its labelled pixels (1-D if some are
  unlabelled), for `calibrate`."""
  target, valid = evaluate.ground_truth(source, index)
  return (prob, target) if valid is None else (prob[valid], target[valid])


def calibrate_source(predict, state, source, mesh, batch_size: int, metric: str,
                     default_threshold: float) -> dict:
  """`calibrate` over the model's probabilities on every image of `source` (labelled pixels
  only)."""
  outputs = evaluate.predictions(predict, state, source, mesh, batch_size)
  if not files.is_primary():  # process 0 calibrates, and shares the result
    evaluate.drain(outputs)
    return sharding.from_primary(None)
  images = (_labelled_pixels(prob[..., 0], source, i) for i, prob, _ in outputs)
  return sharding.from_primary(calibrate(images, metric, default_threshold))


def calibrate_dynamic(predict, state, source, mesh, batch_size: int, threshold: float,
                      min_size: int, default: float) -> dict:
  """The seeds' h-maxima dynamic (instances.from_distance) that gives the best pooled
  instance AP at IoU 0.5 on `source` (the validation split, label images) at `threshold`.

  Tries instances.DYNAMIC_GRID (plus `default`); ties go to the value nearest `default`.
  Returns {'seed_dynamic', 'seed_dynamic_ap_0.5': {value: ap}}.
  """
  grid = sorted(set(instances.DYNAMIC_GRID) | {float(default)})
  found = {h: [] for h in grid}
  images = evaluate.predictions(predict, state, source, mesh, batch_size)
  if not files.is_primary():  # process 0 matches the instances, and shares the result
    evaluate.drain(images)
    return sharding.from_primary(None)
  for i, outputs, _ in images:
    truth, valid = source.label_image(i), evaluate.valid_map(source, i)
    for h in grid:
      found[h].append(matching.match(
          truth, instances.from_outputs(outputs, threshold, h, min_size), (0.5,),
          valid=valid))
  scores = {h: matching.combine(rows)[0]['ap'] if rows else 0.0 for h, rows in found.items()}
  best = max(grid, key=lambda h: (scores[h], -abs(h - default)))
  return sharding.from_primary(
      {'seed_dynamic': best, 'seed_dynamic_ap_0.5': {f'{h:g}': scores[h] for h in grid}})
