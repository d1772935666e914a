"""Every metric against a value known by hand on a tiny mask, plus the empty-set conventions,
the device (JAX) counting path against numpy, and AUC, Hausdorff and hd95 against independent
implementations (pair counting or scikit-learn, scipy, brute-force numpy) on random cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.spatial import distance as spatial_distance

from flmiseg.evaluation import metrics


def _squares_overlapping_by_two_columns():
  """Two 4x4 squares in an 8x8 image sharing 2 columns: tp 8, fp 8, fn 8, tn 40."""
  pred = np.zeros((8, 8), np.uint8)
  target = np.zeros((8, 8), np.uint8)
  pred[2:6, 0:4] = 1
  target[2:6, 2:6] = 1
  return pred, target


def _ring(size=7):
  """A 5x5 square outline (one-pixel thick) inside a size x size image."""
  mask = np.zeros((size, size), np.uint8)
  mask[1:6, 1:6] = 1
  mask[2:5, 2:5] = 0
  return mask


def _overlap(tp, fp, fn, tn):
  return {k: float(v) for k, v in metrics.overlap_metrics(tp, fp, fn, tn).items()}


def test_overlap_metrics_on_overlapping_squares():
  pred, target = _squares_overlapping_by_two_columns()
  row = metrics.image_metrics(pred.astype(np.float32), target, topology=False)
  assert (row['tp'], row['fp'], row['fn'], row['tn']) == (8, 8, 8, 40)
  expected = {'iou': 8 / 24, 'dice': 16 / 32, 'f1': 0.5, 'precision': 0.5, 'recall': 0.5,
              'accuracy': 48 / 64, 'specificity': 40 / 48, 'iou_bg': 40 / 56,
              'miou': (8 / 24 + 40 / 56) / 2}
  for key, value in expected.items():
    assert row[key] == pytest.approx(value, abs=1e-12), key


def test_overlap_metrics_vectorised_over_images():
  out = metrics.overlap_metrics(np.array([8, 3]), np.array([8, 1]), np.array([8, 0]),
                                np.array([40, 5]))
  np.testing.assert_allclose(out['iou'], [8 / 24, 3 / 4])
  np.testing.assert_allclose(out['recall'], [0.5, 1.0])
  assert out['iou'].shape == (2,)


def test_both_empty_is_perfect():
  values = _overlap(tp=0, fp=0, fn=0, tn=64)
  assert all(v == 1.0 for v in values.values()), values


def test_empty_prediction_of_nonempty_truth():
  values = _overlap(tp=0, fp=0, fn=5, tn=59)
  assert values['precision'] == 0.0  # 0/0, but the prediction missed 5 pixels.
  assert values['recall'] == values['iou'] == values['dice'] == values['f1'] == 0.0
  assert values['specificity'] == 1.0
  assert values['accuracy'] == pytest.approx(59 / 64)


def test_nonempty_prediction_of_empty_truth():
  values = _overlap(tp=0, fp=4, fn=0, tn=60)
  assert values['recall'] == 0.0  # 0/0, but 4 false positives.
  assert values['precision'] == values['iou'] == values['dice'] == 0.0
  assert values['specificity'] == pytest.approx(60 / 64)
  assert values['iou_bg'] == pytest.approx(60 / 64)


def test_all_foreground_truth_specificity_convention():
  assert _overlap(tp=64, fp=0, fn=0, tn=0)['specificity'] == 1.0
  assert _overlap(tp=60, fp=0, fn=4, tn=0)['specificity'] == 0.0


def test_auc_known_rankings():
  target = np.array([[0, 0, 1, 1]])
  assert metrics.auc(np.array([[0.1, 0.2, 0.7, 0.9]]), target) == 1.0
  assert metrics.auc(np.array([[0.9, 0.7, 0.2, 0.1]]), target) == 0.0
  assert metrics.auc(np.full((1, 4), 0.3), target) == 0.5
  assert metrics.auc(np.array([[0.1, 0.4, 0.35, 0.8]]), target) == 0.75
  # A positive tied with a negative counts half: (0.5 + 1 + 1 + 1) / 4.
  assert metrics.auc(np.array([[0.5, 0.5, 0.2, 0.9]]), np.array([[1, 0, 0, 1]])) == 0.875


def test_auc_equals_the_share_of_correctly_ordered_pairs_with_many_ties():
  rng = np.random.default_rng(0)
  prob = rng.integers(0, 6, (9, 11)) / 5  # six levels: ties everywhere
  target = rng.integers(0, 2, (9, 11))
  pos, neg = prob[target == 1], prob[target == 0]
  pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
  assert metrics.auc(prob, target) == pytest.approx(pairs.mean(), abs=1e-12)


def test_auc_one_class_is_nan_and_valid_excludes_pixels():
  assert math.isnan(metrics.auc(np.array([[0.1, 0.9]]), np.array([[1, 1]])))
  prob = np.array([[0.1, 0.2, 0.7, 0.9, 0.95]])
  target = np.array([[0, 0, 1, 1, 0]])
  assert metrics.auc(prob, target) == pytest.approx(4 / 6)
  assert metrics.auc(prob, target, valid=np.array([[1, 1, 1, 1, 0]])) == 1.0


def test_hausdorff_two_single_pixels():
  a = np.zeros((10, 10), np.uint8)
  b = np.zeros((10, 10), np.uint8)
  a[2, 2] = 1
  b[5, 6] = 1
  assert metrics.hausdorff(a, b) == 5.0
  assert metrics.hausdorff(a, b, percentile=95.0) == 5.0


def test_hausdorff_squares_offset_by_three():
  a = np.zeros((10, 12), np.uint8)
  b = np.zeros((10, 12), np.uint8)
  a[2:6, 1:5] = 1
  b[2:6, 4:8] = 1
  assert metrics.hausdorff(a, b) == 3.0
  assert metrics.hausdorff(b, a) == 3.0


def test_hd95_ignores_one_outlier_pixel():
  target = np.zeros((32, 32), np.uint8)
  target[2:12, 2:12] = 1  # 36 boundary pixels.
  pred = target.copy()
  pred[11, 21] = 1  # 10 px from the square's right edge.
  assert metrics.hausdorff(pred, target) == 10.0
  # 73 pooled distances: 72 zeros and one 10; the 95th percentile falls among the zeros.
  assert metrics.hausdorff(pred, target, percentile=95.0) == 0.0
  # Linear interpolation at rank 0.99 * 72 = 71.28 between the last zero and the 10.
  assert metrics.hausdorff(pred, target, percentile=99.0) == pytest.approx(2.8)


def test_hausdorff_boundary_versus_foreground_sets():
  filled = np.zeros((11, 11), np.uint8)
  filled[1:10, 1:10] = 1
  outline = filled.copy()
  outline[2:9, 2:9] = 0
  assert metrics.hausdorff(filled, outline) == 0.0  # Same boundary.
  # The filled square's centre pixel is 4 px from the outline.
  assert metrics.hausdorff(filled, outline, boundary=False) == 4.0


def test_hausdorff_empty_cases():
  empty = np.zeros((8, 6), np.uint8)
  one = empty.copy()
  one[3, 3] = 1
  assert metrics.hausdorff(empty, empty) == 0.0
  assert metrics.hausdorff(empty, one) == pytest.approx(math.hypot(7, 5))
  assert metrics.hausdorff(one, empty, percentile=95.0) == pytest.approx(math.hypot(7, 5))


def test_betti_numbers():
  assert metrics.betti_numbers(_ring()) == (1, 1)
  blobs = np.zeros((8, 8), np.uint8)
  blobs[1:3, 1:3] = 1
  blobs[5:7, 4:7] = 1
  assert metrics.betti_numbers(blobs) == (2, 0)
  assert metrics.betti_numbers(np.zeros((5, 5))) == (0, 0)


def test_betti_digital_topology():
  diagonal = np.eye(4, dtype=np.uint8)
  assert metrics.betti_numbers(diagonal) == (1, 0)  # 8-connected foreground.
  diamond = np.zeros((5, 5), np.uint8)
  diamond[1, 2] = diamond[2, 1] = diamond[2, 3] = diamond[3, 2] = 1
  assert metrics.betti_numbers(diamond) == (1, 1)  # Its centre is a 4-connected hole.
  open_to_edge = np.zeros((5, 5), np.uint8)
  open_to_edge[0:3, 0:3] = 1
  open_to_edge[1, 0] = 0  # Enclosed inside the image, but it touches the image edge.
  assert metrics.betti_numbers(open_to_edge) == (1, 0)


def test_betti_errors():
  blobs = np.zeros((7, 7), np.uint8)
  blobs[0:2, 0:2] = 1
  blobs[4:7, 4:7] = 1
  assert metrics.betti_errors(blobs, _ring()) == (1, 1)
  assert metrics.betti_errors(_ring(), _ring()) == (0, 0)


def test_cldice():
  line = np.zeros((12, 12), np.uint8)
  line[5, 0:10] = 1
  half = np.zeros((12, 12), np.uint8)
  half[5, 0:5] = 1
  other = np.zeros((12, 12), np.uint8)
  other[9, 0:10] = 1
  assert metrics.cldice(line, line) == 1.0
  assert metrics.cldice(line, other) == 0.0
  # Skeleton precision 5/5, skeleton sensitivity 5/10: 2 * 1 * 0.5 / 1.5.
  assert metrics.cldice(half, line) == pytest.approx(2 / 3)
  empty = np.zeros((12, 12), np.uint8)
  assert metrics.cldice(empty, empty) == 1.0
  assert metrics.cldice(empty, line) == 0.0
  assert metrics.cldice(line, empty) == 0.0


def _random_batch(seed, n=8, hw=(16, 20)):
  rng = np.random.default_rng(seed)
  probs = rng.uniform(size=(n, *hw, 1)).astype(np.float32)
  targets = (rng.uniform(size=(n, *hw, 1)) < 0.3).astype(np.uint8)
  valid = np.ones((n, *hw, 1), np.float32)
  valid[:, hw[0] - 5:, :, :] = 0  # Padding rows.
  valid[:, :, hw[1] - 3:, :] = 0  # Padding columns.
  return probs, targets, valid


def test_confusion_counts_equals_numpy_and_respects_valid():
  probs, targets, valid = _random_batch(0)
  counts = jax.jit(metrics.confusion_counts)(probs, targets, 0.5, valid)
  for i in range(len(probs)):
    row = metrics.image_metrics(probs[i], targets[i], valid=valid[i], topology=False)
    assert {k: int(counts[k][i]) for k in metrics.COUNT_NAMES} == {
        k: row[k] for k in metrics.COUNT_NAMES}
    inner = slice(None, -5), slice(None, -3)
    pred, truth = probs[i][inner] > 0.5, targets[i][inner] > 0
    assert int(counts['tp'][i]) == np.sum(pred & truth)
    assert int(counts['fp'][i]) == np.sum(pred & ~truth)
    assert int(counts['fn'][i]) == np.sum(~pred & truth)
    assert int(counts['tn'][i]) == np.sum(~pred & ~truth)
  assert counts['tp'].dtype == jnp.int32 and counts['tp'].shape == (8,)
  total = sum(np.asarray(counts[k]) for k in metrics.COUNT_NAMES)
  np.testing.assert_array_equal(total, 11 * 17)


def test_confusion_counts_sharded_over_devices_and_threshold_is_strict():
  probs, targets, _ = _random_batch(1)
  probs[0, 0, 0, 0] = 0.5  # Exactly at the threshold: background, as the reference's `>`.
  targets[0, 0, 0, 0] = 1
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharded = jax.device_put((probs, targets), NamedSharding(mesh, P('data')))
  counts = jax.jit(metrics.confusion_counts)(*sharded)
  unsharded = metrics.confusion_counts(probs, targets)
  for key in metrics.COUNT_NAMES:
    np.testing.assert_array_equal(counts[key], unsharded[key])
  pred = probs[..., 0] > 0.5
  truth = targets[..., 0] > 0
  np.testing.assert_array_equal(counts['fn'], np.sum(~pred & truth, axis=(1, 2)))


def test_image_metrics_keys_and_topology_on_ring():
  ring = _ring().astype(np.float32)
  row = metrics.image_metrics(ring, _ring())
  assert set(metrics.METRIC_NAMES) <= set(row)
  assert row['iou'] == row['cldice'] == row['auc'] == 1.0
  assert row['hd'] == row['hd95'] == row['betti0_error'] == row['betti1_error'] == 0.0
  assert not set(metrics.TOPOLOGY_NAMES) & set(
      metrics.image_metrics(ring, _ring(), topology=False))


def test_summarize_means_and_pooled():
  pred, target = _squares_overlapping_by_two_columns()
  overlapping = metrics.image_metrics(pred.astype(np.float32), target)
  empty = np.zeros((8, 8), np.uint8)
  perfect_empty = metrics.image_metrics(empty.astype(np.float32), empty)
  assert math.isnan(perfect_empty['auc'])
  summary = metrics.summarize([overlapping, perfect_empty])
  assert summary['iou'] == pytest.approx((8 / 24 + 1.0) / 2)
  assert summary['pooled_iou'] == pytest.approx(8 / 24)
  assert summary['pooled_accuracy'] == pytest.approx((8 + 40 + 64) / 128)
  # The NaN AUC of the empty image is skipped. Of the 16 x 48 (positive, negative) pairs, 8 x 40
  # are ordered right and 8 x 8 + 8 x 40 tied: (320 + 0.5 * 384) / 768.
  assert summary['auc'] == overlapping['auc'] == pytest.approx(2 / 3, abs=1e-12)
  # Each square's boundary lies within 2 px of the other's (its outer column is 2 px from the
  # other's nearest column): hd 2, and 0 for the empty image.
  assert (overlapping['hd'], summary['hd']) == (2.0, 1.0)
  assert set(summary) == set(metrics.METRIC_NAMES) | {
      f'pooled_{k}' for k in metrics.OVERLAP_NAMES}
  assert metrics.summarize([]) == {}


# Cross-checks against independent implementations on random seeded cases. The reference
# AUC is the pair-counting definition (and scikit-learn's roc_auc_score where installed);
# the reference distances are scipy's directed_hausdorff and brute-force numpy on boundaries
# found by a 4-neighbour test, not by the erosion and distance transform metrics.py uses.

def _pairwise_auc(scores, positive):
  """P(score of a positive > score of a negative), a tie counting half; NaN if one class."""
  pos, neg = scores[positive], scores[~positive]
  if not pos.size or not neg.size:
    return float('nan')
  greater = (pos[:, None] > neg[None, :]).sum()
  ties = (pos[:, None] == neg[None, :]).sum()
  return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _sklearn_auc(scores, positive):
  roc_auc_score = pytest.importorskip('sklearn.metrics').roc_auc_score
  if positive.all() or not positive.any():
    return float('nan')  # roc_auc_score refuses one class; metrics.auc gives NaN.
  return float(roc_auc_score(positive.astype(int), scores))


def _random_case(seed):
  """(prob, target, valid) with empty masks, all-foreground masks, tied probabilities and
  valid masks excluding pixels among the 20 seeds."""
  rng = np.random.default_rng(seed)
  h, w = rng.integers(3, 20, size=2)
  prob = rng.random((h, w))
  if seed % 3 == 0:  # Few distinct scores: many ties, also between the classes.
    prob = np.round(prob * 3) / 3
  target = rng.random((h, w)) < rng.uniform(0.1, 0.7)
  if seed % 7 == 1:
    target[:] = False
  if seed % 7 == 2:
    target[:] = True
  if seed % 5 == 3:
    prob[:] = 0.25  # An empty prediction at threshold 0.5, every score tied.
  valid = np.ones((h, w), bool)
  if seed % 2:
    valid[rng.integers(1, h + 1):] = False  # Padding rows (possibly none).
    valid &= rng.random((h, w)) > 0.2  # And scattered excluded pixels.
  if seed == 5:  # Positives in the padding only: one class among the valid pixels.
    target[:] = False
    target[-1] = True
    valid[-1] = False
  return prob.astype(np.float32), target.astype(np.uint8), valid.astype(np.uint8)


@pytest.mark.parametrize('reference', [_pairwise_auc, _sklearn_auc],
                         ids=['pairwise', 'sklearn'])
def test_auc_equals_an_independent_implementation(reference):
  nan_cases = set()
  for seed in range(20):
    prob, target, valid = _random_case(seed)
    keep = valid > 0
    scores = prob.astype(np.float64)
    for mask, selected in ((None, np.ones_like(keep)), (valid, keep)):
      got = metrics.auc(prob, target, mask)
      expected = reference(scores[selected], target[selected] > 0)
      if math.isnan(expected):
        nan_cases.add((seed, mask is not None))
        assert math.isnan(got), (seed, got)
      else:
        assert got == pytest.approx(expected, abs=1e-12), seed
    assert metrics.image_metrics(prob, target, valid=valid)['auc'] == pytest.approx(
        reference(scores[keep], target[keep] > 0), abs=1e-12, nan_ok=True), seed
  one_class = {(seed, with_valid) for seed in (1, 2, 8, 9, 15, 16) for with_valid in (False, True)}
  assert nan_cases == one_class | {(5, True)}  # The NaN cases are exercised.


def _boundary_points(mask):
  """(K, 2) coordinates of the foreground pixels with a 4-neighbour in the background or
  outside the image."""
  framed = np.pad(mask, 1, constant_values=False)
  interior = (framed[:-2, 1:-1] & framed[2:, 1:-1] & framed[1:-1, :-2] & framed[1:-1, 2:])
  return np.argwhere(mask & ~interior)


def _nearest_distances(a, b):
  """For each point of a, the Euclidean distance to the nearest point of b (brute force)."""
  return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def _reference_distances(pred, target, boundary=True):
  """(hd by scipy, hd95 by brute-force numpy) with metrics.py's empty-mask conventions."""
  if not pred.any() and not target.any():
    return 0.0, 0.0
  if not pred.any() or not target.any():
    diagonal = math.hypot(pred.shape[0] - 1, pred.shape[1] - 1)
    return diagonal, diagonal
  points = _boundary_points if boundary else np.argwhere
  a, b = points(pred), points(target)
  hd = max(spatial_distance.directed_hausdorff(a, b)[0],
           spatial_distance.directed_hausdorff(b, a)[0])
  pooled = np.concatenate([_nearest_distances(a, b), _nearest_distances(b, a)])
  return hd, float(np.percentile(pooled, 95))


def _random_masks(seed):
  """Two (H, W) masks: sparse or dense noise, unions of two rectangles (L shapes, crosses,
  lines, often touching the image edge), empty or the whole image."""
  rng = np.random.default_rng(100 + seed)
  h, w = rng.integers(4, 40, size=2)
  masks = []
  for _ in range(2):
    # Dense noise has interior pixels whose only background neighbours are diagonal.
    mask = rng.random((h, w)) < rng.uniform(*((0.5, 0.95) if seed % 3 == 1 else (0.05, 0.5)))
    if seed % 3 == 0:
      mask[:] = False
      for _ in range(2):
        top, left = rng.integers(0, h), rng.integers(0, w)
        mask[top:top + rng.integers(1, h + 1), left:left + rng.integers(1, w + 1)] = True
    masks.append(mask)
  pred, target = masks
  if seed % 10 == 4:
    pred[:] = False
  if seed % 10 == 7:
    target[:] = False
  if seed == 9:
    pred[:] = target[:] = False
  if seed == 12:
    target[:] = True  # The whole image: its boundary is the image's edge.
  return pred, target


def test_hausdorff_and_hd95_equal_scipy_and_brute_force():
  for seed in range(20):
    pred, target = _random_masks(seed)
    for boundary in (True, False):
      hd, hd95 = _reference_distances(pred, target, boundary)
      assert metrics.hausdorff(pred, target, boundary=boundary) == pytest.approx(
          hd, abs=1e-12), (seed, boundary)
      assert metrics.hausdorff(pred, target, 95.0, boundary) == pytest.approx(
          hd95, abs=1e-12), (seed, boundary)
      assert metrics.hausdorff(target, pred, 95.0, boundary) == pytest.approx(
          hd95, abs=1e-12), (seed, boundary)


def test_image_metrics_distances_treat_invalid_pixels_as_background():
  for seed in range(20):
    prob, target, valid = _random_case(seed)
    row = metrics.image_metrics(prob, target, valid=valid, topology=False)
    keep = valid > 0
    hd, hd95 = _reference_distances((prob > 0.5) & keep, (target > 0) & keep)
    assert (row['hd'], row['hd95']) == (pytest.approx(hd, abs=1e-12),
                                        pytest.approx(hd95, abs=1e-12)), seed


def test_mask_iou_counts_pixels_and_takes_nonzero_for_foreground():
  pred = np.zeros((4, 4), np.uint8)
  pred[:2, :2] = 255  # 4 pixels
  target = np.zeros((4, 4), np.uint16)
  target[1:3, 1:3] = 7  # a label; 4 pixels, 1 shared with pred
  assert metrics.mask_iou(pred, target) == 1 / 7
  assert metrics.mask_iou(pred, pred > 0) == 1.0
  assert metrics.mask_iou(np.zeros((3, 3)), np.zeros((3, 3), bool)) == 1.0
  assert metrics.mask_iou(pred, np.zeros((4, 4))) == 0.0
