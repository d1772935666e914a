"""Fault injection: kill -9 a training at random moments, rerun it, and check nothing is lost.

  python -m experiments.benchmarks.fault_injection --runs=20 --workdir=/tmp/fi

First two uninterrupted tiny trainings through the real command line: the reference, and a
repeat that must equal it (final state, every logged loss, learning rate, gradient norm and
validation IoU, and the test metrics) and whose timing sets the kill window. Then
`--runs` times: the same command in a fresh workdir, killed with SIGKILL after a random delay
(a seeded RNG; delays span the repeat's training phase, where a checkpoint is written at
every step, so many kills land inside a save), then rerun (and with probability
`--rekill_prob` killed again, at most `--max_kills` times) until it finishes. Each finished run
must end with the same train state as the reference, bit for bit: params, BatchNorm
statistics, optimiser state and step, restored from the last checkpoint with orbax (as numpy,
no model needed), and the same test metrics (eval/summary.json).

Per run it prints the kill times (and whether a checkpoint save was in flight: an orbax tmp
folder made by that attempt on disk), the step each rerun resumed from, and "exact" or the
largest |difference|; at the end "N runs, K exact".

Compiled programs are shared between the runs through JAX's persistent compilation cache (a
folder in --workdir): compilation is deterministic, so this only saves time.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
import orbax.checkpoint as ocp

from experiments import common
from flmiseg.data import synthetic

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_integer('runs', 20, 'Killed-and-resumed runs to compare with the reference.')
  flags.DEFINE_string('workdir', '/tmp/fi', 'Folder for the data, the reference and the runs.')
  flags.DEFINE_integer('seed', 0, 'Seeds the kill times (the training seed is fixed).')
  flags.DEFINE_integer('steps', 12, 'Training steps of each run (a checkpoint at every step).')
  flags.DEFINE_integer('devices', 2, 'CPU devices each training sees (the batch is sharded).')
  flags.DEFINE_integer('max_kills', 3, 'Most kills of one run before it may finish.')
  flags.DEFINE_float('rekill_prob', 0.5, 'Probability of killing a rerun again.')
  flags.DEFINE_bool('with_test', True, 'Evaluate on a test list at the end (and compare it).')
  flags.DEFINE_bool('fast_compile', False,
                    'Compile with XLA optimisation level 0 (faster start, for the quick test).')



REPO = pathlib.Path(__file__).resolve().parents[2]
_TMP = '.orbax-checkpoint-tmp'


def write_data(root: pathlib.Path) -> pathlib.Path:
  """A tiny simulated nucleus dataset (8 train, 2 test images of 32x32), made once."""
  out = root / 'data'
  if not (out / 'train.txt').is_file():
    synthetic.write_dataset('nucleus', out, num_train=8, num_test=2, size=32, seed=0,
                           overwrite=True)
  return out


def command(data: pathlib.Path, workdir: pathlib.Path, steps: int, with_test: bool) -> list:
  """The training command line: width-4 U-Net, 32 px, batch 2, a checkpoint every step."""
  cmd = [sys.executable, '-m', 'flmiseg.main', '--config=configs/default.py',
         f'--workdir={workdir}', '--config.data.source=lists',
         f'--config.data.train_list={data / "train.txt"}', '--config.data.crop_size=32',
         '--config.data.val_fraction=0.25', '--config.model.width=4',
         f'--config.train.num_steps={steps}', '--config.train.batch_size=2',
         '--config.train.checkpoint_every_steps=1', '--config.train.log_every_steps=1',
         f'--config.eval.every_steps={max(steps // 3, 1)}', '--config.eval.batch_size=2',
         '--config.optim.warmup_steps=2']
  if with_test:
    cmd.append(f'--config.data.test_list={data / "test.txt"}')
  return cmd


def environment(root: pathlib.Path, devices: int, fast_compile: bool) -> dict:
  xla = common.cpu_xla_flags(devices)
  if fast_compile:
    xla += ' --xla_backend_optimization_level=0'
  return dict(os.environ, XLA_FLAGS=xla, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
              JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def unfinished_saves(workdir: pathlib.Path) -> set:
  """(path, inode, mtime) of the unfinished (orbax tmp) checkpoint folders on disk."""
  found = set()
  for path in workdir.glob(f'checkpoints*/*{_TMP}*'):
    try:
      found.add((str(path), path.stat().st_ino, path.stat().st_mtime_ns))
    except FileNotFoundError:  # renamed or removed while we looked
      pass
  return found


def complete_steps(workdir: pathlib.Path) -> list[int]:
  folder = workdir / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() \
      else []


def attempt(cmd, env, log: pathlib.Path, kill_after: float | None) -> dict:
  """Runs cmd once; SIGKILLs it after kill_after seconds if it is still running."""
  with open(log, 'w') as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    start = time.perf_counter()
    try:
      proc.wait(timeout=kill_after)
      killed = False
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      killed = True
  text = log.read_text(errors='replace')
  resumed = re.findall(r'Resuming from step (\d+)', text)
  return {'killed': killed, 'seconds': time.perf_counter() - start, 'rc': proc.returncode,
          'resumed_from': int(resumed[-1]) if resumed else 0, 'log': text}


def final_state(workdir: pathlib.Path) -> dict:
  """The train state of the latest checkpoint, restored as numpy arrays (no model needed)."""
  path = workdir / 'checkpoints' / str(complete_steps(workdir)[-1]) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def compare(a: dict, b: dict) -> tuple[bool, float]:
  """(bit-identical?, largest |difference|) of two pytrees of arrays; inf when their
  structures, shapes or dtypes differ."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False, float('inf')
  identical, worst = True, 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype:
      return False, float('inf')
    if x.tobytes() != y.tobytes():
      identical = False
      diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
      worst = max(worst, float(np.nan_to_num(np.max(diff), nan=np.inf)))
  return identical, worst


def logged_metrics(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without the timing (images/s), which no two runs share."""
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k != 'images_per_s'} for l in lines]


def summary_of(workdir: pathlib.Path) -> dict | None:
  path = workdir / 'eval' / 'summary.json'
  return json.loads(path.read_text()) if path.exists() else None


def run_uninterrupted(cmd, env, workdir: pathlib.Path) -> tuple[float, float]:
  """Trains without a kill; returns (seconds to the first checkpoint, total seconds)."""
  shutil.rmtree(workdir, ignore_errors=True)
  log = workdir.with_suffix('.log')
  with open(log, 'w') as out:
    proc = subprocess.Popen(cmd(workdir), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    start, first = time.perf_counter(), None
    while proc.poll() is None:
      if first is None and (complete_steps(workdir) or unfinished_saves(workdir)):
        first = time.perf_counter() - start
      time.sleep(0.01)
  total = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f'{workdir}: the uninterrupted run failed (exit {proc.returncode}); '
                       f'see {log}')
  return first or total, total


def run_with_kills(cmd, env, workdir: pathlib.Path, rng, window, max_kills: int,
                   rekill_prob: float) -> dict:
  """Kills, reruns until the training finishes; returns what happened."""
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.mkdir(parents=True)
  kills, resumed = [], []
  for number in range(max_kills + 1):
    kill = number < max_kills and (number == 0 or rng.random() < rekill_prob)
    delay = float(rng.uniform(*window)) if kill else None
    stale = unfinished_saves(workdir)  # left by an earlier kill, not this attempt's
    result = attempt(cmd(workdir), env, workdir / f'attempt_{number}.log', delay)
    if number > 0:
      resumed.append(result['resumed_from'])
    if result['killed']:
      kills.append((delay, bool(unfinished_saves(workdir) - stale)))
      continue
    if result['rc'] != 0:
      tail = '\n'.join(result['log'].splitlines()[-5:])
      raise RuntimeError(f'{workdir}: attempt {number} exited {result["rc"]}:\n{tail}')
    return {'kills': kills, 'resumed': resumed}
  raise AssertionError('unreachable: the last attempt is never killed')


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.workdir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  data = write_data(root)
  env = environment(root, FLAGS.devices, FLAGS.fast_compile)
  cmd = lambda workdir: command(data, workdir, FLAGS.steps, FLAGS.with_test)
  run_uninterrupted(cmd, env, root / 'reference')  # also fills the compilation cache
  reference = final_state(root / 'reference')
  reference_summary = summary_of(root / 'reference')
  # A second uninterrupted run: same seed, same machine, so identical; its timing (with
  # the compilation cache warm, as the killed runs have it) sets the kill window.
  first_ckpt, total = run_uninterrupted(cmd, env, root / 'repeat')
  identical, _ = compare(reference, final_state(root / 'repeat'))
  same = (identical and summary_of(root / 'repeat') == reference_summary and
          logged_metrics(root / 'repeat') == logged_metrics(root / 'reference'))
  # Kill times span the training phase, from a little before the first checkpoint to the
  # end; a rerun that finishes first simply finishes.
  window = (0.8 * first_ckpt, total)
  print(f'uninterrupted repeat of the reference: {"exact" if same else "DIFFERENT"}; '
        f'{FLAGS.steps} steps in {total:.1f} s (first checkpoint at {first_ckpt:.1f} s); '
        f'kill delays drawn from [{window[0]:.1f}, {window[1]:.1f}] s')
  rng = np.random.default_rng(FLAGS.seed)
  exact = in_save = 0
  for index in range(FLAGS.runs):
    workdir = root / f'run_{index:02d}'
    outcome = run_with_kills(cmd, env, workdir, rng, window, FLAGS.max_kills,
                             FLAGS.rekill_prob)
    identical, diff = compare(reference, final_state(workdir))
    same_summary = summary_of(workdir) == reference_summary
    verdict = 'exact' if identical and same_summary else (
        f'max |diff| {diff:.3g}' + ('' if same_summary else ', test metrics differ'))
    exact += verdict == 'exact'
    in_save += sum(flag for _, flag in outcome['kills'])
    kills = ', '.join(f'{t:.2f} s' + (' (during a save)' if flag else '')
                      for t, flag in outcome['kills'])
    resumed = ', '.join(map(str, outcome['resumed']))
    story = (f'killed at {kills}; resumed from step {resumed}' if outcome['kills']
             else 'finished before the kill')
    print(f'run {index:2d}: {story}; {verdict}', flush=True)
  print(f'{FLAGS.runs} runs, {exact} exact ({in_save} kills landed during a checkpoint save)')
  if exact != FLAGS.runs or not same:
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
