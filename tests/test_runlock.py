"""One run directory, one live training (flmiseg/core/runlock.py): a second training is refused
with one line naming the live one; the lock of a killed run is taken over and the run
resumes."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from flmiseg.core import runlock
from flmiseg.train import trainer
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_held_lock_refuses_another_naming_pid_and_host(tmp_path):
  first = runlock.RunLock(tmp_path).acquire()
  record = json.loads((tmp_path / runlock.LOCK_FILE).read_text())
  assert (record['pid'], record['host']) == (os.getpid(), socket.gethostname())
  with pytest.raises(runlock.RunDirectoryInUse) as e:
    runlock.RunLock(tmp_path).acquire()  # another open file: flock refuses it
  message = str(e.value)
  assert f'is in use by another training (pid {os.getpid()} on host ' in message
  assert socket.gethostname() in message and '\n' not in message
  first.release()
  assert (tmp_path / runlock.LOCK_FILE).read_text() == ''  # released cleanly
  with runlock.RunLock(tmp_path):
    pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
  # What a killed run leaves: its record in the file, no flock (the kernel dropped it).
  (tmp_path / runlock.LOCK_FILE).write_text(json.dumps({'pid': 2 ** 22 + 7, 'host': 'gone'}))
  with runlock.RunLock(tmp_path):
    record = json.loads((tmp_path / runlock.LOCK_FILE).read_text())
    assert record['pid'] == os.getpid()


def test_a_disabled_lock_takes_nothing(tmp_path):
  with runlock.RunLock(tmp_path, enabled=False):
    assert not (tmp_path / runlock.LOCK_FILE).exists()
    with runlock.RunLock(tmp_path):  # process 0 of the same run still can
      pass


def test_training_on_a_locked_run_directory_stops_before_writing(tmp_path):
  config = helpers.tiny_config(tmp_path / 'no_data_needed')
  (tmp_path / 'run').mkdir()
  with runlock.RunLock(tmp_path / 'run'):
    with pytest.raises(runlock.RunDirectoryInUse, match=f'pid {os.getpid()} '):
      trainer.train_and_evaluate(config, tmp_path / 'run')
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == [runlock.LOCK_FILE]


def _command(data, workdir, num_steps: int, *extra) -> list[str]:
  """The arguments of a tiny CLI training with a checkpoint every 2 steps and no validation
  split."""
  return ['--config=configs/default.py',
          '--config.data.source=lists', f'--config.data.train_list={data}/train.txt',
          f'--config.data.test_list={data}/test.txt', '--config.data.crop_size=32',
          '--config.data.val_fraction=0', '--config.model.width=4',
          f'--config.train.num_steps={num_steps}', '--config.train.batch_size=2',
          '--config.eval.batch_size=2', '--config.train.checkpoint_every_steps=2',
          '--config.eval.every_steps=1000000', '--config.optim.schedule=constant',
          '--config.optim.warmup_steps=0', f'--workdir={workdir}', *extra]


def _saved_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints in the run directory's checkpoint folders."""
  return sorted({int(p.name) for p in workdir.glob('*/*') if p.name.isdigit() and p.is_dir()})


def test_second_training_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
  data = helpers.write_blob_dataset(tmp_path / 'data', num_train=8, num_test=2)
  workdir = tmp_path / 'run'
  run = lambda args: helpers.run_cli(args, devices=2)
  first = subprocess.Popen([sys.executable, '-m', 'flmiseg.main',
                            *_command(data, workdir, 10 ** 6)], cwd=REPO,
                           env=helpers.cli_env(2), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 300
    while not _saved_steps(workdir):  # the first run is training
      assert first.poll() is None and time.monotonic() < deadline, 'no checkpoint in time'
      time.sleep(0.2)
    second = run(_command(data, workdir, 10 ** 6))
    assert first.poll() is None  # both were alive at once
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [l for l in second.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in second.stderr, second.stderr[-2000:]
    assert (f'is in use by another training (pid {first.pid} on host {socket.gethostname()}, '
            'started ') in errors[0], errors[0]
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  saved = _saved_steps(workdir)
  # The same run, asked for two more steps: it takes the lock over and resumes from a
  # checkpoint the killed run wrote (the latest complete one), not from scratch.
  third = run(_command(data, workdir, saved[-1] + 2, '--config.train.resume_mismatch=allow'))
  assert third.returncode == 0, third.stderr[-3000:]
  assert f'Taking over {workdir / runlock.LOCK_FILE} from pid {first.pid} ' in third.stderr
  resumed = re.search(r'Resuming from step (\d+) ', third.stderr)
  assert resumed and int(resumed.group(1)) in saved, third.stderr[-3000:]
  assert _saved_steps(workdir)[-1] == saved[-1] + 2
  assert (workdir / runlock.LOCK_FILE).read_text() == ''  # released at the end
