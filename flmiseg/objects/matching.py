"""Instance-segmentation metrics: object matching by IoU, as StarDist's `stardist.matching`.

Inputs are label images: (H, W) integer arrays (any integer dtype; any number of dimensions
works) where 0 is background and every other value is one object. Labels need not be
consecutive; they are renumbered 1..N (`relabel`) before anything is counted.

IoU of a ground-truth object g and a predicted object p: |g & p| / |g | p| in pixels. All the
IoUs come from one contingency table of the (gt label, pred label) pixel pairs, so thousands
of objects cost one np.bincount (or one sort), not a loop over pairs; `match` keeps only the
pairs that overlap, `iou_matrix` returns the dense (n_gt, n_pred) matrix.

Matching at a threshold t (`match`): a one-to-one assignment of predicted to ground-truth
objects that uses only pairs with IoU >= t, chosen as StarDist does: the largest number of
such pairs, and among those the largest total IoU (linear_sum_assignment). For t >= 0.5 the
choice is unique: two objects of the same image are disjoint, so an object has IoU > 0.5 with
at most one object of the other image, and IoU exactly 0.5 with two only when it is exactly
their union and both are halves of it (all such pairs score 0.5, so any pick gives the same
counts and scores). Below 0.5 the counts are StarDist's too, but the matched IoU sum (and so
the mean scores and panoptic quality) can differ slightly: StarDist breaks ties between
equally many matches by the IoU of every assigned pair, below-threshold ones included; here
only the matched pairs count. Then, with n_true ground-truth and n_pred predicted objects:
  tp = matched pairs            fp = n_pred - tp              fn = n_true - tp
  precision = tp / (tp + fp)    recall = tp / (tp + fn)       f1 = 2 tp / (2 tp + fp + fn)
  ap = tp / (tp + fp + fn)      (StarDist's 'accuracy'; the AP of the DSB 2018 challenge)
  mean_true_score = sum of matched IoUs / n_true
  mean_matched_score = sum of matched IoUs / tp
  panoptic_quality = sum of matched IoUs / (tp + fp / 2 + fn / 2)
A ratio whose denominator is 0 is 0 (StarDist's `_safe_divide`), with one exception: when
both images hold no object, precision, recall, f1, ap and panoptic_quality are 1 (nothing to
find and nothing wrongly found is a perfect answer; StarDist gives 0). The two mean scores
stay 0 then: they average over objects, and there are none.

`valid` masks: pixels where valid is False are set to background in both images before
relabelling, so the parts of objects outside the valid region do not count (an object wholly
outside disappears, one cut by the border is measured by its part inside).

`match_dataset` pools images as StarDist's `matching_dataset(by_image=False)`: tp, fp, fn,
the object counts and the sums of matched IoUs are added over the images, and the ratios are
computed once from the totals (so an image with many objects weighs more).

`summary` flattens the per-threshold results into the few numbers a report shows.
"""

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csgraph

THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
SUMMARY_KEYS = ('ap_0.5', 'ap_0.75', 'ap_0.9', 'mean_ap', 'precision_0.5', 'recall_0.5',
                'f1_0.5', 'pq')


def _as_labels(labels, name: str) -> np.ndarray:
  """`labels` as an integer array (booleans count as labels 0/1); ValueError otherwise."""
  labels = np.asarray(labels)
  if labels.dtype == bool:
    return labels.astype(np.uint8)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name} must be an integer label image, got dtype {labels.dtype}')
  if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
    raise ValueError(f'{name} has negative labels (min {labels.min()}); 0 is background')
  return labels


def _check_shapes(gt: np.ndarray, pred: np.ndarray) -> None:
  if gt.shape != pred.shape:
    raise ValueError(f'gt and pred shapes differ: {gt.shape} vs {pred.shape}')


def _as_thresholds(thresholds) -> tuple[float, ...]:
  thresholds = tuple(float(t) for t in np.atleast_1d(thresholds))
  if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
    raise ValueError(f'IoU thresholds must be in (0, 1], got {thresholds}')
  return thresholds


def is_label_image(mask: np.ndarray) -> bool:
  """True when `mask` is an integer array with more than one distinct nonzero value.

  That is how user label images (one value per object) are told apart from binary masks
  (0/1, 0/255); float and boolean arrays are never label images.
  """
  mask = np.asarray(mask)
  if mask.dtype == bool or not np.issubdtype(mask.dtype, np.integer):
    return False
  nonzero = mask[mask != 0]
  return bool(nonzero.size) and bool((nonzero != nonzero[0]).any())


def relabel(labels) -> np.ndarray:
  """`labels` renumbered 1..N in the order of their values (0 stays 0), as int32.

  Raises:
    ValueError: non-integer or negative labels.
  """
  labels = _as_labels(labels, 'labels')
  if labels.size == 0:
    return np.zeros(labels.shape, np.int32)
  top = int(labels.max())
  if top <= max(2 * labels.size, 1 << 16):  # A lookup table about the image's size or less.
    present = np.zeros(top + 1, bool)
    present[labels.ravel()] = True
    present[0] = False
    lookup = np.cumsum(present, dtype=np.int64).astype(np.int32)
    return lookup[labels]
  values, inverse = np.unique(labels, return_inverse=True)
  offset = 0 if values[0] == 0 else 1
  return (inverse.reshape(labels.shape) + offset).astype(np.int32)


def _overlaps(gt: np.ndarray, pred: np.ndarray):
  """The overlapping object pairs of two label images of equal shape.

  Returns:
    (n_gt, n_pred, rows, cols, iou): the object counts, and for every pair of objects that
    share a pixel its 0-based indices in `relabel` order (sorted by row, then column) and
    its IoU. Pairs that share no pixel have IoU 0 and are left out.
  """
  gt, pred = relabel(gt).ravel(), relabel(pred).ravel()
  n_gt = int(gt.max()) if gt.size else 0
  n_pred = int(pred.max()) if pred.size else 0
  gt_area = np.bincount(gt, minlength=n_gt + 1)[1:]
  pred_area = np.bincount(pred, minlength=n_pred + 1)[1:]
  both = (gt > 0) & (pred > 0)
  if not both.any():
    empty = np.zeros(0, np.int64)
    return n_gt, n_pred, empty, empty, np.zeros(0, np.float64)
  # Contingency table of the (gt label, pred label) pixel pairs inside both images' objects:
  # a dense bincount when the table is about the image's size or smaller, else the sorted
  # distinct pairs (thousands of objects make a huge, almost empty table).
  codes = (gt[both].astype(np.int64) - 1) * n_pred + (pred[both] - 1)
  if n_gt * n_pred <= 4 * codes.size + 4096:
    table = np.bincount(codes, minlength=n_gt * n_pred)
    pairs = np.flatnonzero(table)
    intersection = table[pairs]
  else:
    pairs, intersection = np.unique(codes, return_counts=True)
  rows, cols = np.divmod(pairs, n_pred)
  iou = intersection / (gt_area[rows] + pred_area[cols] - intersection)
  return n_gt, n_pred, rows, cols, iou


def iou_matrix(gt, pred) -> np.ndarray:
  """IoU of every ground-truth object with every predicted object.

  Args:
    gt: (H, W) integer label image, 0 = background.
    pred: (H, W) integer label image, 0 = background.

  Returns:
    (n_gt, n_pred) float64; row i is gt's (i + 1)-th smallest label, column j pred's
    (j + 1)-th smallest label (the numbering of `relabel`).

  Raises:
    ValueError: shapes differ, or an input is not an integer label image.
  """
  gt, pred = _as_labels(gt, 'gt'), _as_labels(pred, 'pred')
  _check_shapes(gt, pred)
  n_gt, n_pred, rows, cols, iou = _overlaps(gt, pred)
  matrix = np.zeros((n_gt, n_pred), np.float64)
  matrix[rows, cols] = iou
  return matrix


def _assign(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray,
            thresh: float) -> tuple[int, float]:
  """(tp, sum of matched IoUs) at `thresh` from the overlapping pairs of `_overlaps`."""
  keep = iou >= thresh
  rows, cols, iou = rows[keep], cols[keep], iou[keep]
  if rows.size == 0:
    return 0, 0.0
  if thresh >= 0.5:
    # Each connected group of candidate pairs is one pair or an object with two halves, all
    # of IoU 0.5: keep one pair per group (first per gt object, then first per pred object).
    _, first = np.unique(rows, return_index=True)
    rows, cols, iou = rows[first], cols[first], iou[first]
    _, first = np.unique(cols, return_index=True)
    return int(first.size), float(iou[first].sum())
  # Below 0.5 an object can have several candidates: solve each connected group of candidate
  # pairs on its own (objects without a candidate cannot be matched), one pair groups directly.
  row_ids, row_index = np.unique(rows, return_inverse=True)
  col_ids, col_index = np.unique(cols, return_inverse=True)
  num_nodes = row_ids.size + col_ids.size
  graph = sparse.coo_matrix((np.ones(rows.size), (row_index, row_ids.size + col_index)),
                            shape=(num_nodes, num_nodes))
  _, group = csgraph.connected_components(graph, directed=False)
  pair_group = group[row_index]
  group_size = np.bincount(pair_group)
  single = group_size[pair_group] == 1
  tp, matched_iou = int(single.sum()), float(iou[single].sum())
  order = np.argsort(pair_group, kind='stable')
  order = order[~single[order]]
  for pairs in np.split(order, np.flatnonzero(np.diff(pair_group[order])) + 1):
    if pairs.size:
      group_tp, group_iou = _assign_group(row_index[pairs], col_index[pairs], iou[pairs])
      tp, matched_iou = tp + group_tp, matched_iou + group_iou
  return tp, matched_iou


def _assign_group(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray) -> tuple[int, float]:
  """(tp, sum of matched IoUs) of the best assignment among candidate pairs (all of them)."""
  row_ids, rows = np.unique(rows, return_inverse=True)
  col_ids, cols = np.unique(cols, return_inverse=True)
  scores = np.zeros((row_ids.size, col_ids.size), np.float64)
  scores[rows, cols] = iou
  ok = np.zeros(scores.shape, bool)
  ok[rows, cols] = True
  # Each candidate pair is worth 1, plus its IoU / (2 n) as a tie-breaker; the tie-breakers
  # of a whole assignment add up to at most 1/2, so the number of pairs comes first.
  cost = -ok.astype(np.float64) - scores / (2 * min(scores.shape))
  matched_rows, matched_cols = linear_sum_assignment(cost)
  matched = ok[matched_rows, matched_cols]
  return int(matched.sum()), float(scores[matched_rows, matched_cols][matched].sum())


def _scores(thresh: float, tp: int, n_true: int, n_pred: int, matched_iou: float) -> dict:
  """The result dict of one threshold from the counts (see the module docstring)."""
  fp, fn = n_pred - tp, n_true - tp
  empty = n_true == 0 and n_pred == 0

  def ratio(numerator, denominator, empty_value=1.0):
    if empty:
      return empty_value
    return float(numerator / denominator) if denominator > 0 else 0.0

  return {
      'thresh': float(thresh),
      'tp': int(tp),
      'fp': int(fp),
      'fn': int(fn),
      'precision': ratio(tp, tp + fp),
      'recall': ratio(tp, tp + fn),
      'f1': ratio(2 * tp, 2 * tp + fp + fn),
      'ap': ratio(tp, tp + fp + fn),
      'mean_true_score': ratio(matched_iou, n_true, 0.0),
      'mean_matched_score': ratio(matched_iou, tp, 0.0),
      'panoptic_quality': ratio(matched_iou, tp + fp / 2 + fn / 2),
      'n_true': int(n_true),
      'n_pred': int(n_pred),
  }


def _counts(gt, pred, thresholds: tuple[float, ...], valid) -> list[tuple[int, int, int, float]]:
  """(tp, n_true, n_pred, sum of matched IoUs) of one image pair at each threshold."""
  gt, pred = _as_labels(gt, 'gt'), _as_labels(pred, 'pred')
  _check_shapes(gt, pred)
  if valid is not None:
    valid = np.asarray(valid)
    if valid.shape != gt.shape:
      raise ValueError(f'valid shape {valid.shape} differs from the images\' {gt.shape}')
    valid = valid != 0
    gt, pred = np.where(valid, gt, 0), np.where(valid, pred, 0)
  n_true, n_pred, rows, cols, iou = _overlaps(gt, pred)
  counts = []
  for thresh in thresholds:
    tp, matched_iou = _assign(rows, cols, iou, thresh)
    counts.append((tp, n_true, n_pred, matched_iou))
  return counts


def match(gt, pred, thresholds: float | Sequence[float] = THRESHOLDS,
          valid=None) -> list[dict]:
  """Matches the objects of one image at each IoU threshold, as StarDist's `matching`.

  Args:
    gt: (H, W) integer label image, 0 = background.
    pred: (H, W) integer label image, 0 = background.
    thresholds: IoU thresholds in (0, 1]; a pair matches when its IoU is >= the threshold.
    valid: optional (H, W) boolean; pixels where it is False are background in both images.

  Returns:
    One dict per threshold, in order, with 'thresh', 'tp', 'fp', 'fn', 'precision',
    'recall', 'f1', 'ap', 'mean_true_score', 'mean_matched_score', 'panoptic_quality'
    (floats) and 'n_true', 'n_pred' (ints); see the module docstring.

  Raises:
    ValueError: shapes differ, an input is not an integer label image, or a threshold is
      outside (0, 1].
  """
  thresholds = _as_thresholds(thresholds)
  return [_scores(t, *counts) for t, counts in zip(thresholds,
                                                   _counts(gt, pred, thresholds, valid))]


def match_dataset(pairs: Iterable[tuple], thresholds: float | Sequence[float] = THRESHOLDS
                  ) -> list[dict]:
  """Matches a dataset with counts pooled over images, as StarDist's `matching_dataset`.

  Args:
    pairs: iterable of (gt, pred) or (gt, pred, valid) per image, as `match` takes them.
    thresholds: IoU thresholds in (0, 1].

  Returns:
    One dict per threshold with the keys of `match`: tp, fp, fn, n_true, n_pred and the sums
    of matched IoUs added over the images, the ratios computed from those totals.
  """
  thresholds = _as_thresholds(thresholds)
  totals = np.zeros((len(thresholds), 3), np.int64)  # tp, n_true, n_pred
  matched_iou = np.zeros(len(thresholds), np.float64)
  for pair in pairs:
    gt, pred, *rest = pair
    if len(rest) > 1:
      raise ValueError(f'pairs must be (gt, pred) or (gt, pred, valid), got {len(pair)} items')
    for i, (tp, n_true, n_pred, score) in enumerate(
        _counts(gt, pred, thresholds, rest[0] if rest else None)):
      totals[i] += (tp, n_true, n_pred)
      matched_iou[i] += score
  return [_scores(t, int(tp), int(n_true), int(n_pred), float(score))
          for t, (tp, n_true, n_pred), score in zip(thresholds, totals, matched_iou)]


def combine(per_image: Iterable[list[dict]]) -> list[dict]:
  """`match_dataset`'s pooled result from the `match` results of each image (all at the same
  thresholds), for callers that keep per-image scores too."""
  per_image = list(per_image)
  if not per_image:
    return [_scores(t, 0, 0, 0, 0.0) for t in THRESHOLDS]
  pooled = []
  for column in zip(*per_image):
    thresh = column[0]['thresh']
    if any(entry['thresh'] != thresh for entry in column):
      raise ValueError('combine needs every image matched at the same thresholds')
    # mean_true_score * n_true is the image's sum of matched IoUs (0 when it has no object).
    pooled.append(_scores(thresh, sum(e['tp'] for e in column),
                          sum(e['n_true'] for e in column), sum(e['n_pred'] for e in column),
                          sum(e['mean_true_score'] * e['n_true'] for e in column)))
  return pooled


def summary(per_threshold: list[dict]) -> dict[str, float]:
  """The headline numbers of `match` or `match_dataset` results.

  Args:
    per_threshold: the list of dicts `match` / `match_dataset` return; it must include the
      thresholds 0.5, 0.75 and 0.9.

  Returns:
    {'ap_0.5', 'ap_0.75', 'ap_0.9': ap at those thresholds, 'mean_ap': mean ap over every
    threshold given, 'precision_0.5', 'recall_0.5', 'f1_0.5': at 0.5, 'pq': panoptic
    quality at 0.5}, all floats.

  Raises:
    ValueError: a threshold the summary needs is missing.
  """

  def at(thresh: float) -> dict:
    for entry in per_threshold:
      if np.isclose(entry['thresh'], thresh):
        return entry
    raise ValueError(f'summary needs threshold {thresh}; got '
                     f'{[entry["thresh"] for entry in per_threshold]}')

  half = at(0.5)
  return {
      'ap_0.5': float(half['ap']),
      'ap_0.75': float(at(0.75)['ap']),
      'ap_0.9': float(at(0.9)['ap']),
      'mean_ap': float(np.mean([entry['ap'] for entry in per_threshold])),
      'precision_0.5': float(half['precision']),
      'recall_0.5': float(half['recall']),
      'f1_0.5': float(half['f1']),
      'pq': float(half['panoptic_quality']),
  }
