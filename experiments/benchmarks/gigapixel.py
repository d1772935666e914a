"""One gigapixel: build a simulated nuclei mosaic as OME-Zarr, predict it block by block.

  python -m experiments.benchmarks.gigapixel --workdir=/data/gigapixel \
      [--size=32768] [--versions=0.4,0.5] [--instances] [--scheduler=threads] [--workers=0] \
      [--block=2048] [--baseline=4096] [--out=docs/large_images.json]
  python -m experiments.benchmarks.gigapixel --workdir=/tmp/gp --profile=1024

Build (once per size and version, skipped when the image exists): a `size` x `size` uint16
OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3) tiled with simulated nucleus fields
(flmiseg/data/simulate.py, TILE x TILE each, seeded by position), written tile by tile, so
the whole image is never in memory; then up to two pyramid levels, chunk by chunk. Both versions
hold the same pixels (the 0.5 image is copied chunk by chunk from the 0.4 one).

Measure: `python -m flmiseg.main --mode=predict --model=nucleus --input=X.ome.zarr
--output=DIR [--instances]` in a subprocess: wall time, megapixels per second, and peak
resident memory: the largest sum over the process and its children (worker processes
included), sampled every SAMPLE_S with psutil. With
`--baseline=N`, the same on the top-left N x N corner, once in memory (a TIFF: the
`_mask.tif` path) and once chunked (an OME-Zarr), and their ratio. Never time this beside
other work on the machine (a training run, the test suite): the figures would be theirs too.

`--profile=N`: cProfile of the chunked run (scheduler 'synchronous': in this thread) and of
the in-memory `Model.segment` with instances on an N x N corner, each function's share of
the run's time (relative shares only; absolute times of a profile are not the run's).
"""

import cProfile
import io as stdio
import json
import pathlib
import pstats
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np
import zarr

from experiments import common
from flmiseg.chunked import ngff
from flmiseg.data import simulate

REPO = pathlib.Path(__file__).resolve().parents[2]
FLAGS = flags.FLAGS
TILE = 1024  # the side of each simulated field of the mosaic
CHUNK = 1024  # the input's chunks
SAMPLE_S = 0.2  # how often the memory of the predicting processes is sampled
GAIN, OFFSET = 200, 100  # the simulator's 8-bit fields onto a 16-bit camera range
SEED = 34  # the mosaic's fields: SeedSequence([SEED, row, column])


def define_flags():
  """Defines the command-line flags (only when run as a script)."""
  flags.DEFINE_string('workdir', '/tmp/flmiseg_gigapixel', 'Where the images and outputs go.')
  flags.DEFINE_integer('size', 32768, 'Side of the mosaic, pixels (a multiple of 1024).')
  flags.DEFINE_list('versions', ['0.4', '0.5'], 'NGFF versions to build and predict.')
  flags.DEFINE_bool('instances', True, 'Predict with --instances.')
  flags.DEFINE_string('scheduler', 'threads', 'predict --scheduler.')
  flags.DEFINE_integer('workers', 0, 'predict --workers (0: its default).')
  flags.DEFINE_integer('block', 2048, 'predict --block.')
  flags.DEFINE_integer('baseline', 4096, 'Also time this corner in memory and chunked (0: no).')
  flags.DEFINE_integer('profile', 0, 'Only profile an N x N corner (0: no profile).')
  flags.DEFINE_string('out', '', 'Also write the results (JSON) here.')


# ----------------------------------------------------------------------------- building

def field(row: int, col: int) -> np.ndarray:
  """The simulated uint16 field of mosaic tile (row, col)."""
  rng = np.random.default_rng(np.random.SeedSequence([SEED, row, col]))
  image, _ = simulate.simulate('nucleus', TILE, rng)
  return image.astype(np.uint16) * GAIN + OFFSET


def _image_attrs(levels: int, version: str) -> dict:
  axes = ngff.Axes('YX', ('micrometer', 'micrometer'), (1.0, 1.0))
  return ngff.image_attrs(axes, levels, 'nuclei', version)


def build(path: pathlib.Path, size: int, version: str, copy_from: pathlib.Path | None) -> None:
  """Writes the mosaic (module docstring) tile by tile; `copy_from`: the same image in the
  other version, copied chunk by chunk instead of simulated again."""
  if path.exists():
    return
  tmp = path.with_name(f'.{path.name}.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  group = ngff.open_group(tmp, 'w-', version)
  arrays = ngff.create_multiscale(group, (size, size), CHUNK, np.uint16, 'YX', levels=3)
  source = zarr.open_group(str(copy_from), mode='r') if copy_from else None
  steps = size // TILE
  for row in range(steps):
    for col in range(steps):
      index = (slice(row * TILE, (row + 1) * TILE), slice(col * TILE, (col + 1) * TILE))
      arrays[0][index] = source['0'][index] if source else field(row, col)
    print(f'{path.name}: row {row + 1}/{steps}', end='\r', flush=True)
  for level in range(1, len(arrays)):
    for index in ngff.chunk_indices(arrays[level]):
      ngff.downsample_chunk(arrays[level - 1], arrays[level], index)
  group.attrs.update(_image_attrs(len(arrays), version))
  tmp.rename(path)
  print(f'{path}: built')


def corner(source: pathlib.Path, side: int, folder: pathlib.Path) -> tuple[pathlib.Path, ...]:
  """The top-left side x side of the 0.4 image as a TIFF and as an OME-Zarr."""
  import tifffile  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  pixels = zarr.open_group(str(source), mode='r')['0'][:side, :side]
  tiff = folder / f'corner{side}.tif'
  tifffile.imwrite(tiff, pixels)
  small = folder / f'corner{side}.ome.zarr'
  shutil.rmtree(small, ignore_errors=True)
  group = ngff.open_group(small, 'w-', '0.4')
  ngff.create_multiscale(group, (side, side), CHUNK, np.uint16, 'YX', levels=1)[0][:] = pixels
  group.attrs.update(_image_attrs(1, '0.4'))
  return tiff, small


# ----------------------------------------------------------------------------- measuring

def _tree_rss(pid: int) -> int:
  import psutil  # pylint: disable=g-import-not-at-top  (installed with distributed)
  try:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
  except psutil.Error:
    return 0


def predict(input_path: pathlib.Path, output: pathlib.Path, pixels: int,
            chunked: bool) -> dict:
  """Times one `--mode=predict` subprocess (module docstring)."""
  shutil.rmtree(output, ignore_errors=True)
  args = [sys.executable, '-m', 'flmiseg.main', '--mode=predict', '--model=nucleus',
          f'--input={input_path}', f'--output={output}'] + (
              ['--instances'] if FLAGS.instances else [])
  if chunked:
    args += [f'--scheduler={FLAGS.scheduler}', f'--workers={FLAGS.workers}',
             f'--block={FLAGS.block}']
  else:  # as the chunked path: no first pass measuring the nuclei (config.eval.measure_diameter)
    args += ['--no_rescale']
  start = time.perf_counter()
  process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  peak = [0]

  def sample():
    while process.poll() is None:
      peak[0] = max(peak[0], _tree_rss(process.pid))
      time.sleep(SAMPLE_S)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  stdout, stderr = process.communicate()
  seconds = time.perf_counter() - start
  sampler.join()
  if process.returncode:
    raise RuntimeError(f'{" ".join(args)} failed:\n{stderr[-2000:]}')
  return {'input': str(input_path), 'chunked': chunked, 'seconds': round(seconds, 1),
          'megapixels_per_s': round(pixels / 1e6 / seconds, 3),
          'peak_rss_gb': round(peak[0] / 1e9, 2),
          'printed': stdout.strip().splitlines()[-1:]}


def agreement(memory: pathlib.Path, blocks: pathlib.Path, name: str) -> dict:
  """{'mask_iou', 'instances_identical_up_to_renumbering', 'objects'} of the in-memory
  outputs in `memory` (TIFFs) against the chunked ones in `blocks` (an OME-Zarr)."""
  import tifffile  # pylint: disable=g-import-not-at-top
  mask = tifffile.imread(memory / f'{name}_mask.tif') > 0
  group = zarr.open_group(str(blocks / f'{name}.ome.zarr'), mode='r')
  other = group['labels/mask/0'][:] > 0
  out = {'mask_iou': round(float((mask & other).sum() / max((mask | other).sum(), 1)), 6)}
  if FLAGS.instances:
    labels = tifffile.imread(memory / f'{name}_instances.tif').ravel()
    linked = group['labels/instances/0'][:].ravel()
    pairs = np.unique(np.stack([labels, linked]), axis=1)  # one pair per (in memory, chunked)
    out['instances_identical_up_to_renumbering'] = bool(
        pairs.shape[1] == len(np.unique(pairs[0])) == len(np.unique(pairs[1])))
    out['objects'] = int(len(np.unique(labels)) - 1)
  return out


def profile(workdir: pathlib.Path, side: int) -> str:
  """The shares of the chunked run's and the in-memory path's time, by function."""
  import flmiseg  # pylint: disable=g-import-not-at-top
  source = workdir / f'nuclei_{FLAGS.size}_v0.4.ome.zarr'
  tiff, small = corner(source, side, workdir / 'corners')
  model = flmiseg.load('nucleus')
  pixels = zarr.open_group(str(small), mode='r')['0'][:]
  report = []
  for name, call in [
      ('chunked', lambda: flmiseg.segment_zarr(model, str(small), str(workdir / 'prof'),
                                               instances=True, overwrite=True,
                                               scheduler='synchronous',
                                               block=min(FLAGS.block, side))),
      ('in memory', lambda: model.segment(pixels, instances=True, rescale=False))]:
    call()  # compile first
    profiler = cProfile.Profile()
    profiler.runcall(call)
    text = stdio.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    total = stats.total_tt
    report.append(f'== {name}, {side}x{side}: share of the run by function (tottime)')
    ranked = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:20]
    for (file, line, func), (_, _, tottime, cumtime, _) in ranked:
      where = f'{pathlib.Path(file).name}:{line}({func})'
      report.append(f'{100 * tottime / total:5.1f}%  (cum {100 * cumtime / total:5.1f}%)  '
                    f'{where}')
  del tiff
  return '\n'.join(report)


def main(argv):
  del argv
  workdir = pathlib.Path(FLAGS.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if FLAGS.size % TILE:
    raise app.UsageError(f'--size must be a multiple of {TILE}')
  if FLAGS.profile:
    build(workdir / f'nuclei_{FLAGS.size}_v0.4.ome.zarr', FLAGS.size, '0.4', None)
    print(profile(workdir, FLAGS.profile))
    return
  results = {'machine': common.machine(), 'size': FLAGS.size, 'block': FLAGS.block,
             'scheduler': FLAGS.scheduler, 'instances': FLAGS.instances, 'runs': []}
  built = None
  for version in FLAGS.versions:
    path = workdir / f'nuclei_{FLAGS.size}_v{version}.ome.zarr'
    build(path, FLAGS.size, version, built)
    built = path
    results['runs'].append(predict(path, workdir / f'out_v{version}', FLAGS.size ** 2, True))
    print(json.dumps(results['runs'][-1]))
  if FLAGS.baseline:
    tiff, small = corner(built, FLAGS.baseline, workdir / 'corners')
    memory = predict(tiff, workdir / 'out_memory', FLAGS.baseline ** 2, False)
    blocks = predict(small, workdir / 'out_corner', FLAGS.baseline ** 2, True)
    results['baseline'] = {'in_memory': memory, 'chunked': blocks,
                           'chunked_over_in_memory_speed': round(
                               memory['seconds'] / blocks['seconds'], 3),
                           **agreement(workdir / 'out_memory', workdir / 'out_corner',
                                       tiff.stem)}
    print(json.dumps(results['baseline']))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=1) + '\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
