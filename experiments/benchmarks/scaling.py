"""Scaling over devices, and the multi-process check.

  python -m experiments.benchmarks.scaling [--counts=1,2,4,8] [--two_process] \
      [--out=docs/scaling.md]

Weak scaling (a fixed per-device batch, so the global batch grows with the devices) and strong
scaling (a fixed global batch split over more devices) of the real training step
(`flmiseg.train.steps.train_step`, jitted and sharded as in training;
`experiments.benchmarks.benchmark` times it). The device count is fixed when JAX starts, so
each count runs in its own subprocess: on a CPU machine over N fake host devices
(`--xla_force_host_platform_device_count=N`), on a GPU machine over the first N GPUs
(`CUDA_VISIBLE_DEVICES`; counts above the number of GPUs are skipped). Efficiency is
images/s at N devices divided by N times images/s at one device. On a CPU the fake devices
share the same cores, so those figures check that the sharded program compiles and runs at
every count; they are not a speed measurement (the output says so).

`--two_process` tests the multi-host path on one machine: it trains a tiny run with
`python -m flmiseg.main` once as one process with 2 CPU devices, and once as 2 processes
with 1 CPU device each, connected by `jax.distributed` (local coordinator, gloo CPU
collectives), each process feeding its own half of every global batch. Both runs see the
same global batches, so their final parameters must be equal; it reports the largest
difference and whether they are bit-identical.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from experiments import common

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS = flags.FLAGS

CPU_NOTE = ('CPU machine: the N devices are fake host devices sharing the same cores, so '
            'these figures check the sharded program at each count; they are not a speed '
            'measurement (expect efficiency near 1/N for strong scaling).')


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_list('counts', ['1', '2', '4', '8'], 'Device counts to run.')
  flags.DEFINE_string('model', 'unet', 'config.model.name.')
  flags.DEFINE_integer('width', 16, 'config.model.width.')
  flags.DEFINE_integer('size', 128, 'Crop side (pixels).')
  flags.DEFINE_integer('per_device_batch', 2, 'Weak scaling: batch per device.')
  flags.DEFINE_integer('global_batch', 16, 'Strong scaling: global batch (divisible by counts).')
  flags.DEFINE_integer('repeats', 3, 'Timed repeats per point (median).')
  flags.DEFINE_integer('steps', 3, 'Steps per repeat.')
  flags.DEFINE_bool('two_process', True, 'Also run the two-process equality check.')
  flags.DEFINE_string('workdir', '/tmp/flmiseg_scaling', 'Scratch folder (two-process runs).')
  flags.DEFINE_string('out', '', 'Also write the report (Markdown) here.')
  flags.DEFINE_integer('worker', 0, 'Internal: time one point with this global batch.')


def _cpu_env(num_devices: int) -> dict:
  """The environment of a CPU process with `num_devices` devices; other XLA flags of this
  process's environment pass on."""
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
              XLA_FLAGS=common.cpu_xla_flags(num_devices))


def gpu_count() -> int:
  """GPUs visible to JAX, asked in a subprocess (this process must not pick a backend); 0
  without asking when JAX_PLATFORMS names platforms and no GPU among them."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and not {'cuda', 'gpu', 'rocm'} & set(platforms.lower().split(',')):
    return 0
  out = subprocess.run(
      [sys.executable, '-c', 'import jax; print(len(jax.devices("gpu")))'],
      capture_output=True, text=True, check=False)
  return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else 0


def point(num_devices: int, global_batch: int, gpus: int, model: str, width: int, size: int,
          repeats: int, steps: int) -> dict:
  """Times the train step over `num_devices` devices in a fresh subprocess."""
  if gpus:
    env = dict(os.environ, PYTHONPATH=str(REPO),
               CUDA_VISIBLE_DEVICES=','.join(str(i) for i in range(num_devices)))
  else:
    env = _cpu_env(num_devices)
  cmd = [sys.executable, '-m', 'experiments.benchmarks.scaling', f'--worker={global_batch}',
         f'--model={model}', f'--width={width}', f'--size={size}', f'--repeats={repeats}',
         f'--steps={steps}']
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f'scaling worker ({num_devices} devices) failed:\n{out.stderr[-3000:]}')
  result = json.loads(out.stdout.strip().splitlines()[-1])
  if result['num_devices'] != num_devices:
    raise RuntimeError(f'asked for {num_devices} devices, the worker saw '
                       f'{result["num_devices"]}')
  return result


def worker(global_batch: int) -> None:
  """Prints one JSON line: the train step's images/s over every visible device."""
  from experiments.benchmarks import benchmark  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config = benchmark.make_config(FLAGS.model, 'original', FLAGS.width, FLAGS.size,
                                 global_batch, 'float32')
  timed = benchmark.time_steps(config, FLAGS.repeats, FLAGS.steps, with_predict=False)
  print(json.dumps({'num_devices': timed['num_devices'], 'global_batch': global_batch,
                    'platform': jax.devices()[0].platform,
                    'images_per_s': timed['train_images_per_s'],
                    'compile_s': timed['train_compile_s']}))


def scaling(counts: list[int], per_device_batch: int, global_batch: int, **kw) -> dict:
  """{'weak': [...], 'strong': [...], 'platform', 'note'} over `counts` (1 is added)."""
  gpus = gpu_count()
  if gpus:
    counts = [n for n in counts if n <= gpus]
  counts = sorted(set([1] + counts))
  bad = [n for n in counts if global_batch % n]
  if bad:
    raise app.UsageError(f'--global_batch={global_batch} is not divisible by {bad}')
  report = {'platform': 'gpu' if gpus else 'cpu', 'note': '' if gpus else CPU_NOTE}
  measured = {}  # (devices, global batch) -> row: a point both modes share is timed once
  for mode in ('weak', 'strong'):
    rows = []
    for n in counts:
      batch = per_device_batch * n if mode == 'weak' else global_batch
      if (n, batch) not in measured:
        measured[n, batch] = point(n, batch, gpus, **kw)
      rows.append(dict(measured[n, batch]))
    base = rows[0]['images_per_s']
    for row in rows:
      row['efficiency'] = row['images_per_s'] / (row['num_devices'] * base)
    report[mode] = rows
  return report


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def tiny_flags(data_dir: pathlib.Path, steps: int) -> list[str]:
  """flmiseg.main flags of the tiny run the two-process check trains."""
  return ['--config=configs/default.py', f'--config.data.synthetic_dir={data_dir}',
          '--config.data.synthetic_size=64', '--config.data.num_synthetic_train=16',
          '--config.data.num_synthetic_test=4', '--config.data.crop_size=32',
          '--config.data.val_fraction=0.25', '--config.model.width=4',
          f'--config.train.num_steps={steps}', '--config.train.batch_size=4',
          '--config.eval.batch_size=4', f'--config.eval.every_steps={steps}',
          f'--config.train.log_every_steps={steps}', '--config.optim.warmup_steps=0']


def final_params(workdir: pathlib.Path) -> dict:
  """Path -> numpy array of the latest checkpoint's parameters and BatchNorm statistics,
  restored onto this process's first device whatever topology saved them."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  folder = workdir.absolute() / 'checkpoints'
  step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  checkpointer = ocp.StandardCheckpointer()
  item = folder / str(step) / 'state'
  metadata = checkpointer.metadata(item).item_metadata
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                        metadata)
  state = checkpointer.restore(item, target)
  checkpointer.close()
  trees = {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(trees)[0]}


def two_process_check(root: pathlib.Path, steps: int = 6, timeout: int = 600) -> dict:
  """Trains the tiny run as 1 process x 2 devices and as 2 processes x 1 device; compares."""
  root = pathlib.Path(root).absolute()
  data, single, multi = root / 'data', root / 'one_process', root / 'two_processes'
  args = tiny_flags(data, steps)
  base = [sys.executable, '-m', 'flmiseg.main', *args]
  start = time.perf_counter()
  one = subprocess.run(base + [f'--workdir={single}'], cwd=REPO, env=_cpu_env(2),
                       capture_output=True, text=True, timeout=timeout, check=False)
  if one.returncode != 0:
    raise RuntimeError(f'one-process run failed:\n{one.stderr[-3000:]}')
  one_s = time.perf_counter() - start
  port = _free_port()
  start = time.perf_counter()
  procs = []
  for index in range(2):
    env = dict(_cpu_env(1), JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(index))
    procs.append(subprocess.Popen(base + [f'--workdir={multi}'], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=timeout) for p in procs]
  for index, (p, (_, err)) in enumerate(zip(procs, outputs)):
    if p.returncode != 0:
      raise RuntimeError(f'process {index} of the two-process run failed:\n{err[-3000:]}')
  two_s = time.perf_counter() - start
  a, b = final_params(single), final_params(multi)
  if a.keys() != b.keys():
    raise RuntimeError('the two runs saved different parameter trees')
  diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
  identical = all(np.array_equal(a[k], b[k]) for k in a)
  metrics = []
  for workdir in (single, multi):
    summary = json.loads((workdir / 'eval' / 'summary.json').read_text())
    metrics.append({'iou': summary['iou'], 'f1': summary['f1']})
  return {'steps': steps, 'arrays': len(a), 'max_abs_diff': diff, 'bit_identical': identical,
          'one_process': {'devices': 2, 'seconds': one_s, 'test': metrics[0]},
          'two_processes': {'devices': '2 x 1', 'seconds': two_s, 'test': metrics[1]}}


def markdown(report: dict, two: dict | None, command: str) -> str:
  lines = ['# Scaling over devices', '', f'`{command}`', '']
  if report.get('note'):
    lines += [f'**{report["note"]}**', '']
  for mode, title in (('weak', 'Weak scaling (fixed batch per device)'),
                      ('strong', 'Strong scaling (fixed global batch)')):
    lines += [f'## {title}', '', '| devices | global batch | images/s | efficiency | compile s |',
              '|---|---|---|---|---|']
    for r in report[mode]:
      lines.append(f'| {r["num_devices"]} | {r["global_batch"]} | {r["images_per_s"]:.1f} | '
                   f'{r["efficiency"]:.2f} | {r["compile_s"]:.1f} |')
    lines.append('')
  if two is not None:
    lines += ['## Two processes (jax.distributed, gloo CPU collectives) vs one', '',
              f'A tiny U-Net trained {two["steps"]} steps by `python -m flmiseg.main`, once as one '
              'process with 2 CPU devices, once as 2 processes with 1 device each, on the same '
              'global batches.', '',
              f'- parameter and BatchNorm arrays compared: {two["arrays"]}',
              f'- largest absolute difference: {two["max_abs_diff"]:.3g}',
              f'- bit-identical: {"yes" if two["bit_identical"] else "no"}',
              f'- test IoU: one process {two["one_process"]["test"]["iou"]:.6f}, two processes '
              f'{two["two_processes"]["test"]["iou"]:.6f}', '']
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.worker:
    worker(FLAGS.worker)
    return
  report = scaling([int(c) for c in FLAGS.counts], FLAGS.per_device_batch, FLAGS.global_batch,
                   model=FLAGS.model, width=FLAGS.width, size=FLAGS.size,
                   repeats=FLAGS.repeats, steps=FLAGS.steps)
  for mode in ('weak', 'strong'):
    for row in report[mode]:
      print(json.dumps({'mode': mode, **row}))
  two = two_process_check(pathlib.Path(FLAGS.workdir)) if FLAGS.two_process else None
  if two is not None:
    print(json.dumps({'two_process': two}))
  command = 'python -m experiments.benchmarks.scaling ' + ' '.join(sys.argv[1:])
  text = markdown(report, two, command.strip())
  print(text)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(text)
  if two is not None and not two['bit_identical']:
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
