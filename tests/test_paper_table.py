"""experiments/paper_table.py: the table's arithmetic and verdict, and one real cell."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from experiments import paper_table


def _cell(iou, per_image):
  return {'iou': iou, 'f1': 2 * iou / (1 + iou), 'per_image_iou': per_image, 'seconds': 1.0}


def test_paired_test_pairs_same_image_and_seed():
  orig = [_cell(.5, {'a': .4, 'b': .5, 'c': .6}), _cell(.6, {'a': .5, 'b': .6, 'c': .7})]
  low = [_cell(.7, {'a': .6, 'b': .75, 'c': .65}), _cell(.7, {'a': .7, 'b': .9, 'c': .72})]
  p, pairs = paper_table.paired_test(orig, low)
  expected = stats.wilcoxon([.6, .75, .65, .7, .9, .72], [.4, .5, .6, .5, .6, .7]).pvalue
  assert pairs == 6 and p == pytest.approx(expected)
  assert paper_table.paired_test(orig, orig) == (1.0, 6)


def test_make_table_means_deltas_and_verdict():
  images = {'a': .5, 'b': .5}
  results = {('er', 'fcn', 'original'): [_cell(.5, images), _cell(.7, images)],
             ('er', 'fcn', 'lowlevel'): [_cell(.8, {'a': .8, 'b': .9}),
                                         _cell(.8, {'a': .7, 'b': .6})],
             ('er', 'segnet', 'original'): [_cell(.6, images)],
             ('er', 'segnet', 'lowlevel'): [_cell(.55, {'a': .4, 'b': .45})],
             ('er', 'unet', 'original'): [_cell(.9, images)]}
  table, rows, verdict = paper_table.make_table(results, ['er'], ['fcn', 'segnet', 'unet'], 2)
  by = {(r['model'], r['variant']): r for r in rows}
  assert by['fcn', 'original']['iou_mean'] == pytest.approx(.6)
  assert by['fcn', 'original']['iou_std'] == pytest.approx(.1)
  assert by['fcn', 'lowlevel']['delta_iou'] == '+0.200'
  assert by['segnet', 'lowlevel']['delta_iou'] == '-0.050'
  assert by['unet', 'original']['delta_iou'] == ''
  assert '| er | fcn | lowlevel | 0.800 ± 0.000 |' in table
  assert verdict.startswith("The paper's claim holds on 1 of 2") and 'segnet on er' in verdict


def test_one_cell_trains_and_a_rerun_skips_it(tmp_path, monkeypatch):
  monkeypatch.setenv('FLMISEG_CACHE', str(tmp_path / 'cache'))
  config = paper_table.cell_config('tiny', 'er', 'fcn', 'lowlevel', 0)
  assert (config.model.width, config.train.num_steps, config.data.crop_size) == (4, 4, 64)
  reference = paper_table.cell_config('reference', 'mito', 'hrnetv2', 'original', 2)
  assert (reference.model.width, reference.data.kind, reference.seed) == (32, 'mito', 2)
  assert reference.data.seed == 2  # each seed simulates its own data, as the table always did
  assert reference.optim.name == 'sgd' and reference.train.loss == 'soft_iou'
  workdir = tmp_path / 'cell'
  result = paper_table.run_cell(workdir, config)
  summary = json.loads((workdir / 'eval' / 'summary.json').read_text())
  assert (result['iou'], result['f1']) == (summary['iou'], summary['f1'])
  # Each image's IoU is tp / (tp + fp + fn) of its counts in per_image.csv.
  with open(workdir / 'eval' / 'per_image.csv', newline='') as f:
    counts = {row['name']: [int(row[k]) for k in ('tp', 'fp', 'fn')] for row in csv.DictReader(f)}
  assert len(counts) == 4 and result['per_image_iou'] == pytest.approx(
      {name: tp / (tp + fp + fn) for name, (tp, fp, fn) in counts.items()}, rel=1e-12)
  assert np.mean(list(result['per_image_iou'].values())) == pytest.approx(summary['iou'])
  stamp = (workdir / 'result.json').stat().st_mtime_ns
  assert paper_table.run_cell(workdir, config) == result
  assert (workdir / 'result.json').stat().st_mtime_ns == stamp
