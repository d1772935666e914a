"""Sparse labels (config.data.ignore_value): mask pixels equal to the ignore value are
excluded from the training loss, the device counts, the calibration and every host-side
metric; ignore_value=-1 keeps every nonzero pixel foreground, as before.

The hand-made 8x8 case (ignore value 2):
  foreground F (value 1): rows 0-3 x cols 0-3                  16 pixels
  ignored I (value 2):    row 7, and rows 0-3 x col 4          12 pixels
  background (value 0):   the rest                             36 pixels
  prediction P (bright image, prob > 0.5): rows 2-5 x cols 2-7 24 pixels
With I ignored: tp = |P & F| = 4, fp = 24 - 4 - |P & I| (2) = 18, fn = 16 - 4 = 12,
tn = 36 - 18 = 18 (52 labelled pixels). With ignore_value=-1 the 2s are foreground (28):
tp = 6, fp = 18, fn = 22, tn = 18.
"""

import csv
import math

import jax
import numpy as np
import pytest
import tifffile

from flmiseg.evaluation import calibration as calibration_lib
from flmiseg.evaluation import evaluate
from flmiseg.train import losses
from flmiseg.evaluation import metrics
from flmiseg.core import sharding
from flmiseg.data import dataset
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import pipeline
from flmiseg.core.errors import UserError

WITH_IGNORE = {'tp': 4, 'fp': 18, 'fn': 12, 'tn': 18}
WITHOUT_IGNORE = {'tp': 6, 'fp': 18, 'fn': 22, 'tn': 18}


def _hand_case():
  mask = np.zeros((8, 8), np.uint8)
  mask[0:4, 0:4] = 1
  mask[7, :] = 2
  mask[0:4, 4] = 2
  image = np.zeros((8, 8), np.uint16)
  image[2:6, 2:8] = 1000  # 'zscore' keeps the order: > 0 (prob > 0.5) exactly here
  return image, mask


def _write(folder, image, mask, name='a'):
  for sub, array in (('images', image), ('masks', mask)):
    (folder / sub).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / sub / f'{name}.tif', array)
  return lists.load_pairs(folder)


def _prepared(tmp_path, ignore_value, mask=None):
  image, hand_mask = _hand_case()
  pairs = _write(tmp_path / 'data', image, hand_mask if mask is None else mask)
  return dataset.prepare(pairs, 'zscore', 'er', tmp_path / 'cache', ignore_value=ignore_value)


def _predict(state, batch):
  del state
  probs = jax.nn.sigmoid(batch['image'])
  return probs, metrics.confusion_counts(probs, batch['mask'], 0.5, batch['valid'])


def test_read_mask_ignore_value(tmp_path):
  tifffile.imwrite(tmp_path / 'm.tif', np.array([[0, 1, 2], [7, 2, 0]], np.uint8))
  assert np.array_equal(io.read_mask(tmp_path / 'm.tif'), [[0, 1, 1], [1, 1, 0]])
  assert np.array_equal(io.read_mask(tmp_path / 'm.tif', 2), [[0, 1, 255], [1, 255, 0]])


def test_exact_loss_and_counts_on_the_hand_case(tmp_path):
  source = _prepared(tmp_path, ignore_value=2)
  batch = next(iter(pipeline.train_dataset(source, crop_size=8, global_batch=1, num_steps=1,
                                           seed=0, flips=False)))
  _, mask = _hand_case()
  np.testing.assert_array_equal(batch['valid'][0, ..., 0], mask != 2)
  np.testing.assert_array_equal(batch['mask'][0, ..., 0], mask == 1)
  # bce of a constant logit log(3) (p = 3/4): log(4/3) on foreground, log(4) on background.
  logits = np.full((1, 8, 8, 1), math.log(3.0), np.float32)
  got = float(losses.bce(logits, batch['mask'], batch['valid']))
  assert got == pytest.approx((16 * math.log(4 / 3) + 36 * math.log(4)) / 52, rel=1e-6)
  everything = float(losses.bce(logits, batch['mask']))  # the 2s as background
  assert everything == pytest.approx((16 * math.log(4 / 3) + 48 * math.log(4)) / 64, rel=1e-6)
  probs = 1 / (1 + np.exp(-batch['image']))
  counts = metrics.confusion_counts(probs, batch['mask'], 0.5, batch['valid'])
  assert {k: int(v[0]) for k, v in counts.items()} == WITH_IGNORE


def test_prepare_caches_a_valid_map_without_the_ignored_pixels(tmp_path):
  source = _prepared(tmp_path, ignore_value=2)
  _, mask = _hand_case()
  element = source[0]
  np.testing.assert_array_equal(element['mask'], mask == 1)  # cached mask stays {0, 1}
  np.testing.assert_array_equal(element['ignored'], mask == 2)
  np.testing.assert_array_equal(source.valid_map(0), mask != 2)
  assert source.subset([0]).ignored == source.ignored  # the validation split keeps it
  eval_batch = next(pipeline.eval_batches(source, global_batch=2))
  h, w = mask.shape  # padded to a multiple of 32, the padding invalid
  np.testing.assert_array_equal(eval_batch['valid'][0, :h, :w, 0], mask != 2)
  assert eval_batch['valid'][0].sum() == (mask != 2).sum()
  assert np.all(eval_batch['valid'][1] == 0)  # the padding entry
  # Another ignore value is another cache entry.
  other = dataset.prepare(lists.load_pairs(tmp_path / 'data'), 'zscore', 'er',
                          tmp_path / 'cache')
  assert other.files[0] != source.files[0] and other.ignored == ()


def test_evaluation_excludes_ignored_pixels(tmp_path):
  source = _prepared(tmp_path, ignore_value=2)
  mesh = sharding.make_mesh()
  [(_, _, device_counts)] = list(evaluate.predictions(_predict, None, source, mesh, 8))
  assert device_counts == WITH_IGNORE
  iou = 4 / (4 + 18 + 12)
  assert evaluate.validation_iou(_predict, None, source, mesh, 8) == pytest.approx(iou)
  calibration = calibration_lib.calibrate_source(_predict, None, source, mesh, 8, 'iou', 0.5)
  assert calibration['val_score_at_default'] == pytest.approx(iou)
  summary = evaluate.evaluate(_predict, None, source, mesh, 8, 0.5, out_dir=tmp_path / 'eval')
  with open(tmp_path / 'eval' / 'per_image.csv') as f:
    [row] = list(csv.DictReader(f))
  assert {k: int(row[k]) for k in metrics.COUNT_NAMES} == WITH_IGNORE
  assert summary['iou'] == pytest.approx(iou)
  # AUC over the 52 labelled pixels: positives 4 bright + 12 dark, negatives 18 + 18;
  # (4 * 18 wins + (4 * 18 + 12 * 18) / 2 ties) / (16 * 36) = 0.375.
  assert summary['auc'] == pytest.approx(0.375)
  assert (tmp_path / 'eval' / 'worst_best.png').is_file()


def test_minus_one_keeps_every_nonzero_pixel_foreground(tmp_path):
  source = _prepared(tmp_path, ignore_value=-1)
  assert source.ignored == () and 'ignored' not in source[0]
  assert source.valid_map(0) is None
  _, mask = _hand_case()
  np.testing.assert_array_equal(source[0]['mask'], mask != 0)
  [(_, _, counts)] = list(evaluate.predictions(_predict, None, source,
                                               sharding.make_mesh(), 8))
  assert counts == WITHOUT_IGNORE
  logits = np.full((1, 8, 8, 1), math.log(3.0), np.float32)
  batch = next(iter(pipeline.train_dataset(source, crop_size=8, global_batch=1, num_steps=1,
                                           seed=0, flips=False)))
  assert np.all(batch['valid'] == 1)
  assert float(losses.bce(logits, batch['mask'], batch['valid'])) == pytest.approx(
      (28 * math.log(4 / 3) + 36 * math.log(4)) / 64, rel=1e-6)


def test_masks_without_ignored_pixels_behave_as_before(tmp_path):
  image, mask = _hand_case()
  mask = np.where(mask == 2, 0, mask).astype(np.uint8)
  plain = dataset.prepare(_write(tmp_path / 'd', image, mask), 'zscore', 'er', tmp_path / 'c')
  sparse = dataset.prepare(lists.load_pairs(tmp_path / 'd'), 'zscore', 'er', tmp_path / 'c',
                           ignore_value=2)
  assert sparse.ignored == () and 'ignored' not in sparse[0]
  kw = dict(crop_size=6, global_batch=1, num_steps=4, seed=0)
  for a, b in zip(pipeline.train_dataset(plain, **kw), pipeline.train_dataset(sparse, **kw)):
    for key in ('image', 'mask', 'valid'):
      np.testing.assert_array_equal(a[key], b[key])


def test_only_real_foreground_counts_for_require_foreground(tmp_path):
  _, mask = _hand_case()
  only_ignored = np.where(mask == 1, 0, mask).astype(np.uint8)
  with pytest.raises(UserError, match='no mask in the set has any foreground'):
    _prepared(tmp_path, ignore_value=2, mask=only_ignored)
  assert len(_prepared(tmp_path, ignore_value=-1, mask=only_ignored)) == 1


@pytest.mark.parametrize('bad', [0, -2, 1.5, '2'])
def test_bad_ignore_value_is_a_one_line_value_error(tmp_path, bad):
  with pytest.raises(ValueError) as e:
    _prepared(tmp_path, ignore_value=bad)
  assert f'config.data.ignore_value={bad!r}' in str(e.value) and '\n' not in str(e.value)
