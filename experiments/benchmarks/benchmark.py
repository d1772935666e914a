"""Speed of the product's own train and predict steps, in fp32 and bf16, optionally beside
PyTorch.

  python -m experiments.benchmarks.benchmark --model=unet --width=64 --size=256 --batch=4 \
      --json [--torch]

Prints one JSON object. For each dtype (float32, bfloat16: `config.train.dtype`, parameters
stay float32) it times the jitted `flmiseg.train.steps` train and predict steps, built exactly as
`flmiseg.train.trainer.build` builds them and sharded over every device, on random data of the given
shape: images/s (median over repeats, after warm-up, each repeat ending in
`block_until_ready`), compile time, peak memory, and achieved FLOP/s with its fraction of the
device's peak. FLOPs come from `flmiseg.models.summary.forward_flops` (the number `--mode=summary`
prints); a training step is counted as 3x the forward pass (forward, and a backward pass of
about twice its cost), the usual convention. Peaks: the vendors' dense figures for known GPUs;
for a CPU an estimate (cores x clock x fp32 FLOP/cycle of its vector units: 64 with AVX-512,
32 with AVX2), marked as such. Peak memory is `peak_bytes_in_use` on a GPU and the process's
peak resident set on a CPU (which includes the Python runtime).

It also measures the input pipeline (`flmiseg.data.pipeline.train_dataset`: random crop,
flip/rotation, batching, in this one process) in images/s per host core, and with `--torch`
(when PyTorch is importable; it is never a dependency) times
`experiments/benchmarks/torch_unet.py`, the same U-Net, eagerly in fp32 as the reference runs
it (SGD momentum, BCE), on the same device, and reports the JAX/PyTorch ratios.

  python -m experiments.benchmarks.benchmark --backends=jax,onnx --predict_model=nucleus --size=1024

instead compares predict's backends side by side (`backend_times`): one simulated image of
--size x --size pixels predicted by a shipped model (or a run folder) exactly as --mode=predict
does (normalisation, the same tiles of --tile pixels, blending), on JAX and on ONNX Runtime
(`--backend=onnx`, flmiseg/export/onnx_backend.py; needs flmiseg[export]): the seconds to load
(ONNX: converting and caching the graph on first use, then loading it), the first image
(JAX: compiling) and the median of --repeats more, whole and for the network alone.
"""

import json
import os
import platform
import resource
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from flmiseg.configs import default
from flmiseg.inference import model as model_lib
from flmiseg.inference import tiling
from flmiseg.train import losses
from flmiseg.cli import predict
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.core import sharding
from flmiseg.train import steps as steps_lib
from flmiseg.models import summary
from flmiseg.train import trainer
from flmiseg.data import pipeline
from flmiseg.data import preprocess
from flmiseg.data import simulate

FLAGS = flags.FLAGS

# Dense peak FLOP/s by (device kind substring, dtype): NVIDIA's data sheets (SXM parts).
GPU_PEAKS = {
    ('H100', 'bfloat16'): 989e12, ('H100', 'float32'): 67e12,
    ('H200', 'bfloat16'): 989e12, ('H200', 'float32'): 67e12,
    ('A100', 'bfloat16'): 312e12, ('A100', 'float32'): 19.5e12,
}


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('model', 'unet', 'config.model.name.')
  flags.DEFINE_string('variant', 'original', 'config.model.variant.')
  flags.DEFINE_integer('width', 64, 'config.model.width.')
  flags.DEFINE_integer('size', 256, 'Image side (pixels).')
  flags.DEFINE_integer('batch', 4, 'Global batch (split over the devices).')
  flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Computation dtypes to time.')
  flags.DEFINE_integer('repeats', 5, 'Timed repeats (the median is reported).')
  flags.DEFINE_integer('steps', 5, 'Steps per timed repeat.')
  flags.DEFINE_bool('torch', False, 'Also time the PyTorch U-Net (if torch is importable).')
  flags.DEFINE_bool('json', False, 'Print only the JSON object (else also a short table).')
  flags.DEFINE_list('backends', [], "Compare predict's backends instead (jax, onnx) on one "
                    '--size x --size image (backend_times).')
  flags.DEFINE_string('predict_model', 'nucleus', '--backends: a shipped model or run folder.')
  flags.DEFINE_integer('tile', 0, '--backends: tile side (0: the model\'s crop size).')


def make_config(model: str, variant: str, width: int, size: int, batch: int, dtype: str):
  """The default config with the benchmarked model, size, batch and dtype."""
  config = default.get_config()
  config.model.name, config.model.variant, config.model.width = model, variant, width
  config.data.crop_size = size
  config.train.batch_size = config.eval.batch_size = batch
  config.train.dtype = dtype
  config.train.num_steps = 1000
  return config


def random_batch(config, mesh, seed: int = 0) -> dict:
  """A global batch of random images and masks, sharded like the training data."""
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, config.data.crop_size, config.data.crop_size, 1)
  host = {'image': rng.standard_normal(shape, np.float32),
          'mask': (rng.random(shape) < 0.3).astype(np.float32),
          'valid': np.ones(shape, np.float32)}
  return sharding.global_batch(host, mesh)


def median_rate(run, items: int, repeats: int) -> float:
  """Items per second: `items` / median wall time of `run()` (which must block)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return items / statistics.median(times)


def time_steps(config, repeats: int, steps: int, with_predict: bool = True) -> dict:
  """Compile times and images/s of the jitted train (and predict) steps for `config`."""
  setup = trainer.build(config, (config.data.crop_size,) * 2, 1)
  model, schedule, mesh, state = setup.model, setup.schedule, setup.mesh, setup.state
  loss_fn = losses.from_config(config)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step, predict_step = steps_lib.jit_steps(config, loss_fn, schedule, mesh, shardings)
  batch = random_batch(config, mesh)

  start = time.perf_counter()
  train_compiled = train_step.lower(state, batch).compile()
  train_compile = time.perf_counter() - start
  holder = {'state': state}

  def train_run():
    for _ in range(steps):
      holder['state'], scalars = train_compiled(holder['state'], batch)
    jax.block_until_ready(scalars)

  def predict_run():
    for _ in range(steps):
      out = predict_compiled(holder['state'], batch)
    jax.block_until_ready(out)

  train_run()  # warm-up
  result = {'train_images_per_s': median_rate(train_run, steps * config.train.batch_size,
                                              repeats),
            'train_compile_s': train_compile, 'num_devices': mesh.size, 'model': model}
  if with_predict:
    start = time.perf_counter()
    predict_compiled = predict_step.lower(holder['state'], batch).compile()
    result['predict_compile_s'] = time.perf_counter() - start
    predict_run()
    result['predict_images_per_s'] = median_rate(predict_run, steps * config.train.batch_size,
                                                 repeats)
  return result


def cpu_flop_per_cycle(cpu_flags: set[str]) -> tuple[int, str]:
  """(fp32 FLOP per cycle per core, the instruction set) from /proc/cpuinfo's flags: two FMA
  units of 16 (AVX-512) or 8 (AVX2) lanes, 2 FLOP each; 8 otherwise (SSE)."""
  if 'avx512f' in cpu_flags:
    return 2 * 16 * 2, 'AVX-512, 2 FMA units'
  if 'avx2' in cpu_flags and 'fma' in cpu_flags:
    return 2 * 8 * 2, 'AVX2, 2 FMA units'
  return 2 * 4, 'SSE'


def cpu_peak_flops(cpuinfo_path: str = '/proc/cpuinfo') -> tuple[float, str]:
  """(estimated fp32 peak FLOP/s of this machine's CPUs, how it was estimated).

  cores x the clock /proc/cpuinfo reports x `cpu_flop_per_cycle`: a dense-fp32 estimate. It
  is also the reference for bf16 on a CPU (XLA's CPU backend has no faster bf16 path).
  """
  cores = os.cpu_count() or 1
  mhz, cpu_flags = None, set()
  try:
    with open(cpuinfo_path) as f:
      for line in f:
        if line.startswith('cpu MHz') and mhz is None:
          mhz = float(line.split(':')[1])
        elif line.startswith('flags') and not cpu_flags:
          cpu_flags = set(line.split(':')[1].split())
  except OSError:
    pass
  ghz = (mhz or 2000.0) / 1000
  per_cycle, isa = cpu_flop_per_cycle(cpu_flags)
  note = (f'estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({isa}); '
          'turbo clocks can exceed it')
  return cores * ghz * 1e9 * per_cycle, note


def device_peak(device, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s or None, its source) for `device` in `dtype`."""
  if device.platform == 'cpu':
    return cpu_peak_flops()
  for (kind, dt), peak in GPU_PEAKS.items():
    if kind in device.device_kind and dt == dtype:
      return peak, f'{kind} data sheet, dense {dtype}'
  return None, f'unknown peak for {device.device_kind}'


def peak_memory_bytes(device) -> tuple[int, str]:
  """(peak bytes, what they measure) on `device`."""
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
  return int(kib) * 1024, 'process peak resident set (CPU)'


class _RandomSource:
  """Random 16-bit-range float images of one size, as the prepared cache holds them."""

  def __init__(self, n: int, size: int):
    rng = np.random.default_rng(0)
    self.images = rng.standard_normal((n, size, size), np.float32)
    self.masks = (rng.random((n, size, size)) < 0.3).astype(np.uint8)
    self.shapes = ((size, size),) * n

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {'image': self.images[i], 'mask': self.masks[i], 'index': i}


def pipeline_rate(size: int, batch: int, num_batches: int = 30) -> float:
  """Images/s of the training pipeline in this process (one host core), crops of `size`."""
  source = _RandomSource(32, int(size * 1.25))
  it = iter(pipeline.train_dataset(source, crop_size=size, global_batch=batch,
                                   num_steps=num_batches + 5, seed=0))
  for _ in range(3):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch / (time.perf_counter() - start)


def torch_rates(width: int, size: int, batch: int, repeats: int, steps: int) -> dict:
  """images/s of the PyTorch U-Net, eager fp32: train (SGD step) and no-grad inference."""
  import torch  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import torch_unet  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  net = torch_unet.UNet(width=width).to(device)
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 1, size, size, device=device)
  y = (torch.rand(batch, 1, size, size, device=device) < 0.3).float()
  loss_fn = torch.nn.BCEWithLogitsLoss()
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def train_run():
    net.train()
    for _ in range(steps):
      opt.zero_grad(set_to_none=True)
      loss_fn(net(x), y).backward()
      opt.step()
    sync()

  def predict_run():
    net.eval()
    with torch.no_grad():
      for _ in range(steps):
        torch.sigmoid(net(x))
    sync()

  train_run()
  train_ips = median_rate(train_run, steps * batch, repeats)
  predict_run()
  predict_ips = median_rate(predict_run, steps * batch, repeats)
  return {'device': device, 'torch_version': torch.__version__,
          'torch_threads': torch.get_num_threads(), 'params': torch_unet.count_params(net),
          'train_images_per_s': train_ips, 'predict_images_per_s': predict_ips}


def run(model: str = 'unet', variant: str = 'original', width: int = 64, size: int = 256,
        batch: int = 4, dtypes=('float32', 'bfloat16'), repeats: int = 5, steps: int = 5,
        with_torch: bool = False) -> dict:
  """The benchmark's JSON object (see the module docstring)."""
  device = jax.devices()[0]
  result = {'model': model, 'variant': variant, 'width': width, 'size': size, 'batch': batch,
            'device_kind': device.device_kind, 'platform': device.platform,
            'num_devices': jax.device_count(), 'jax_version': jax.__version__,
            'machine': platform.processor() or platform.machine(),
            'train_flops_note': 'training FLOPs counted as 3x the forward pass', 'dtypes': {}}
  for dtype in dtypes:
    config = make_config(model, variant, width, size, batch, dtype)
    timed = time_steps(config, repeats, steps)
    forward = summary.forward_flops(timed.pop('model'), (size, size))
    peak, peak_source = device_peak(device, dtype)
    memory, memory_kind = peak_memory_bytes(device)
    entry = dict(timed, forward_flops_per_image=forward, train_flops_per_image=3 * forward,
                 peak_flops=peak, peak_source=peak_source, peak_memory_bytes=memory,
                 peak_memory_kind=memory_kind)
    entry['train_flops_per_s'] = entry['train_images_per_s'] * 3 * forward
    entry['predict_flops_per_s'] = entry['predict_images_per_s'] * forward
    total_peak = None if peak is None else (peak if device.platform == 'cpu'
                                            else peak * jax.device_count())
    entry['train_peak_fraction'] = (None if total_peak is None
                                    else entry['train_flops_per_s'] / total_peak)
    entry['predict_peak_fraction'] = (None if total_peak is None
                                      else entry['predict_flops_per_s'] / total_peak)
    result['dtypes'][dtype] = entry
  result['pipeline_images_per_s_per_core'] = pipeline_rate(size, batch)
  if with_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      result['torch'] = {'note': 'PyTorch is not importable here; nothing compared'}
    else:
      if model != 'unet' or variant != 'original':
        result['torch'] = {'note': 'the PyTorch reference exists for --model=unet only'}
      else:
        ref = torch_rates(width, size, batch, repeats, steps)
        fp32 = result['dtypes'].get('float32')
        best = max(result['dtypes'].values(), key=lambda e: e['train_images_per_s'])
        if fp32 is not None:
          ref['jax_fp32_over_torch_train'] = fp32['train_images_per_s'] / ref[
              'train_images_per_s']
          ref['jax_fp32_over_torch_predict'] = fp32['predict_images_per_s'] / ref[
              'predict_images_per_s']
        ref['jax_best_over_torch_train'] = best['train_images_per_s'] / ref['train_images_per_s']
        result['torch'] = ref
  return result


def backend_times(model: str = 'nucleus', size: int = 1024, backends=('jax', 'onnx'),
                  tile: int = 0, repeats: int = 5) -> dict:
  """predict's backends side by side on one simulated size x size image (module docstring).

  The backends take turns, image after image, so a machine shared with other jobs slows
  both alike. Returns {'model', 'size', 'tile', 'tiles', 'batch', 'backends': {backend:
  {'convert_load_s' (ONNX: first use, converting into an empty cache), 'load_s',
  'first_image_s', 'image_s' (median; normalisation, tiles, network, blending), 'network_s'
  (median; the tiles alone)}}, 'jax_over_onnx'} (JAX's image_s over ONNX Runtime's: above 1,
  ONNX Runtime is faster).
  """
  folder = pretrained.resolve_model(model)
  config = rundir.read_config(folder)
  kind = config.data.kind if config.data.kind in simulate.KINDS else 'er'
  image, _ = simulate.simulate(kind, size, np.random.default_rng(0))
  tile = tile or config.data.crop_size
  normalised = preprocess.normalize(image, config.data.normalization, config.data.kind)
  result = {'model': model, 'size': size, 'tile': tile,
            'tiles': len(tiling.tile_starts(size, tile, 0.25)) ** 2,
            'batch': config.eval.batch_size, 'backends': {b: {} for b in backends}}
  predictors, times = {}, {b: {'image_s': [], 'network_s': []} for b in backends}
  saved = os.environ.get('FLMISEG_CACHE')
  with tempfile.TemporaryDirectory() as cache:
    os.environ['FLMISEG_CACHE'] = cache  # ONNX: convert into an empty cache, then reuse it
    try:
      for backend in backends:
        options = predict.Options(input='', output='', tile=tile, backend=backend)
        entry = result['backends'][backend]
        for key in ('convert_load_s', 'load_s') if backend == 'onnx' else ('load_s',):
          start = time.perf_counter()
          predictors[backend] = predict.load_predictor(model_lib.Model(folder, config), options)
          entry[key] = time.perf_counter() - start
        start = time.perf_counter()
        predictors[backend].plane(image)
        entry['first_image_s'] = time.perf_counter() - start
      for _ in range(repeats):
        for backend, predictor in predictors.items():
          start = time.perf_counter()
          predictor.plane(image)
          times[backend]['image_s'].append(time.perf_counter() - start)
          start = time.perf_counter()
          tiling.sliding_window(predictor.probs_of, normalised, tile, 0.25,
                                   predictor.batch_size)
          times[backend]['network_s'].append(time.perf_counter() - start)
    finally:
      if saved is None:
        os.environ.pop('FLMISEG_CACHE')
      else:
        os.environ['FLMISEG_CACHE'] = saved
  for backend, measured in times.items():
    result['backends'][backend].update(
        {k: statistics.median(v) for k, v in measured.items()})
  if {'jax', 'onnx'} <= set(backends):
    result['jax_over_onnx'] = (result['backends']['jax']['image_s'] /
                               result['backends']['onnx']['image_s'])
  return result


def format_table(result: dict) -> str:
  lines = [f'{result["model"]} width {result["width"]}, {result["size"]}x{result["size"]}, '
           f'batch {result["batch"]} on {result["num_devices"]} x {result["device_kind"]}',
           f'{"dtype":<10}{"train img/s":>12}{"infer img/s":>12}{"compile s":>11}'
           f'{"train %peak":>12}']
  for dtype, e in result['dtypes'].items():
    frac = e['train_peak_fraction']
    lines.append(f'{dtype:<10}{e["train_images_per_s"]:>12.1f}{e["predict_images_per_s"]:>12.1f}'
                 f'{e["train_compile_s"]:>11.1f}'
                 f'{"" if frac is None else format(100 * frac, ".1f") + "%":>12}')
  torch_result = result.get('torch', {})
  if 'train_images_per_s' in torch_result:
    lines.append(f'{"torch fp32":<10}{torch_result["train_images_per_s"]:>12.1f}'
                 f'{torch_result["predict_images_per_s"]:>12.1f}')
  lines.append(f'pipeline: {result["pipeline_images_per_s_per_core"]:.0f} images/s per core')
  return '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.backends:
    result = backend_times(FLAGS.predict_model, FLAGS.size, tuple(FLAGS.backends), FLAGS.tile,
                           FLAGS.repeats)
    print(json.dumps(result, indent=2, sort_keys=True))
    return
  result = run(FLAGS.model, FLAGS.variant, FLAGS.width, FLAGS.size, FLAGS.batch,
               tuple(FLAGS.dtypes), FLAGS.repeats, FLAGS.steps, FLAGS.torch)
  if not FLAGS.json:
    print(format_table(result))
  print(json.dumps(result, indent=None if FLAGS.json else 2, sort_keys=True))


if __name__ == '__main__':
  define_flags()
  app.run(main)
