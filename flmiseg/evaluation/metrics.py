"""Segmentation metrics: confusion counts on device, everything else per image on the host.

Layouts: batched arrays are NHWC with one channel, (N, H, W, 1); per-image arrays are (H, W).
A pixel is predicted foreground when its probability is strictly greater than the threshold
(the reference's `prob > threshold`). `valid` masks (1 = real pixel, 0 = padding) restrict
every metric to the real pixels; the shape metrics (Hausdorff, clDice, Betti) treat padding
as background.

Overlap metrics come from per-image counts tp, fp, fn, tn:
  iou = tp / (tp + fp + fn)             dice = f1 = 2 tp / (2 tp + fp + fn)
  precision = tp / (tp + fp)            recall = tp / (tp + fn)
  accuracy = (tp + tn) / all            specificity = tn / (tn + fp)
  iou_bg = tn / (tn + fp + fn)          miou = (iou + iou_bg) / 2
Empty-set convention (one rule for every ratio): a ratio whose denominator is 0 is 1.0 when
the prediction is perfect (fp + fn == 0) and 0.0 otherwise. So an empty prediction of an
empty ground truth scores 1.0 everywhere; an empty prediction of a non-empty ground truth
has precision 0 (and recall, IoU, Dice 0); a non-empty prediction of an empty ground truth
has recall 0. The reference's 1e-9 guards give 0 in the perfect-empty case instead.

AUC is the exact ROC area (Mann-Whitney U with average ranks for ties); it is NaN when the
image's valid pixels hold only one class, and `summarize` skips NaN (nanmean).

Hausdorff distances are measured between the BOUNDARIES of the two masks, as medpy's
`hd`/`hd95` do: a boundary pixel is a foreground pixel with a 4-neighbour in the background
(pixels on the image edge are boundary). Every boundary pixel of each mask gets its Euclidean
distance to the nearest boundary pixel of the other; the Hausdorff distance is the maximum of
both directions' distances together and hd95 their 95th percentile (pooled over both
directions, as medpy; MONAI instead takes the larger of the two directed percentiles; the
maximum is the same). `boundary=False` measures between the foreground sets instead, as the
reference (scipy's directed_hausdorff on foreground pixels) does. Both masks empty: 0. One
empty: the image diagonal hypot(H - 1, W - 1), the largest distance two pixels of the image
can have, so means stay finite and an empty prediction scores no better than any other.

Topology follows digital topology: foreground is 8-connected and background 4-connected.
b0 counts foreground components; b1 counts holes, background components that do not reach
the image edge. clDice (Shit et al. 2021) is the harmonic mean of the fraction of the
prediction's skeleton inside the ground truth and the fraction of the ground truth's skeleton
inside the prediction; both empty: 1.0, one empty: 0.0.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from skimage import morphology

COUNT_NAMES = ('tp', 'fp', 'fn', 'tn')
OVERLAP_NAMES = ('iou', 'dice', 'f1', 'precision', 'recall', 'accuracy', 'specificity',
                 'iou_bg', 'miou')
TOPOLOGY_NAMES = ('cldice', 'betti0_error', 'betti1_error')
METRIC_NAMES = OVERLAP_NAMES + ('auc', 'hd', 'hd95') + TOPOLOGY_NAMES

_FG_CONNECTIVITY = np.ones((3, 3), bool)  # 8-connected foreground.
_BG_CONNECTIVITY = ndimage.generate_binary_structure(2, 1)  # 4-connected background.


def confusion_counts(probs: jax.Array, targets: jax.Array, threshold: float = 0.5,
                     valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per-image confusion counts, jittable.

  Args:
    probs: (N, H, W, 1) foreground probabilities, any float dtype.
    targets: (N, H, W, 1) ground truth in {0, 1}.
    threshold: a pixel is predicted foreground when its probability is > threshold.
    valid: optional (N, H, W, 1) {0, 1}; pixels where it is 0 (padding) are not counted.

  Returns:
    {'tp', 'fp', 'fn', 'tn'}: int32 arrays of shape (N,), exact counts.
  """
  pred = probs > threshold
  truth = targets > 0.5
  keep = jnp.ones(truth.shape, bool) if valid is None else valid > 0.5
  axes = tuple(range(1, truth.ndim))

  def count(selected):
    return jnp.sum(selected & keep, axis=axes, dtype=jnp.int32)

  return {'tp': count(pred & truth), 'fp': count(pred & ~truth),
          'fn': count(~pred & truth), 'tn': count(~pred & ~truth)}


def _ratio(numerator, denominator, perfect):
  # Integer denominators are 0 or >= 1, so the maximum only silences the 0 / 0 case.
  return np.where(denominator > 0, numerator / np.maximum(denominator, 1),
                  np.where(perfect, 1.0, 0.0))


def overlap_metrics(tp, fp, fn, tn) -> dict[str, np.ndarray]:
  """Overlap metrics from counts, vectorised over images.

  Args:
    tp, fp, fn, tn: integer counts, scalars or arrays of shape (N,).

  Returns:
    float64 arrays (shape of the counts) for every name in `OVERLAP_NAMES`; 'f1' equals
    'dice'. Zero denominators follow the module docstring's empty-set convention.
  """
  tp, fp, fn, tn = (np.asarray(c, np.float64) for c in (tp, fp, fn, tn))
  perfect = (fp + fn) == 0
  iou = _ratio(tp, tp + fp + fn, perfect)
  iou_bg = _ratio(tn, tn + fp + fn, perfect)
  dice = _ratio(2 * tp, 2 * tp + fp + fn, perfect)
  return {
      'iou': iou,
      'dice': dice,
      'f1': dice.copy(),
      'precision': _ratio(tp, tp + fp, perfect),
      'recall': _ratio(tp, tp + fn, perfect),
      'accuracy': _ratio(tp + tn, tp + fp + fn + tn, perfect),
      'specificity': _ratio(tn, tn + fp, perfect),
      'iou_bg': iou_bg,
      'miou': (iou + iou_bg) / 2,
  }


def auc(prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None) -> float:
  """Exact ROC AUC of one image's probabilities; NaN when only one class is present.

  Args:
    prob: (H, W) float scores.
    target: (H, W) ground truth in {0, 1}.
    valid: optional (H, W) {0, 1}; only pixels where it is 1 take part.
  """
  keep = np.ones(np.shape(target), bool) if valid is None else np.asarray(valid) > 0.5
  scores = np.asarray(prob, np.float64)[keep]
  positive = np.asarray(target)[keep] > 0.5
  num_pos = int(positive.sum())
  num_neg = positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float('nan')
  # Average ranks (scipy.stats.rankdata's default; scipy.stats takes 0.3 s to import, in every
  # process that evaluates): a tie counts as half a correct pair.
  _, group, sizes = np.unique(scores, return_inverse=True, return_counts=True)
  ranks = (np.cumsum(sizes) - (sizes - 1) / 2)[group]
  u_statistic = ranks[positive].sum() - num_pos * (num_pos + 1) / 2
  return float(u_statistic / (num_pos * num_neg))


def _boundary(mask: np.ndarray) -> np.ndarray:
  return mask & ~ndimage.binary_erosion(mask, structure=_BG_CONNECTIVITY, border_value=0)


def hausdorff(pred: np.ndarray, target: np.ndarray, percentile: float = 100.0,
              boundary: bool = True) -> float:
  """Symmetric Hausdorff distance in pixels between two (H, W) binary masks.

  Args:
    pred: (H, W) predicted mask, nonzero = foreground.
    target: (H, W) ground-truth mask, nonzero = foreground.
    percentile: 100 gives the Hausdorff distance, 95 the hd95, over the distances of both
      directions pooled.
    boundary: measure between the masks' boundaries (medpy/MONAI) or, if False, between
      their foreground sets (the reference).

  Returns:
    The distance; 0 when both masks are empty, hypot(H - 1, W - 1) when exactly one is.
  """
  pred, target = np.asarray(pred) != 0, np.asarray(target) != 0
  if not pred.any() and not target.any():
    return 0.0
  if not pred.any() or not target.any():
    return float(np.hypot(pred.shape[0] - 1, pred.shape[1] - 1))
  if boundary:
    pred, target = _boundary(pred), _boundary(target)
  # distance_transform_edt measures to the nearest zero, so invert each point set.
  to_target = ndimage.distance_transform_edt(~target)[pred]
  to_pred = ndimage.distance_transform_edt(~pred)[target]
  return float(np.percentile(np.concatenate([to_target, to_pred]), percentile))


def betti_numbers(mask: np.ndarray) -> tuple[int, int]:
  """(b0, b1) of an (H, W) binary mask: 8-connected components and 4-connected holes."""
  mask = np.asarray(mask) != 0
  _, b0 = ndimage.label(mask, structure=_FG_CONNECTIVITY)
  # A background frame joins every border-touching background region into one component,
  # which is the outside, not a hole.
  framed = np.pad(~mask, 1, constant_values=True)
  _, num_background = ndimage.label(framed, structure=_BG_CONNECTIVITY)
  return int(b0), int(num_background - 1)


def betti_errors(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
  """(|b0(pred) - b0(target)|, |b1(pred) - b1(target)|) for two (H, W) binary masks."""
  pred_b0, pred_b1 = betti_numbers(pred)
  target_b0, target_b1 = betti_numbers(target)
  return abs(pred_b0 - target_b0), abs(pred_b1 - target_b1)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> float:
  """Intersection over union of two binary masks (nonzero: foreground); 1.0 when both are
  empty."""
  pred, target = np.asarray(pred) != 0, np.asarray(target) != 0
  union = np.count_nonzero(pred | target)
  return float(np.count_nonzero(pred & target) / union) if union else 1.0


def cldice(pred: np.ndarray, target: np.ndarray) -> float:
  """Centreline Dice of two (H, W) binary masks (skimage skeletons); see module docstring."""
  pred, target = np.asarray(pred) != 0, np.asarray(target) != 0
  if not pred.any() and not target.any():
    return 1.0
  if not pred.any() or not target.any():
    return 0.0
  pred_skeleton, target_skeleton = morphology.skeletonize(pred), morphology.skeletonize(target)
  topology_precision = (pred_skeleton & target).sum() / max(pred_skeleton.sum(), 1)
  topology_sensitivity = (target_skeleton & pred).sum() / max(target_skeleton.sum(), 1)
  total = topology_precision + topology_sensitivity
  return float(2 * topology_precision * topology_sensitivity / total) if total > 0 else 0.0


def _as_image(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 2:
    raise ValueError(f'{name} must be (H, W) or (H, W, 1), got shape {array.shape}')
  return array


def image_metrics(prob: np.ndarray, target: np.ndarray, threshold: float = 0.5,
                  valid: np.ndarray | None = None, topology: bool = True,
                  counts: dict | None = None, auc_value: float | None = None
                  ) -> dict[str, float]:
  """Every metric for one image, on the host.

  Args:
    prob: (H, W) or (H, W, 1) float foreground probabilities.
    target: same shape, ground truth in {0, 1}.
    threshold: foreground where prob > threshold (as `confusion_counts`).
    valid: optional same-shape {0, 1} mask of real pixels.
    topology: also compute clDice and the Betti errors.
    counts: the image's 'tp', 'fp', 'fn', 'tn' at `threshold` when already known (the
      evaluation step counts them on device), else counted here.
    auc_value: the image's AUC when already known (it does not depend on the threshold).

  Returns:
    The counts ('tp', 'fp', 'fn', 'tn' as ints, equal to `confusion_counts`) and every
    metric of `METRIC_NAMES` (the topology ones only when `topology`) as floats.
  """
  prob, target = _as_image(prob, 'prob'), _as_image(target, 'target')
  keep = np.ones(target.shape, bool) if valid is None else _as_image(valid, 'valid') > 0.5
  pred = (prob > threshold) & keep
  truth = (target > 0.5) & keep
  if counts is None:
    counts = {'tp': np.sum(pred & truth), 'fp': np.sum(pred & ~truth),
              'fn': np.sum(~pred & truth), 'tn': np.sum(~pred & ~truth & keep)}
  row = {k: int(counts[k]) for k in COUNT_NAMES}
  row.update({k: float(v) for k, v in overlap_metrics(**row).items()})
  row['auc'] = auc(prob, target, keep) if auc_value is None else auc_value
  row['hd'] = hausdorff(pred, truth)
  row['hd95'] = hausdorff(pred, truth, percentile=95.0)
  if topology:
    row['cldice'] = cldice(pred, truth)
    row['betti0_error'], row['betti1_error'] = map(float, betti_errors(pred, truth))
  return row


def summarize(rows: list[dict]) -> dict[str, float]:
  """Means over images and pooled overlap metrics over a set of `image_metrics` rows.

  Returns:
    For every name in `METRIC_NAMES` present in the rows, the per-image mean ignoring NaN
    (NaN if every image is NaN); for every name in `OVERLAP_NAMES`, 'pooled_<name>' computed
    from the counts summed over all images (one big image). Empty for no rows.
  """
  if not rows:
    return {}
  summary = {}
  for name in METRIC_NAMES:
    values = [row[name] for row in rows if name in row]
    if values:
      with warnings.catch_warnings():  # All-NaN columns (AUC on empty masks) are expected.
        warnings.simplefilter('ignore', RuntimeWarning)
        summary[name] = float(np.nanmean(np.asarray(values, np.float64)))
  totals = {k: sum(int(row[k]) for row in rows) for k in COUNT_NAMES}
  pooled = overlap_metrics(**totals)
  summary.update({f'pooled_{k}': float(pooled[k]) for k in OVERLAP_NAMES})
  return summary
