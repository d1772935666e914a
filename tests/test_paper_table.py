"""experiments/paper/paper_table.py: the table's arithmetic and verdict, and one real cell."""

import csv
import json

import numpy as np
import pytest
from scipy import stats

from experiments.paper import paper_table
from tests import helpers


def _cell(iou, per_image):
  return {'iou': iou, 'f1': 2 * iou / (1 + iou), 'per_image_iou': per_image, 'seconds': 1.0}


def test_paired_test_pairs_same_image_and_seed():
  orig = [_cell(.5, {'a': .4, 'b': .5, 'c': .6}), _cell(.6, {'a': .5, 'b': .6, 'c': .7})]
  low = [_cell(.7, {'a': .6, 'b': .75, 'c': .65}), _cell(.7, {'a': .7, 'b': .9, 'c': .72})]
  p, pairs = paper_table.paired_test(orig, low)
  expected = stats.wilcoxon([.6, .75, .65, .7, .9, .72], [.4, .5, .6, .5, .6, .7]).pvalue
  assert pairs == 6 and p == pytest.approx(expected)
  assert paper_table.paired_test(orig, orig) == (1.0, 6)


def test_paired_test_on_shared_data_pairs_each_image_once_averaged_over_seeds():
  orig = [_cell(.5, {'a': .4, 'b': .5, 'c': .6}), _cell(.6, {'a': .5, 'b': .6, 'c': .7})]
  low = [_cell(.7, {'a': .6, 'b': .75, 'c': .65}), _cell(.7, {'a': .7, 'b': .9, 'c': .72})]
  p, pairs = paper_table.paired_test(orig, low, same_data=True)
  expected = stats.wilcoxon([.65, .825, .685], [.45, .55, .65]).pvalue
  assert pairs == 3 and p == pytest.approx(expected)


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


def test_converged_preset_holds_the_data_fixed_across_model_seeds():
  configs = [paper_table.cell_config('converged', 'er', 'segnet', 'lowlevel', seed, lr=1e-2)
             for seed in (0, 2)]
  assert [c.seed for c in configs] == [0, 2] and {c.data.seed for c in configs} == {0}
  config = configs[1]
  assert (config.optim.lr, config.model.width, config.train.num_steps,
          config.eval.every_steps) == (1e-2, 8, paper_table.CONVERGED_STEPS,
                                       paper_table.CONVERGED_EVERY)
  assert paper_table.cell_config('converged', 'er', 'unet', 'original', 1).optim.lr == 2e-3


def test_plateau_rule_and_learning_rate_choice_on_validation():
  flat = [[40, .5], [80, .70], [120, .703], [160, .7048]]
  assert paper_table.plateaued(flat)
  assert not paper_table.plateaued(flat[:-1] + [[160, .7051]])  # spread .0051 > .005
  assert not paper_table.plateaued(flat[-2:])  # fewer validations than the rule needs
  sweep = {1e-3: {'val_curve': [[40, .6], [80, .71]]},
           3e-3: {'val_curve': [[40, .73], [80, .72]]},  # best validation anywhere: .73
           1e-2: {'val_curve': [[40, .73], [80, .1]]}}  # tie on .73: the smaller rate wins
  assert paper_table.choose_lr(sweep) == 3e-3


def test_sweep_table_names_learning_rates_and_plateaued_seeds():
  flat, rising = [[1, .7], [2, .7], [3, .7]], [[1, .5], [2, .6], [3, .7]]
  results = {('er', 'fcn', 'original'): [_cell(.5, {'a': .5}) | {'val_curve': rising},
                                         _cell(.5, {'a': .5}) | {'val_curve': flat}],
             ('er', 'fcn', 'lowlevel'): [_cell(.7, {'a': .7}) | {'val_curve': flat}] * 2}
  lrs = {('er', 'fcn', 'original'): 1e-3, ('er', 'fcn', 'lowlevel'): 1e-2}
  table, rows, _ = paper_table.make_table(results, ['er'], ['fcn'], 2, lrs)
  assert [(r['lr'], r['plateau']) for r in rows] == [('0.001', '1/2'), ('0.01', '2/2')]
  assert table.splitlines()[0].endswith('| lr | plateaued seeds |')
  assert table.splitlines()[3].endswith('| 0.01 | 2/2 |')


def test_val_curve_counts_a_step_validated_again_after_a_resume_once(tmp_path):
  lines = [{'step': 40, 'kind': 'train', 'loss': 1.0}, {'step': 40, 'kind': 'val', 'iou': .5},
           {'step': 80, 'kind': 'val', 'iou': .6}, {'step': 80, 'kind': 'val', 'iou': .61},
           {'step': 120, 'kind': 'val', 'iou': .7}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  assert paper_table.val_curve(tmp_path) == [[40, .5], [80, .61], [120, .7]]
  assert paper_table.val_curve(tmp_path / 'missing') == []


def test_claims_hold_grow_shrink_or_reverse_against_another_table():
  before = [{'kind': 'er', 'model': m, 'delta_iou': d} for m, d in
            (('fcn', '+0.026'), ('segnet', '+0.597'), ('hrnetv2', '+0.300'))] + [
                {'kind': 'er', 'model': 'unet', 'delta_iou': ''}]
  rows = [{'kind': 'er', 'model': 'fcn', 'delta_iou': '+0.040', 'p_value': '0.001'},
          {'kind': 'er', 'model': 'segnet', 'delta_iou': '+0.100', 'p_value': '1e-9'},
          {'kind': 'er', 'model': 'hrnetv2', 'delta_iou': '-0.020', 'p_value': '0.01'},
          {'kind': 'er', 'model': 'deeplabv3p', 'delta_iou': '+0.010', 'p_value': '0.2'},
          {'kind': 'er', 'model': 'unet', 'delta_iou': '', 'p_value': ''}]
  lines = paper_table.compare_claims(rows, before, '60 steps').splitlines()
  assert [line.rsplit('|', 2)[1].strip() for line in lines[2:]] == [
      'holds, grows', 'holds, shrinks', 'reverses', 'not significant']
  assert lines[2] == '| er | fcn | +0.026 | +0.040 | 0.001 | holds, grows |'
  assert '| er | deeplabv3p | – |' in lines[5]


def test_a_new_workdir_finishes_the_table_from_recorded_cells(tmp_path):
  """Cells finished in an earlier sitting (--results) rebuild the sweep and the table in a
  fresh workdir without training anything."""
  cells = tmp_path / 'cells'
  for lr, best in ((1e-3, .6), (3e-3, .8), (1e-2, .7)):
    record = cells / 'er' / 'unet_original' / f'lr{lr:g}' / 'seed0' / 'result.json'
    record.parent.mkdir(parents=True)
    curve = [[40, best - .2], [80, best], [120, best], [160, best]]
    record.write_text(json.dumps(_cell(best, {'a': best}) | {'val_curve': curve}))
  workdir = tmp_path / 'fresh'
  result = helpers.run_cli(['--preset=converged', '--kinds=er', '--models=unet', '--seeds=1',
                            f'--workdir={workdir}', f'--results={cells}'],
                           module='experiments.paper.paper_table', devices=1, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  sweep = json.loads((workdir / 'er' / 'unet_original' / 'sweep.json').read_text())
  assert sweep['chosen_lr'] == 3e-3 and not (workdir / 'er' / 'unet_original' / 'lr0.003').exists()
  assert '| er | unet | original | 0.800 ± 0.000 |' in (workdir / 'table.md').read_text()


def _val(best):
  return {'val_curve': [[40, best - 0.1], [80, best]]}


def test_a_climbing_sweep_stops_at_the_first_rung_that_does_not_improve():
  tried = []

  def run_at(best_by_lr):
    def run(lr):
      tried.append(lr)
      return _val(best_by_lr[lr])
    return run

  runs = paper_table.climb(1e-2, run_at({1e-2: .80, 3e-2: .85, 1e-1: .84}))
  assert tried == [1e-2, 3e-2, 1e-1] and paper_table.choose_lr(runs) == 3e-2
  tried.clear()
  runs = paper_table.climb(1e-2, run_at({1e-2: .80, 3e-2: .80}))  # a tie is no improvement
  assert tried == [1e-2, 3e-2] and paper_table.choose_lr(runs) == 1e-2
  tried.clear()
  paper_table.climb(3e-2, run_at({3e-2: .7, 1e-1: .9}))  # the ladder ends at 1e-1
  assert tried == [3e-2, 1e-1]
  tried.clear()
  paper_table.climb(5e-3, run_at({5e-3: .7, 1e-2: .6}))  # off the ladder: joins it above
  assert tried == [5e-3, 1e-2]


def test_sweeps_start_where_other_kinds_chose_and_reuse_a_rate_they_agree_on(tmp_path):
  def record(kind, model, lr, best):
    path = tmp_path / kind / model / f'lr{lr:g}' / 'seed0' / 'result.json'
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_val(best)))

  record('er', 'fcn_original', 1e-3, .70)
  record('er', 'fcn_original', 1e-2, .83)
  record('er', 'fcn_original', 3e-3, .83)  # a tie goes to the smaller rate
  record('mito', 'fcn_original', 3e-3, .6)
  record('er', 'segnet_original', 1e-2, .6)
  er, mito = tmp_path / 'er', tmp_path / 'mito'
  assert paper_table.recorded_choice(er, 'fcn', 'original') == 3e-3
  assert paper_table.recorded_choice(er, 'fcn', 'lowlevel') is None
  choices = [paper_table.recorded_choice(d, 'fcn', 'original') for d in (er, mito)]
  assert paper_table.sweep_start(choices) == (3e-3, True)  # two kinds agree: reused
  choices = [paper_table.recorded_choice(d, 'segnet', 'original') for d in (er, mito)]
  assert paper_table.sweep_start(choices) == (1e-2, False)  # one kind: climb from it
  assert paper_table.sweep_start([1e-2, 3e-2]) == (1e-2, False)  # disagree: from the smaller
  assert paper_table.sweep_start([None, None]) is None


def test_mito_climbs_from_the_rate_er_chose_on_recorded_cells(tmp_path):
  cells = tmp_path / 'cells'
  for kind, lr, best in (('er', 1e-3, .6), ('er', 3e-3, .8), ('er', 1e-2, .7),
                         ('mito', 3e-3, .7), ('mito', 1e-2, .75), ('mito', 3e-2, .74),
                         ('mito', 1e-3, .9)):  # below the start: never looked at
    record = cells / kind / 'unet_original' / f'lr{lr:g}' / 'seed0' / 'result.json'
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(_cell(best, {'a': best}) | {'val_curve': [[40, best]]}))
  workdir = tmp_path / 'fresh'
  result = helpers.run_cli(['--preset=converged', '--kinds=mito', '--models=unet', '--seeds=1',
                            f'--workdir={workdir}', f'--results={cells}',
                            f'--lrs_from={cells / "er"}'],
                           module='experiments.paper.paper_table', devices=1, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  sweep = json.loads((workdir / 'mito' / 'unet_original' / 'sweep.json').read_text())
  assert sweep == {'chosen_lr': 1e-2, 'best_val_iou': {'0.003': .7, '0.01': .75, '0.03': .74}}
  table = (workdir / 'table.md').read_text()
  assert '| mito | unet | original | 0.750 ± 0.000 |' in table and 'climbing from the rates chosen in' in table
