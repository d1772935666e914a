"""experiments/shipped/real_data.py: a model on a dataset that flmiseg.data.public built, per
stratum and over all, on small stand-ins of the DSB and ERNet builds (never the real data)."""

import json

import numpy as np
import pytest

from experiments import common
from experiments.shipped import real_data
from flmiseg.core.errors import UserError
from flmiseg.data import public
from tests import helpers
from tests.test_public import _dsb_standin
from tests.test_public import _ernet_standin


def _square(labels, value, top, left, side):
  labels[top:top + side, left:left + side] = value
  return labels


def test_figures_are_pooled_per_stratum_and_over_all():
  """Mean IoU and AP@0.5 pooled over each stratum's images and over all (tp / (tp + fp + fn)
  of the summed counts), of the instances and of the mask's connected components; an image
  the records do not name goes to 'unrecorded'."""
  empty = lambda: np.zeros((20, 20), np.int32)  # noqa: E731
  truth = {'a': _square(_square(empty(), 1, 0, 0, 6), 2, 10, 10, 6),  # two apart
           'b': _square(empty(), 1, 2, 2, 8),
           'c': _square(_square(empty(), 3, 0, 0, 4), 7, 0, 4, 6)}  # two touching
  found = {'a': _square(empty(), 1, 0, 0, 6),  # one of the two: IoU 36/72, AP 1/2 (cc too)
           'b': _square(empty(), 5, 2, 2, 7),  # matched at IoU 49/64: AP 1 (cc too)
           'c': truth['c'] * 2}  # both: IoU 1, AP 1; as one component only the larger, 1/2
  rows = [{'name': k, 'objects': len(np.unique(truth[k])) - 1,
           **common.mask_scores(truth[k], found[k] > 0, found[k])} for k in 'abc']
  rows.append({**rows[1], 'name': 'd'})
  got = real_data.summarize(rows, {'a': 'A', 'b': 'B', 'c': 'A'})
  assert list(got) == ['A', 'B', 'unrecorded', 'all']
  assert got['A'] == {'images': 2, 'objects': 4, 'iou': 0.75, 'ap_0.5': 3 / 4,
                      'ap_0.5_connected_components': 2 / 4}
  assert got['B'] == got['unrecorded'] == {'images': 1, 'objects': 1, 'iou': 49 / 64,
                                           'ap_0.5': 1.0, 'ap_0.5_connected_components': 1.0}
  assert got['all'] == {'images': 4, 'objects': 6, 'iou': (0.5 + 49 / 64 + 1 + 49 / 64) / 4,
                        'ap_0.5': 5 / 6, 'ap_0.5_connected_components': 4 / 6}


def test_a_dsb_build_is_measured_per_stratum(tmp_path):
  """The shipped nucleus model on a built DSB stand-in's val split: one row per stratum the
  manifest records for it, its images and nuclei, the instance scores of label images."""
  src = tmp_path / 'fixes'
  _dsb_standin(src, np.random.default_rng(5))
  summary = public.build_dsb(src, tmp_path / 'dsb', val_fraction=0.2, test_fraction=0.2)
  result = real_data.measure(tmp_path / 'dsb', 'val', ['nucleus'], None)
  figures = result['models']['nucleus']['figures']
  strata = summary['splits']['val']
  assert list(figures) == sorted(strata) + ['all']
  assert {k: f['images'] for k, f in figures.items() if k != 'all'} == strata
  assert figures['all']['images'] == 2 and figures['all']['objects'] == 6
  for f in figures.values():
    assert {'iou', 'ap_0.5', 'ap_0.5_connected_components'} <= set(f)
    assert all(0.0 <= f[k] <= 1.0 for k in ('iou', 'ap_0.5', 'ap_0.5_connected_components'))
  assert figures['all']['iou'] == pytest.approx(np.mean([f['iou'] for k, f in figures.items()
                                                         if k != 'all']))
  assert result['split'] == 'val' and result['machine'] == common.machine()


def test_ernet_is_measured_by_iou_per_stack_and_written_as_json(tmp_path):
  """Binary masks: IoU only, per stack (summary.json); --out writes what the table shows."""
  _ernet_standin(tmp_path / 'ERNet', np.random.default_rng(6))
  public.build_ernet(tmp_path / 'ERNet', tmp_path / 'ernet')
  out = tmp_path / 'ernet.json'
  run = helpers.run_cli([f'--data={tmp_path / "ernet"}', '--split=all', '--model=er',
                         f'--out={out}'], module='experiments.shipped.real_data')
  assert run.returncode == 0, run.stderr
  figures = json.loads(out.read_text())['models']['er']['figures']
  assert {k: f['images'] for k, f in figures.items()} == {'stack1': 2, 'stack2': 2, 'stack3': 1,
                                                           'all': 5}
  assert all(set(f) == {'images', 'iou', *real_data.DISAGREEMENT} for f in figures.values())
  assert f'| **all** | 5 | - | {figures["all"]["iou"]:.3f} | - | - |' in run.stdout
  assert 0 <= figures['all']['precision'] <= 1 and figures['all']['pred_to_truth'] >= 0


def test_disagreement_counts_pixels_and_leaves_out_what_lies_beyond_the_annotated_region():
  truth = np.zeros((60, 60), bool)
  truth[10:20, 10:12] = truth[10:12, 10:20] = True  # an L of 36 px
  pred = np.zeros_like(truth)
  pred[10:20, 10:11] = True  # 10 px of the annotation
  pred[40:44, 50:55] = True  # 20 px in a cell nobody annotated, 20+ px from the hull
  pred[25, 10] = True  # 1 px inside the margin (5 px below the annotation)
  region = public.annotated_region(truth, margin=10)
  assert region[25, 10] and not region[40:44, 50:55].any()
  assert not public.annotated_region(truth, margin=0)[25, 10]
  d = real_data.disagreement(truth, pred)
  assert d['precision'] == pytest.approx(10 / 31) and d['recall'] == pytest.approx(10 / 36)
  assert d['pred_to_truth'] == pytest.approx(31 / 36)
  assert d['iou_in_region'] == pytest.approx(10 / (36 + 1))  # the 20 far pixels left out


def test_bad_data_or_split_is_one_line(tmp_path):
  (tmp_path / 'plain').mkdir()
  (tmp_path / 'data' / 'val' / 'images').mkdir(parents=True)
  (tmp_path / 'data' / 'summary.json').write_text('{}')
  with pytest.raises(UserError, match='not a folder'):
    real_data.split_pairs(tmp_path / 'missing', 'val')
  with pytest.raises(UserError, match=r'not a dataset built by python -m flmiseg.data.public'):
    real_data.split_pairs(tmp_path / 'plain', 'val')
  run = helpers.run_cli([f'--data={tmp_path / "data"}', '--split=test'],
                        module='experiments.shipped.real_data')
  assert run.returncode == 1 and run.stderr.count('\n') == 1
  assert run.stderr.startswith('error: --split=test: ') and 'its splits: val' in run.stderr
