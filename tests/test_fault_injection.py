"""Kill -9 during training, resume, same result: the fault-injection harness at its tiniest.

`experiments/benchmarks/fault_injection.py` trains a reference, repeats it (same seed: identical
final state, logged metrics and test metrics), then kills fresh runs at random moments (most land
inside a checkpoint save), reruns them to the end and compares their final train state and
test metrics with the reference's, bit for bit. A deletion of an old checkpoint cut short
is tested in tests/test_checkpoint.py.
"""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from flmiseg.store import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_killed_and_resumed_runs_equal_the_uninterrupted_one(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  # The harness sets the device count of the runs it starts and keeps our other XLA flags.
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.fault_injection', '--runs=1', '--steps=4',
       '--max_kills=1', '--fast_compile', '--seed=1', f'--workdir={tmp_path}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout
  assert result.returncode == 0, (output + result.stderr)[-3000:]
  assert 'uninterrupted repeat of the reference: exact;' in output, output
  runs = re.findall(r'^run +\d+: (.*)$', output, re.MULTILINE)
  assert len(runs) == 1 and all(r.endswith('; exact') for r in runs), output
  assert re.search(r'^1 runs?, 1 exact \(\d+ kills landed during a checkpoint save\)$', output,
                   re.MULTILINE), output
  # Each run was killed once, then resumed from a complete checkpoint (or from scratch).
  assert all(re.match(r'killed at [\d.]+ s( \(during a save\))?; resumed from step [0-4];', r)
             or r.startswith('finished before the kill') for r in runs), runs


def _state(value):
  return {'w': np.full((8,), value, np.float32)}


def test_a_half_written_checkpoint_is_never_the_latest_and_is_cleaned_up(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(1, _state(1), {'position': 1}, {'step': 1}, None)
  ckpt.close()
  # What a kill -9 during the save of step 2 leaves: orbax's unfinished tmp folder.
  partial = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'manifest.ocdbt').write_bytes(b'\x0c\xdb half')
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 1
  state, data_state, record = ckpt.restore_last(checkpoint.abstract(_state(0)))
  assert record['step'] == 1 and data_state == {'position': 1}
  assert np.all(state['w'] == 1)
  ckpt.save(2, _state(2), {'position': 2}, {'step': 2}, None)
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1', '2']

