"""experiments/benchmarks/scaling.py: the scaling harness over fake devices, and two processes
training in lockstep with exactly the parameters of one."""

import math

import numpy as np
import pytest

from experiments.benchmarks import scaling


def test_two_processes_end_with_the_parameters_of_one(tmp_path):
  result = scaling.two_process_check(tmp_path, steps=4)
  assert result['bit_identical'], result
  assert result['max_abs_diff'] == 0.0
  assert result['arrays'] > 50  # every parameter and BatchNorm statistic of the U-Net
  assert result['one_process']['test'] == result['two_processes']['test']
  # The runs trained: the parameters moved away from their initial values.
  params = scaling.final_params(tmp_path / 'one_process')
  scale = [v for k, v in params.items() if k.endswith("['scale']")]
  assert scale and not all(np.all(s == 1.0) for s in scale)


def test_scaling_harness_over_one_and_two_fake_devices():
  report = scaling.scaling([2], per_device_batch=2, global_batch=4, model='unet', width=4,
                           size=32, repeats=1, steps=1)
  assert report['platform'] == 'cpu' and 'not a speed measurement' in report['note']
  assert [(r['num_devices'], r['global_batch']) for r in report['weak']] == [(1, 2), (2, 4)]
  assert [(r['num_devices'], r['global_batch']) for r in report['strong']] == [(1, 4), (2, 4)]
  # 2 devices x batch 4 is a point of both: timed once.
  assert report['weak'][1]['images_per_s'] == report['strong'][1]['images_per_s']
  for mode in ('weak', 'strong'):
    rows = report[mode]
    assert rows[0]['efficiency'] == pytest.approx(1.0)
    for r in rows:
      assert math.isfinite(r['images_per_s']) and r['images_per_s'] > 0
      assert r['efficiency'] == pytest.approx(
          r['images_per_s'] / (r['num_devices'] * rows[0]['images_per_s']))
  text = scaling.markdown(report, None, 'python -m experiments.benchmarks.scaling')
  assert '## Weak scaling' in text and '| 2 | 4 |' in text


def test_scaling_rejects_a_global_batch_the_counts_do_not_divide():
  with pytest.raises(Exception, match='not divisible'):
    scaling.scaling([4], per_device_batch=1, global_batch=6, model='unet', width=4, size=32,
                    repeats=1, steps=1)
