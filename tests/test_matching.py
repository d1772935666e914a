"""Instance matching: hand-made cases with IoUs known exactly, the empty-set conventions, and
`match` against a brute-force reference (explicit loops over object pairs, every matching
enumerated) on random label images."""

import itertools

import numpy as np
import pytest

from flmiseg.objects import matching

_KEYS = ('thresh', 'tp', 'fp', 'fn', 'precision', 'recall', 'f1', 'ap', 'mean_true_score',
         'mean_matched_score', 'panoptic_quality', 'n_true', 'n_pred')


def _two_squares(dtype=np.int32, labels=(1, 2)):
  """Two touching 10x10 squares side by side in a 20x30 image."""
  gt = np.zeros((20, 30), dtype)
  gt[0:10, 0:10] = labels[0]
  gt[0:10, 10:20] = labels[1]
  return gt


def _one_box(dtype=np.int32, label=1):
  """One 10x20 box in a 20x30 image: the union of `_two_squares`."""
  box = np.zeros((20, 30), dtype)
  box[0:10, 0:20] = label
  return box


def _by_thresh(results):
  return {round(r['thresh'], 6): r for r in results}


def _check(result, **expected):
  for key, value in expected.items():
    assert result[key] == pytest.approx(value, abs=1e-12), (key, result[key], value)


# Hand-made cases.


def test_perfect_prediction_of_touching_squares():
  gt = _two_squares()
  pred = _two_squares(labels=(7, 3))  # Other label values, swapped order.
  results = matching.match(gt, pred)
  assert [r['thresh'] for r in results] == list(matching.THRESHOLDS)
  for r in results:
    assert tuple(r) == _KEYS
    _check(r, tp=2, fp=0, fn=0, precision=1, recall=1, f1=1, ap=1, mean_true_score=1,
           mean_matched_score=1, panoptic_quality=1, n_true=2, n_pred=2)


def test_merged_prediction_matches_one_square_at_exactly_half():
  # Each square has IoU 100 / 200 = 0.5 with the merged box: a match at 0.5 (>=), not above.
  results = _by_thresh(matching.match(_two_squares(), _one_box()))
  _check(results[0.5], tp=1, fp=0, fn=1, precision=1, recall=0.5, f1=2 / 3, ap=0.5,
         mean_true_score=0.25, mean_matched_score=0.5, panoptic_quality=0.5 / 1.5,
         n_true=2, n_pred=1)
  for thresh in matching.THRESHOLDS[1:]:
    _check(results[thresh], tp=0, fp=1, fn=2, precision=0, recall=0, f1=0, ap=0,
           mean_true_score=0, mean_matched_score=0, panoptic_quality=0)


def test_split_prediction():
  # The 10x20 box predicted as a 10x12 and a 10x8 piece: IoUs 120 / 200 = 0.6, 80 / 200 = 0.4.
  pred = np.zeros((20, 30), np.int32)
  pred[0:10, 0:12] = 4
  pred[0:10, 12:20] = 9
  np.testing.assert_array_equal(matching.iou_matrix(_one_box(), pred), [[0.6, 0.4]])
  results = _by_thresh(matching.match(_one_box(), pred))
  for thresh in (0.5, 0.55, 0.6):
    _check(results[thresh], tp=1, fp=1, fn=0, precision=0.5, recall=1, f1=2 / 3, ap=0.5,
           mean_true_score=0.6, mean_matched_score=0.6, panoptic_quality=0.6 / 1.5)
  for thresh in (0.65, 0.7, 0.9):
    _check(results[thresh], tp=0, fp=2, fn=1, ap=0, panoptic_quality=0)
  # Below 0.5 both pieces are candidates for the one box; the better one is matched.
  _check(matching.match(_one_box(), pred, thresholds=0.3)[0], tp=1, fp=1, fn=0,
         mean_matched_score=0.6)


def test_split_into_exact_halves_matches_one_half():
  # Both halves have IoU exactly 0.5 with the box: one match at 0.5, whichever it is.
  results = _by_thresh(matching.match(_one_box(), _two_squares()))
  _check(results[0.5], tp=1, fp=1, fn=0, ap=0.5, mean_matched_score=0.5,
         panoptic_quality=0.5 / 1.5)
  _check(results[0.55], tp=0, fp=2, fn=1)


def test_below_half_most_matches_first_then_largest_iou():
  # Strips of 10 rows. gt A = columns 5-14, B = 15-24; pred Q = 0-8, P = 9-17.
  # IoU(A, P) = 6 / 13, IoU(A, Q) = 4 / 15, IoU(B, P) = 3 / 16, IoU(B, Q) = 0.
  gt = np.zeros((10, 30), np.int32)
  gt[:, 5:15], gt[:, 15:25] = 1, 2
  pred = np.zeros((10, 30), np.int32)
  pred[:, 0:9], pred[:, 9:18] = 1, 2
  np.testing.assert_array_equal(matching.iou_matrix(gt, pred), [[4 / 15, 6 / 13], [0, 3 / 16]])
  low, middle, high = matching.match(gt, pred, thresholds=(0.18, 0.2, 0.3))
  # Two matches (A-Q, B-P) beat the one best pair (A-P), though their IoU sum is smaller.
  _check(low, tp=2, fp=0, fn=0, mean_matched_score=(4 / 15 + 3 / 16) / 2)
  # One match possible: the larger IoU wins the tie.
  _check(middle, tp=1, fp=1, fn=1, mean_matched_score=6 / 13)
  _check(high, tp=1, fp=1, fn=1, mean_matched_score=6 / 13)


def test_empty_gt_and_empty_pred_is_perfect():
  empty = np.zeros((8, 8), np.uint8)
  for r in matching.match(empty, empty):
    _check(r, tp=0, fp=0, fn=0, precision=1, recall=1, f1=1, ap=1, panoptic_quality=1,
           mean_true_score=0, mean_matched_score=0, n_true=0, n_pred=0)


def test_only_false_positives_and_only_false_negatives():
  empty = np.zeros((20, 30), np.int32)
  for r in matching.match(empty, _two_squares()):
    _check(r, tp=0, fp=2, fn=0, precision=0, recall=0, f1=0, ap=0, panoptic_quality=0,
           mean_true_score=0, mean_matched_score=0, n_true=0, n_pred=2)
  for r in matching.match(_two_squares(), empty):
    _check(r, tp=0, fp=0, fn=2, precision=0, recall=0, f1=0, ap=0, panoptic_quality=0,
           mean_true_score=0, mean_matched_score=0, n_true=2, n_pred=0)


def test_false_positive_next_to_a_match():
  gt = _two_squares()
  pred = gt.copy()
  pred[15:20, 25:30] = 11  # An extra object on background.
  pred[gt == 2] = 0  # The second square missed.
  for r in matching.match(gt, pred):
    _check(r, tp=1, fp=1, fn=1, precision=0.5, recall=0.5, f1=0.5, ap=1 / 3,
           mean_true_score=0.5, mean_matched_score=1, panoptic_quality=0.5)


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.int32, np.int64, np.uint64])
def test_label_values_and_dtypes_do_not_matter(dtype):
  gt = _two_squares(np.int32)
  gt[12:18, 2:8] = 3
  pred = _one_box(np.int32)
  pred[13:18, 2:8] = 2
  expected = matching.match(gt, pred)
  # Same objects, other (non-consecutive) values in another dtype.
  high = 250 if dtype == np.uint8 else 60000 if dtype == np.uint16 else 10**9
  gt_values = np.array([0, 17, high, 5])
  pred_values = np.array([0, high - 1, 3])
  assert matching.match(gt_values[gt].astype(dtype), pred_values[pred].astype(dtype)) == expected
  assert _by_thresh(expected)[0.8]['tp'] == 1  # The third object: IoU 30 / 36.


def test_valid_mask_ignores_pixels_outside():
  gt = _two_squares()
  pred = _two_squares()
  pred[gt == 2] = 0  # The second square missed ...
  valid = np.ones(gt.shape, bool)
  valid[:, 10:] = False  # ... but it lies outside the valid region.
  for r in matching.match(gt, pred, valid=valid):
    _check(r, tp=1, fp=0, fn=0, ap=1, n_true=1, n_pred=1)
  # An object cut by the valid region counts by its part inside: the merged box has IoU 0.5
  # with the first square, 100 / 150 once only columns < 15 count.
  valid = np.zeros(gt.shape, bool)
  valid[:, :15] = True
  gt = _one_box()
  gt[gt > 0] = 0
  gt[0:10, 0:10] = 1
  assert _by_thresh(matching.match(gt, _one_box()))[0.6]['tp'] == 0
  results = _by_thresh(matching.match(gt, _one_box(), valid=valid))
  _check(results[0.65], tp=1, fp=0, fn=0, mean_matched_score=100 / 150)
  _check(results[0.7], tp=0, fp=1, fn=1)


def test_invalid_inputs_raise_one_line_value_errors():
  gt = _two_squares()
  calls = [
      lambda: matching.match(gt, gt[:, :20]),
      lambda: matching.match(gt, gt.astype(np.float32)),
      lambda: matching.match(gt.astype(np.float64), gt),
      lambda: matching.iou_matrix(gt, gt[:10]),
      lambda: matching.iou_matrix(gt, gt * 0.5),
      lambda: matching.relabel(gt.astype(np.float32)),
      lambda: matching.relabel(-gt),
      lambda: matching.match(gt, gt, valid=np.ones((3, 3), bool)),
      lambda: matching.match(gt, gt, thresholds=(0.5, 0.0)),
      lambda: matching.match_dataset([(gt, gt[:, :20])]),
      lambda: matching.summary(matching.match(gt, gt, thresholds=(0.5, 0.75))),
  ]
  for call in calls:
    with pytest.raises(ValueError) as error:
      call()
    assert str(error.value) and '\n' not in str(error.value)


def test_relabel():
  labels = np.array([[0, 5, 5], [9, 0, 2]], np.uint16)
  out = matching.relabel(labels)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, [[0, 2, 2], [3, 0, 1]])
  # Huge label values (the sort path) and no background at all.
  huge = np.array([[2**40, 3], [3, 2**41]], np.int64)
  np.testing.assert_array_equal(matching.relabel(huge), [[2, 1], [1, 3]])
  np.testing.assert_array_equal(matching.relabel(huge * 0), [[0, 0], [0, 0]])


def test_iou_matrix_rows_and_columns_follow_sorted_labels():
  gt = np.zeros((4, 6), np.int64)
  gt[:, 0:2] = 30
  gt[:, 2:4] = 10  # First row: the smaller label.
  pred = np.zeros((4, 6), np.uint8)
  pred[:, 1:4] = 200
  pred[0, 5] = 100
  iou = matching.iou_matrix(gt, pred)
  assert iou.shape == (2, 2) and iou.dtype == np.float64
  # gt 10 (8 px) with pred 200 (12 px): 8 / 12; gt 30 (8 px) with pred 200: 4 / 16.
  np.testing.assert_array_equal(iou, [[0.0, 8 / 12], [0.0, 4 / 16]])
  assert matching.iou_matrix(gt * 0, pred).shape == (0, 2)


def test_many_objects():
  # 1600 squares of 4x4, predicted one column to the right: IoU 12 / 20 = 0.6 each.
  gt = np.zeros((240, 240), np.int32)
  for index, (row, col) in enumerate(itertools.product(range(0, 240, 6), repeat=2)):
    gt[row:row + 4, col:col + 4] = index + 1
  pred = np.roll(gt, 1, axis=1) * 2
  results = _by_thresh(matching.match(gt, pred, thresholds=(0.3, 0.5, 0.6, 0.65)))
  for thresh in (0.3, 0.5, 0.6):
    _check(results[thresh], tp=1600, fp=0, fn=0, panoptic_quality=0.6)
  _check(results[0.65], tp=0, fp=1600, fn=1600)


# Against a brute-force reference.


def _reference(gt, pred, thresh):
  """(tp, fp, fn, ap, pq) from explicit loops: IoU of every pair of boolean object masks, then
  every matching of the pairs with IoU >= thresh enumerated; the best has the most pairs and,
  among those, the largest IoU sum."""
  gt_labels = [v for v in np.unique(gt) if v != 0]
  pred_labels = [v for v in np.unique(pred) if v != 0]
  candidates = []
  for i, g in enumerate(gt_labels):
    for j, p in enumerate(pred_labels):
      inside_gt, inside_pred = gt == g, pred == p
      iou = (inside_gt & inside_pred).sum() / (inside_gt | inside_pred).sum()
      if iou >= thresh:
        candidates.append((i, j, iou))

  def best(k, used_gt, used_pred):
    if k == len(candidates):
      return 0, 0.0
    skip = best(k + 1, used_gt, used_pred)
    i, j, iou = candidates[k]
    if i in used_gt or j in used_pred:
      return skip
    count, total = best(k + 1, used_gt | {i}, used_pred | {j})
    return max(skip, (count + 1, total + iou))

  tp, total = best(0, frozenset(), frozenset())
  if thresh > 0.5:  # Above 0.5 every candidate pair is a match.
    assert tp == len(candidates)
  fp, fn = len(pred_labels) - tp, len(gt_labels) - tp
  if not gt_labels and not pred_labels:
    return 0, 0, 0, 1.0, 1.0
  denominator = tp + fp + fn
  return tp, fp, fn, tp / denominator, total / (tp + fp / 2 + fn / 2)


def _random_pair(rng):
  """A random 64x64 (gt, pred) pair: rectangles and discs, the prediction shifted, grown,
  merged, missed or made up, label values non-consecutive, in a random dtype."""
  yy, xx = np.mgrid[:64, :64]

  def random_shape():
    if rng.random() < 0.5:
      top, left = rng.integers(0, 58, 2)
      height, width = rng.integers(4, 20, 2)
      return (yy >= top) & (yy < top + height) & (xx >= left) & (xx < left + width)
    cy, cx = rng.integers(0, 64, 2)
    return (yy - cy)**2 + (xx - cx)**2 <= rng.integers(3, 11)**2

  gt = np.zeros((64, 64), np.int64)
  for label in range(1, rng.integers(0, 8) + 1):
    gt[random_shape()] = 3 * label + 1
  pred = np.zeros((64, 64), np.int64)
  label = 0
  for value in np.unique(gt)[1:]:
    if rng.random() < 0.15:
      continue  # Missed.
    shift = rng.integers(-3, 4, 2) if rng.random() < 0.7 else rng.integers(-1, 2, 2)
    shape = np.roll(gt == value, tuple(shift), axis=(0, 1))
    if rng.random() < 0.3:
      shape |= random_shape() & np.roll(shape, 6, axis=1)  # Grown to one side.
    if label == 0 or rng.random() > 0.2:  # Else merged with the previous one.
      label += 1
    pred[shape] = 2 * label + 5
  for _ in range(rng.integers(0, 3)):
    label += 1
    pred[random_shape()] = 2 * label + 5
  dtype = rng.choice([np.uint8, np.uint16, np.int32, np.int64])
  return gt.astype(dtype), pred.astype(dtype)


def test_match_agrees_with_brute_force_reference():
  rng = np.random.default_rng(1234)
  just_below_half = float(np.nextafter(0.5, 0.0))  # Same candidates as 0.5, other code path.
  thresholds = (0.3, just_below_half) + matching.THRESHOLDS
  matched_at_low_thresh = 0
  for _ in range(30):
    gt, pred = _random_pair(rng)
    results = matching.match(gt, pred, thresholds)
    for r in results:
      tp, fp, fn, ap, pq = _reference(gt, pred, r['thresh'])
      assert (r['tp'], r['fp'], r['fn']) == (tp, fp, fn), r
      assert r['ap'] == pytest.approx(ap, abs=1e-12)
      assert r['panoptic_quality'] == pytest.approx(pq, abs=1e-12)
    low, below, half = results[0], results[1], results[2]
    assert {k: v for k, v in below.items() if k != 'thresh'} == pytest.approx(
        {k: v for k, v in half.items() if k != 'thresh'}, abs=1e-12)
    matched_at_low_thresh += low['tp'] > half['tp']
  assert matched_at_low_thresh > 0  # The random cases do exercise matches below 0.5.


# Dataset pooling and the summary.


def test_match_dataset_sums_counts_over_images():
  merged = (_two_squares(), _one_box())  # At 0.5: tp 1, n_true 2, n_pred 1, IoU sum 0.5.
  split_pred = np.zeros((20, 30), np.int32)
  split_pred[0:10, 0:12] = 1
  split_pred[0:10, 12:20] = 2
  split = (_one_box(), split_pred)  # At 0.5: tp 1, n_true 1, n_pred 2, IoU sum 0.6.
  results = _by_thresh(matching.match_dataset([merged, split]))
  _check(results[0.5], tp=2, fp=1, fn=1, n_true=3, n_pred=3, precision=2 / 3, recall=2 / 3,
         f1=2 / 3, ap=0.5, mean_true_score=1.1 / 3, mean_matched_score=0.55,
         panoptic_quality=1.1 / 3)
  _check(results[0.6], tp=1, fp=2, fn=2, ap=0.2, mean_matched_score=0.6,
         panoptic_quality=0.6 / 3)
  # At every threshold: the per-image counts added up, the ratios from the totals.
  rng = np.random.default_rng(7)
  pairs = [_random_pair(rng) for _ in range(3)] + [merged, split]
  valid = np.ones((64, 64), bool)
  valid[:20] = False
  pairs.append((*_random_pair(rng), valid))
  pooled = matching.match_dataset(iter(pairs))  # Any iterable.
  per_image = [matching.match(*pair) if len(pair) == 2 else
               matching.match(pair[0], pair[1], valid=pair[2]) for pair in pairs]
  for i, r in enumerate(pooled):
    tp, fp, fn = (sum(image[i][k] for image in per_image) for k in ('tp', 'fp', 'fn'))
    iou_sum = sum(image[i]['mean_matched_score'] * image[i]['tp'] for image in per_image)
    _check(r, tp=tp, fp=fp, fn=fn, ap=tp / (tp + fp + fn), precision=tp / (tp + fp),
           recall=tp / (tp + fn), panoptic_quality=iou_sum / (tp + fp / 2 + fn / 2))


def test_match_dataset_of_empty_images_is_perfect():
  empty = np.zeros((5, 5), np.uint8)
  for r in matching.match_dataset([(empty, empty), (empty, empty)], thresholds=(0.5, 0.9)):
    _check(r, tp=0, fp=0, fn=0, ap=1, f1=1, panoptic_quality=1)


def test_summary():
  out = matching.summary(matching.match(_two_squares(), _one_box()))
  assert set(out) == set(matching.SUMMARY_KEYS)
  assert all(type(value) is float for value in out.values())
  assert out == pytest.approx({
      'ap_0.5': 0.5, 'ap_0.75': 0.0, 'ap_0.9': 0.0, 'mean_ap': 0.5 / 9,
      'precision_0.5': 1.0, 'recall_0.5': 0.5, 'f1_0.5': 2 / 3, 'pq': 1 / 3}, abs=1e-12)
  perfect = matching.summary(matching.match(_two_squares(), _two_squares()))
  assert perfect == {key: 1.0 for key in matching.SUMMARY_KEYS}


def test_is_label_image():
  binary = np.zeros((4, 4), np.uint8)
  binary[1:3, 1:3] = 255
  assert not matching.is_label_image(binary)
  assert not matching.is_label_image((binary > 0).astype(np.int32))
  assert not matching.is_label_image(binary > 0)
  assert not matching.is_label_image(np.zeros((4, 4), np.uint16))
  labels = (binary > 0).astype(np.uint16)
  labels[0, 0] = 2
  assert matching.is_label_image(labels)
  assert matching.is_label_image(np.array([[1, 2]], np.int64))  # No background at all.
  assert not matching.is_label_image(labels.astype(np.float32))


def test_combine_equals_match_dataset():
  rng = np.random.default_rng(5)
  pairs = []
  for _ in range(4):
    gt = np.zeros((40, 40), np.int32)
    pred = np.zeros((40, 40), np.int32)
    for k in range(1, 6):
      y, x = rng.integers(0, 30, 2)
      gt[y:y + 8, x:x + 8] = k
      dy, dx = rng.integers(-3, 4, 2)
      pred[max(y + dy, 0):y + dy + 8, max(x + dx, 0):x + dx + 8] = k
    pairs.append((gt, pred))
  pooled = matching.combine(matching.match(g, p) for g, p in pairs)
  expected = matching.match_dataset(pairs)
  for got, want in zip(pooled, expected):
    assert {k: got[k] for k in ('tp', 'fp', 'fn', 'n_true', 'n_pred')} == {
        k: want[k] for k in ('tp', 'fp', 'fn', 'n_true', 'n_pred')}
    for key in ('ap', 'precision', 'recall', 'f1', 'panoptic_quality', 'mean_true_score'):
      assert got[key] == pytest.approx(want[key], abs=1e-12)
