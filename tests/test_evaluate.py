"""Threshold calibration (exact counts on a grid, the choice of threshold) and the test-set
report files (calibration.json, summary 'calibrated', report.md, worst_best.png)."""

import json
import types

from matplotlib import image as mpimg
import numpy as np
import pytest

from flmiseg import evaluate
from flmiseg import metrics
from flmiseg import train
from flmiseg.data import loader
from tests import helpers


def test_grid_holds_the_default_threshold_exactly():
  hundredths = [k / 100 for k in range(1, 100)]  # 0.5 is one of them, exactly
  grid = evaluate.threshold_grid(0.5)
  assert grid.dtype == np.float64 and grid.tolist() == hundredths
  assert evaluate.threshold_grid(0.437).tolist() == sorted(hundredths + [0.437])


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_grid_counts_equal_image_metrics_at_every_threshold(dtype):
  rng = np.random.default_rng(0)
  prob = rng.random((23, 17)).astype(dtype)
  prob[:2] = 0.29  # values exactly on grid thresholds: prob > t is False there
  prob[2, :5] = np.float32(0.5)
  target = rng.random((23, 17)) > 0.6
  grid = evaluate.threshold_grid(0.5)
  counts = evaluate.threshold_counts(prob, target, grid)
  for k, t in enumerate(grid):
    expected = metrics.image_metrics(prob, target, threshold=float(t), topology=False)
    assert {c: int(counts[c][k]) for c in metrics.COUNT_NAMES} == {
        c: expected[c] for c in metrics.COUNT_NAMES}, t


def test_calibration_finds_the_exact_threshold():
  target = np.zeros((8, 8), bool)
  target[2:5, 3:7] = True
  prob = np.where(target, 0.3, 0.1)
  result = evaluate.calibrate([(prob, target), (prob.astype(np.float32), target)], 'iou', 0.5)
  # Every t in [0.1, 0.3) separates perfectly; 0.29 is the nearest of them to 0.5.
  assert result['threshold'] == 0.29
  assert result['val_score'] == 1.0
  assert result['val_score_at_default'] == 0.0  # nothing above 0.5: IoU 0
  assert result['num_val_images'] == 2 and result['metric'] == 'iou'


def test_calibration_means_over_images_and_breaks_ties_towards_the_default():
  # Image A is perfect for t in [0.2, 0.6), image B for t in [0.4, 0.8): both in [0.4, 0.6),
  # where the mean Dice is 1; 0.5 itself is among them.
  truth = np.array([[1, 1, 0, 0]], bool)
  a = np.array([[0.6, 0.7, 0.2, 0.1]])
  b = np.array([[0.8, 0.95, 0.4, 0.3]])
  result = evaluate.calibrate([(a, truth), (b, truth)], 'dice', 0.5)
  assert result['threshold'] == 0.5 and result['val_score'] == 1.0
  assert result['val_score_at_default'] == 1.0
  shifted = evaluate.calibrate([(a, truth), (b, truth)], 'dice', 0.9)
  assert shifted['threshold'] == 0.59  # the perfect range's nearest point to 0.9
  # At 0.9, A predicts nothing (Dice 0) and B one of its two pixels (Dice 2/3).
  assert shifted['val_score_at_default'] == pytest.approx(1 / 3)


def test_bad_calibrate_metric_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"config.eval.calibrate_metric='ioo'.*valid: iou, dice"):
    evaluate.check_calibrate_metric('ioo')
  evaluate.check_calibrate_metric('')
  evaluate.check_calibrate_metric('miou')
  config = helpers.tiny_config(tmp_path, **{'eval.calibrate_metric': 'auc'})
  with pytest.raises(ValueError, match='config.eval.calibrate_metric'):
    train.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()  # refused before training


def test_calibrated_threshold_needs_the_same_checkpoint(tmp_path):
  assert evaluate.calibrated_threshold(tmp_path, 6) is None
  evaluate.write_json_atomic(tmp_path / evaluate.CALIBRATION_FILE,
                             {'threshold': 0.43, 'checkpoint_step': 6})
  assert evaluate.calibrated_threshold(tmp_path, 6) == 0.43
  assert evaluate.calibrated_threshold(tmp_path, 4) is None
  (tmp_path / evaluate.CALIBRATION_FILE).write_text('{"threshold": ')
  assert evaluate.calibrated_threshold(tmp_path, 6) is None
  assert [p.name for p in tmp_path.iterdir()] == [evaluate.CALIBRATION_FILE]


def test_extremes_keep_k_worst_and_k_best_once():
  extremes = evaluate._Extremes(2)
  rng = np.random.default_rng(1)
  preds = {i: rng.random((5, 7)) > 0.5 for i in range(6)}
  for i, iou in enumerate([0.5, 0.1, 0.9, 0.3, 0.7, 0.95]):
    extremes.add(i, iou, preds[i])
  assert len(extremes.masks) == 4  # bounded: only the kept images' packed masks remain
  chosen = extremes.selection()
  assert [(label, i) for label, i, _, _ in chosen] == [
      ('worst 1', 1), ('worst 2', 3), ('best 1', 5), ('best 2', 2)]
  for _, i, _, pred in chosen:
    np.testing.assert_array_equal(pred, preds[i])
  few = evaluate._Extremes(3)
  for i, iou in enumerate([0.4, 0.2, 0.6, 0.8]):
    few.add(i, iou, preds[i])
  assert [i for _, i, _, _ in few.selection()] == [1, 0, 2, 3]


def test_training_calibrates_and_writes_the_report(tmp_path, monkeypatch):
  data_root = helpers.write_blob_dataset(tmp_path / 'blobs', num_train=8, num_test=4)
  config = helpers.tiny_config(data_root, **{'train.num_steps': 2})
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(config, workdir)
  calibration = json.loads((workdir / 'calibration.json').read_text())
  assert calibration['checkpoint_step'] == result['checkpoint_step'] == 2
  assert calibration['num_val_images'] == 2 and calibration['metric'] == 'iou'
  assert calibration['val_score'] >= calibration['val_score_at_default']
  assert evaluate.calibrated_threshold(workdir, 2) == calibration['threshold']
  summary = json.loads((workdir / 'eval/summary.json').read_text())
  tuned = summary['calibrated']
  assert tuned['threshold'] == calibration['threshold']
  assert set(metrics.METRIC_NAMES) <= set(tuned) and 'pooled_iou' in tuned
  assert tuned['auc'] == summary['auc']  # AUC does not depend on the threshold
  report = (workdir / 'eval/report.md').read_text()
  assert f'(t={calibration["threshold"]:g})' in report and 'pooled' in report
  assert f'| iou | {summary["iou"]:.4f} | {summary["pooled_iou"]:.4f} |' in report
  table = evaluate.format_table(summary)
  assert f'calibrated (t={calibration["threshold"]:g})' in table.splitlines()[0]
  # 4 test images, k = 3: the 3 worst, and the 1 remaining as the best, one row each.
  assert _png_height(workdir / 'eval/worst_best.png') == _expected_height(4)
  # --mode=eval calibrates when calibration.json is missing ...
  (workdir / 'calibration.json').unlink()
  again = train.evaluate_best(config, workdir)
  assert json.loads((workdir / 'calibration.json').read_text()) == calibration
  assert again['calibrated'] == tuned
  # ... and reuses it for the same best checkpoint, without sweeping again.
  monkeypatch.setattr(evaluate, 'calibrate_source', None)
  assert train.calibrate_best(config, workdir, None, None, None, None, 2) == calibration


def test_no_validation_split_means_no_calibration(tmp_path):
  config = helpers.tiny_config(tmp_path, **{'data.val_fraction': 0.0})
  no_val = loader.Datasets(train=object(), val=None, test=None)
  assert train.calibrate_best(config, tmp_path, no_val, None, None, None, 6) is None
  assert not (tmp_path / 'calibration.json').exists()
  config.eval.calibrate_metric = ''
  assert train.calibrate_best(config, tmp_path, None, None, None, None, 6) is None
  summary = {'iou': 0.5, 'pooled_iou': 0.625, 'auc': float('nan'), 'num_images': 2,
             'threshold': 0.5, 'checkpoint_step': 6}
  assert 'calibrated' not in evaluate.format_table(summary)
  report = evaluate.markdown_report(summary)
  assert 'Calibrated threshold: none' in report
  assert '| iou | 0.5000 | 0.6250 |' in report and '| auc | n/a |  |' in report


def test_worst_best_figure_of_a_small_set(tmp_path):
  rng = np.random.default_rng(0)
  files, extremes = [], evaluate._Extremes(3)
  for i in range(2):
    np.save(tmp_path / f'image{i}.npy', rng.normal(size=(20, 24)).astype(np.float32))
    np.save(tmp_path / f'mask{i}.npy', (rng.random((20, 24)) > 0.5).astype(np.uint8))
    files.append((str(tmp_path / f'image{i}.npy'), str(tmp_path / f'mask{i}.npy')))
    extremes.add(i, 0.2 + 0.5 * i, rng.random((20, 24)) > 0.5)
  source = types.SimpleNamespace(files=files, names=['a', 'b'])
  path = tmp_path / 'worst_best.png'
  assert evaluate.write_worst_best(source, extremes.selection(), 0.5, path) == 2
  assert _png_height(path) == _expected_height(2)


def _png_height(path) -> int:
  return mpimg.imread(path).shape[0]


def _expected_height(rows: int) -> int:
  return round(evaluate.FIGURE_DPI * (rows * evaluate.ROW_INCHES + evaluate.HEADER_INCHES))
