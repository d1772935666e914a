"""Threshold calibration (exact counts on a grid, the choice of threshold), the test-set
metrics (the device's counts, one mask read per image) and the report files
(calibration.json, summary 'calibrated', report.md, worst_best.png)."""

import collections
import csv
import json
import math
import types

from matplotlib import image as mpimg
import numpy as np
import pytest

from flmiseg.evaluation import best_checkpoint
from flmiseg.evaluation import calibration as calibration_lib
from flmiseg.evaluation import evaluate
from flmiseg.evaluation import metrics
from flmiseg.evaluation import report
from flmiseg.train import steps
from flmiseg.train import trainer
from flmiseg.data import dataset
from flmiseg.data import loader
from flmiseg.core.errors import UserError
from tests import helpers


def test_grid_holds_the_default_threshold_exactly():
  hundredths = [k / 100 for k in range(1, 100)]  # 0.5 is one of them, exactly
  grid = calibration_lib.threshold_grid(0.5)
  assert grid.dtype == np.float64 and grid.tolist() == hundredths
  assert calibration_lib.threshold_grid(0.437).tolist() == sorted(hundredths + [0.437])


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_grid_counts_equal_image_metrics_at_every_threshold(dtype):
  rng = np.random.default_rng(0)
  prob = rng.random((23, 17)).astype(dtype)
  prob[:2] = 0.29  # values exactly on grid thresholds: prob > t is False there
  prob[2, :5] = np.float32(0.5)
  target = rng.random((23, 17)) > 0.6
  grid = calibration_lib.threshold_grid(0.5)
  counts = calibration_lib.threshold_counts(prob, target, grid)
  for k, t in enumerate(grid):
    expected = metrics.image_metrics(prob, target, threshold=float(t), topology=False)
    assert {c: int(counts[c][k]) for c in metrics.COUNT_NAMES} == {
        c: expected[c] for c in metrics.COUNT_NAMES}, t


def test_calibration_finds_the_exact_threshold():
  target = np.zeros((8, 8), bool)
  target[2:5, 3:7] = True
  prob = np.where(target, 0.3, 0.1)
  result = calibration_lib.calibrate([(prob, target), (prob.astype(np.float32), target)],
                                     'iou', 0.5)
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
  result = calibration_lib.calibrate([(a, truth), (b, truth)], 'dice', 0.5)
  assert result['threshold'] == 0.5 and result['val_score'] == 1.0
  assert result['val_score_at_default'] == 1.0
  shifted = calibration_lib.calibrate([(a, truth), (b, truth)], 'dice', 0.9)
  assert shifted['threshold'] == 0.59  # the perfect range's nearest point to 0.9
  # At 0.9, A predicts nothing (Dice 0) and B one of its two pixels (Dice 2/3).
  assert shifted['val_score_at_default'] == pytest.approx(1 / 3)


def test_bad_calibrate_metric_is_refused_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"config.eval.calibrate_metric='ioo'.*valid: iou, dice"):
    calibration_lib.check_calibrate_metric('ioo')
  calibration_lib.check_calibrate_metric('')
  calibration_lib.check_calibrate_metric('miou')
  config = helpers.tiny_config(tmp_path, **{'eval.calibrate_metric': 'auc'})
  with pytest.raises(UserError, match="^config.eval.calibrate_metric='auc' is not a per-image"):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run' / 'checkpoints').exists()  # refused before training


def test_calibrated_threshold_needs_the_same_checkpoint(tmp_path):
  assert calibration_lib.calibrated_threshold(tmp_path, 6) is None
  calibration_lib.write_calibration(tmp_path, {'threshold': 0.43, 'checkpoint_step': 6})
  assert calibration_lib.calibrated_threshold(tmp_path, 6) == 0.43
  assert calibration_lib.calibrated_threshold(tmp_path, 4) is None
  (tmp_path / calibration_lib.CALIBRATION_FILE).write_text('{"threshold": ')
  assert calibration_lib.calibrated_threshold(tmp_path, 6) is None
  assert [p.name for p in tmp_path.iterdir()] == [calibration_lib.CALIBRATION_FILE]


def test_extremes_keep_k_worst_and_k_best_once():
  extremes = report.Extremes(2)
  rng = np.random.default_rng(1)
  preds = {i: rng.random((5, 7)) > 0.5 for i in range(6)}
  truths = {i: rng.random((5, 7)) > 0.5 for i in range(6)}
  for i, iou in enumerate([0.5, 0.1, 0.9, 0.3, 0.7, 0.95]):
    extremes.add(i, iou, preds[i], truths[i])
  assert len(extremes.masks) == 4  # bounded: only the kept images' packed masks remain
  chosen = extremes.selection()
  assert [(label, i) for label, i, _, _, _ in chosen] == [
      ('worst 1', 1), ('worst 2', 3), ('best 1', 5), ('best 2', 2)]
  for _, i, _, pred, truth in chosen:
    np.testing.assert_array_equal(pred, preds[i])
    np.testing.assert_array_equal(truth, truths[i])
  few = report.Extremes(3)
  for i, iou in enumerate([0.4, 0.2, 0.6, 0.8]):
    few.add(i, iou, preds[i], truths[i])
  assert [i for _, i, _, _, _ in few.selection()] == [1, 0, 2, 3]


def test_training_calibrates_and_writes_the_report(tmp_path, monkeypatch):
  data_root = helpers.write_blob_dataset(tmp_path / 'blobs', num_train=8, num_test=4)
  config = helpers.tiny_config(data_root, **{'train.num_steps': 2})
  workdir = tmp_path / 'run'
  result = trainer.train_and_evaluate(config, workdir)
  calibration = json.loads((workdir / 'calibration.json').read_text())
  assert calibration['checkpoint_step'] == result['checkpoint_step'] == 2
  assert calibration['num_val_images'] == 2 and calibration['metric'] == 'iou'
  assert calibration['val_score'] >= calibration['val_score_at_default']
  assert calibration_lib.calibrated_threshold(workdir, 2) == calibration['threshold']
  summary = json.loads((workdir / 'eval/summary.json').read_text())
  tuned = summary['calibrated']
  assert tuned['threshold'] == calibration['threshold']
  assert set(metrics.METRIC_NAMES) <= set(tuned) and 'pooled_iou' in tuned
  assert tuned['auc'] == summary['auc']  # AUC does not depend on the threshold
  markdown = (workdir / 'eval/report.md').read_text()
  assert f'(t={calibration["threshold"]:g})' in markdown and 'pooled' in markdown
  assert f'| iou | {summary["iou"]:.4f} | {summary["pooled_iou"]:.4f} |' in markdown
  table = report.format_table(summary)
  assert f'calibrated (t={calibration["threshold"]:g})' in table.splitlines()[0]
  # 4 test images, k = 3: the 3 worst, and the 1 remaining as the best, one row each.
  assert _png_height(workdir / 'eval/worst_best.png') == _expected_height(4)
  # --mode=eval calibrates when calibration.json is missing ...
  (workdir / 'calibration.json').unlink()
  again = best_checkpoint.evaluate_best(config, workdir,
                                        steps.jit_predict(config.eval.threshold))
  assert json.loads((workdir / 'calibration.json').read_text()) == calibration
  assert again['calibrated'] == tuned
  # ... and reuses it for the same best checkpoint, without sweeping again.
  monkeypatch.setattr(calibration_lib, 'calibrate_source', None)
  assert best_checkpoint.calibrate_best(config, workdir, None, None, None, None,
                                        2) == calibration


def test_no_validation_split_means_no_calibration(tmp_path):
  config = helpers.tiny_config(tmp_path, **{'data.val_fraction': 0.0})
  no_val = loader.Datasets(train=object(), val=None, test=None)
  assert best_checkpoint.calibrate_best(config, tmp_path, no_val, None, None, None, 6) is None
  assert not (tmp_path / 'calibration.json').exists()
  config.eval.calibrate_metric = ''
  assert best_checkpoint.calibrate_best(config, tmp_path, None, None, None, None, 6) is None
  summary = {'iou': 0.5, 'pooled_iou': 0.625, 'auc': float('nan'), 'num_images': 2,
             'threshold': 0.5, 'checkpoint_step': 6}
  assert 'calibrated' not in report.format_table(summary)
  markdown = report.markdown_report(summary)
  assert 'Calibrated threshold: none' in markdown
  assert '| iou | 0.5000 | 0.6250 |' in markdown and '| auc | n/a |  |' in markdown


def test_worst_best_figure_of_a_small_set(tmp_path):
  rng = np.random.default_rng(0)
  files, extremes = [], report.Extremes(3)
  for i in range(2):
    np.save(tmp_path / f'image{i}.npy', rng.normal(size=(20, 24)).astype(np.float32))
    truth = rng.random((20, 24)) > 0.5
    np.save(tmp_path / f'mask{i}.npy', truth.astype(np.uint8))
    files.append((str(tmp_path / f'image{i}.npy'), str(tmp_path / f'mask{i}.npy')))
    extremes.add(i, 0.2 + 0.5 * i, rng.random((20, 24)) > 0.5, truth)
  source = types.SimpleNamespace(files=files, names=['a', 'b'])
  path = tmp_path / 'worst_best.png'
  assert report.write_worst_best(source, extremes.selection(), 0.5, path) == 2
  assert _png_height(path) == _expected_height(2)


@pytest.fixture(scope='module')
def untrained(tmp_path_factory):
  """(predict at 0.5, state, test source, mesh): an untrained width-4 U-Net, whose
  probabilities crowd around 0.5, on 5 test images with label masks."""
  root = tmp_path_factory.mktemp('untrained')
  config = helpers.tiny_config(helpers.write_blob_dataset(root / 'data', num_train=4,
                                                          num_test=5, labels=True))
  data = loader.load(config, root / 'cache')
  setup = trainer.build(config, (32, 32), len(data.train))
  return steps.jit_predict(0.5), setup.state, data.test, setup.mesh


def _host_rows(untrained, threshold: float) -> list[dict]:
  """`metrics.image_metrics` of every test image, from the masks on disk: the host-side path
  that the evaluation used before it took the device's counts."""
  predict, state, source, mesh = untrained
  return [metrics.image_metrics(outputs[..., 0], np.load(source.files[i][1]), threshold)
          for i, outputs, _ in evaluate.predictions(predict, state, source, mesh, 2)]


def _same(a: float, b: float) -> bool:
  return a == b or (math.isnan(a) and math.isnan(b))


def test_device_counts_give_the_host_metrics_exactly(untrained, tmp_path, monkeypatch):
  predict, state, source, mesh = untrained
  reads = collections.Counter()
  load = dataset.load_array
  monkeypatch.setattr(dataset, 'load_array', lambda path: reads.update([path]) or load(path))
  calibration = {'threshold': 0.45, 'metric': 'iou', 'num_val_images': 2, 'val_score': 0.5,
                 'val_score_at_default': 0.4}  # as `calibration_lib.calibrate` returns
  evaluate.drain(evaluate.predictions(predict, state, source, mesh, 2))
  pipeline = [reads[mask] for _, mask in source.files]  # the device's input
  summary = evaluate.evaluate(predict, state, source, mesh, 2, 0.5, out_dir=tmp_path,
                              calibration=calibration)
  # Beyond the input pipeline's, one read of each mask (and label image) for every host
  # metric at both thresholds, the instances and worst_best.png (which shows all 5).
  assert [reads[mask] - 2 * n for (_, mask), n in zip(source.files, pipeline)] == [1] * 5
  assert [reads[labels] for labels in source.labels] == [1] * 5
  fixed, tuned = _host_rows(untrained, 0.5), _host_rows(untrained, 0.45)
  assert sum(row['tp'] + row['fp'] for row in fixed) > 0  # something is predicted
  for got, expected in ((summary, metrics.summarize(fixed)),
                        (summary['calibrated'], metrics.summarize(tuned))):
    assert [k for k in expected if not _same(got[k], expected[k])] == []
  with open(tmp_path / 'per_image.csv') as f:
    rows = list(csv.DictReader(f))
  for row, expected in zip(rows, fixed, strict=True):
    assert list(row)[1:len(expected) + 1] == list(expected)  # the same columns, in order
    assert {k: int(row[k]) for k in metrics.COUNT_NAMES} == {
        k: expected[k] for k in metrics.COUNT_NAMES}
    assert [k for k in expected if not _same(float(row[k]), expected[k])] == []


def test_counts_for_another_threshold_are_recounted_on_the_host(untrained, caplog):
  predict, state, source, mesh = untrained

  def at_0_3(state, batch):  # the outputs of `predict`, the counts of another threshold
    probs, _ = predict(state, batch)
    return probs, metrics.confusion_counts(probs[..., :1], batch['mask'], 0.3, batch['valid'])
  summary = evaluate.evaluate(at_0_3, state, source, mesh, 2, 0.5)
  assert 'counts are not at threshold 0.5' in caplog.text
  expected = metrics.summarize(_host_rows(untrained, 0.5))
  assert [k for k in expected if not _same(summary[k], expected[k])] == []


def test_instance_truth_of_a_binary_mask_needs_no_second_read(tmp_path):
  config = helpers.tiny_config(helpers.write_blob_dataset(tmp_path / 'data', num_train=4,
                                                          num_test=2))
  source = loader.load(config, tmp_path / 'cache').test
  assert not source.has_labels
  for i in range(len(source)):
    mask, valid = evaluate.ground_truth(source, i)
    assert valid is None
    np.testing.assert_array_equal(evaluate.instance_truth(source, i, mask),
                                  source.label_image(i))


def _png_height(path) -> int:
  return mpimg.imread(path).shape[0]


def _expected_height(rows: int) -> int:
  return round(report.FIGURE_DPI * (rows * report.ROW_INCHES + report.HEADER_INCHES))
