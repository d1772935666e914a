"""experiments/shipped/failure_modes.py: the groups (dim, large, dense small) and outcomes
(matched, split, merged, pixels found) of hand-made label images with known answers."""

import numpy as np
import tifffile

from experiments.shipped import failure_modes
from flmiseg.data import lists
from flmiseg.objects import matching

# (top, left, height, width) of each annotated nucleus of a 128 x 128 image, labels 1..11.
BOXES = {
    'large_split': (0, 0, 40, 40), 'large_whole': (0, 50, 40, 40),
    'bright': (50, 0, 10, 10), 'dim': (50, 20, 10, 10),
    'touch_a': (70, 0, 8, 8), 'touch_b': (70, 8, 8, 8),  # touching
    'gap1_a': (90, 0, 8, 8), 'gap1_b': (90, 9, 8, 8),  # 1 px apart: 2 px centre to centre
    'gap2_a': (110, 0, 8, 8), 'gap2_b': (110, 10, 8, 8),  # 2 px apart: not dense
    'alone': (110, 60, 8, 8),
}
INDEX = {name: i for i, name in enumerate(BOXES)}


def _box(array, value, top, left, height, width):
  array[top:top + height, left:left + width] = value
  return array


def _scene():
  """(image, truth, labels, mask): the dim nucleus missed (half of it in the mask only), the
  first large one split 24 | 16 columns, the second 36 | 4, the touching pair one instance
  (with a row more, IoU 64/144 each), the rest found exactly."""
  truth = np.zeros((128, 128), np.int32)
  image = np.full((128, 128), 10.0)
  for i, (name, box) in enumerate(BOXES.items()):
    _box(truth, i + 1, *box)
    _box(image, 30.0 if name == 'dim' else 200.0, *box)
  labels = np.where(np.isin(truth, [INDEX['dim'] + 1, INDEX['touch_a'] + 1,
                                    INDEX['touch_b'] + 1]), 0, truth * 10)
  _box(labels, 501, 0, 24, 40, 16)  # large_split: cols 0-23 keep label 10
  _box(labels, 502, 0, 86, 40, 4)  # large_whole: 36 | 4
  _box(labels, 503, 70, 0, 9, 16)  # both touching nuclei and a row below
  mask = labels > 0
  _box(mask, True, 50, 20, 5, 10)  # half of the dim nucleus
  return image, truth, labels, mask


def _names(flags):
  return sorted(name for name, on in zip(BOXES, flags) if on)


def test_groups_of_hand_made_nuclei():
  image, truth, _, _ = _scene()
  got = failure_modes.groups(image, truth)
  assert got['all'].sum() == 11
  assert _names(got['dim']) == ['dim']  # (30 - 10) / (200 - 10) = 0.105
  assert _names(got['large']) == ['large_split', 'large_whole']  # 45.1 px each
  assert _names(got['dense']) == ['gap1_a', 'gap1_b', 'touch_a', 'touch_b']
  np.testing.assert_allclose(failure_modes.brightness(image, truth)[INDEX['dim']], 20 / 190)
  np.testing.assert_allclose(failure_modes.diameters(truth)[INDEX['alone']],
                             np.sqrt(4 * 64 / np.pi))


def test_outcomes_of_hand_made_predictions():
  _, truth, labels, mask = _scene()
  got = failure_modes.outcomes(truth, labels, mask)
  assert _names(~got['matched']) == ['dim', 'touch_a', 'touch_b']
  assert _names(got['split']) == ['large_split']  # 0.6 and 0.4 of it; 0.9 and 0.1 is not
  assert _names(got['merged']) == ['touch_a', 'touch_b']
  assert got['found'][INDEX['dim']] == 50 and got['area'][INDEX['dim']] == 100
  assert got['matched'].sum() == matching.match(truth, labels, 0.5)[0]['tp']
  # An instance that is exactly two halves' union matches one of them (IoU 0.5), as match.
  halves = np.where(np.isin(truth, [INDEX['touch_a'] + 1, INDEX['touch_b'] + 1]), 99, truth)
  assert failure_modes.outcomes(truth, halves)['matched'].sum() == 10 == matching.match(
      truth, halves, 0.5)[0]['tp']


def test_tally_pools_the_images():
  image, truth, labels, mask = _scene()
  one = (failure_modes.groups(image, truth), failure_modes.outcomes(truth, labels, mask))
  got = failure_modes.tally([one, one])
  assert got['all'] == {'nuclei': 22, 'recall': 16 / 22, 'pixels_found': 3798 / 3848,
                        'split_rate': 2 / 22, 'merge_rate': 4 / 22}
  assert got['dim'] == {'nuclei': 2, 'recall': 0.0, 'pixels_found': 0.5, 'split_rate': 0.0,
                        'merge_rate': 0.0}
  assert got['large'] == {'nuclei': 4, 'recall': 1.0, 'pixels_found': 1.0, 'split_rate': 0.5,
                          'merge_rate': 0.0}
  assert got['dense'] == {'nuclei': 8, 'recall': 0.5, 'pixels_found': 1.0, 'split_rate': 0.0,
                          'merge_rate': 0.5}
  empty = failure_modes.tally([])['dim']
  assert empty['nuclei'] == 0 and np.isnan(empty['recall'])


def test_dimmed_pairs_dim_half_the_nuclei_by_the_factor(tmp_path):
  image, truth, _, _ = _scene()
  image = image.astype(np.uint8)
  src = tmp_path / 'src'
  src.mkdir()
  tifffile.imwrite(src / 'a.tif', image)
  tifffile.imwrite(src / 'a_mask.tif', truth.astype(np.uint16))
  pair = lists.Pair(src / 'a.tif', src / 'a_mask.tif', 'test')
  out_dir = tmp_path / 'out'
  out_dir.mkdir()
  (got,) = failure_modes.dimmed_pairs([pair], 0.1, out_dir)
  assert got.mask == pair.mask and got.image.parent == out_dir
  dimmed = tifffile.imread(got.image)
  assert dimmed.dtype == np.float32 and dimmed.shape == image.shape
  kept = changed = 0
  for label in range(1, truth.max() + 1):
    values = dimmed[truth == label]
    original = image[truth == label].astype(np.float32)
    if np.array_equal(values, original):
      kept += 1
    elif label - 1 not in (INDEX['touch_a'], INDEX['touch_b'], INDEX['gap1_a'],
                           INDEX['gap1_b'], INDEX['gap2_a'], INDEX['gap2_b']):
      # Neighbours of a dimmed nucleus within 2 * DIM_EDGE px share its fade: not exact.
      np.testing.assert_allclose(values, 10.0 + 0.1 * (original - 10.0), rtol=1e-6)
      changed += 1
  assert kept > 0 and changed > 0
  again = tmp_path / 'again'
  again.mkdir()
  (second,) = failure_modes.dimmed_pairs([pair], 0.1, again)
  np.testing.assert_array_equal(tifffile.imread(second.image), dimmed)
