"""`segment_zarr`: a model segments an image bigger than memory, block by block, on Dask.

  import flmiseg
  model = flmiseg.load('nucleus')
  flmiseg.segment_zarr(model, 'slide.ome.zarr', 'out/', instances=True)   # threads
  flmiseg.segment_zarr(model, 'slide.ome.zarr', 'out/', scheduler='tcp://head:8786')

The run, in passes over the blocks of each plane (flmiseg/chunked/grid.py), each recorded as
it finishes (flmiseg/chunked/job.py: State), so a run killed at any point and started again
with the same arguments continues and ends with the output an uninterrupted run writes:

  1. statistics: the plane's hot-pixel bounds and normalisation, once (statistics.py);
  2. prediction: each block's probability, mask and instance labels (blocks.py), one
     progress bar over the blocks;
  3. with instances, linking: the parts of objects that cross block borders joined into one
     label (link.py), the blocks relabelled, the objects table streamed;
  4. the pyramids (every level from the one before), then the NGFF metadata (ngff.py).

Everything is checked before anything is written: the input (sources.py), the settings, the
block size against the halo, the outputs (an existing one is replaced only with overwrite,
except the unfinished run with the same arguments, which continues), the scheduler.
"""

import dataclasses
import functools
import json
import math
import pathlib
import shutil

import numpy as np

from flmiseg.chunked import blocks
from flmiseg.chunked import engine
from flmiseg.chunked import grid as grid_lib
from flmiseg.chunked import job as job_lib
from flmiseg.chunked import link
from flmiseg.chunked import ngff
from flmiseg.chunked import sources
from flmiseg.chunked import statistics
from flmiseg.core.errors import UserError
from flmiseg.data import preprocess
from flmiseg.inference import segment

DEFAULT_BLOCK = 2048  # core side of a block (and of the outputs' chunks), pixels
MIN_HALO = 32  # pixels of extended region around a core, at least
HALO_DIAMETERS = 2.0  # and this many of the model's object diameters (object_diameter)


def default_halo(model, settings: segment.Settings, factor: float = 1.0) -> int:
  """The halo for `model`, in the image's pixels: at least the tiles' overlap, MIN_HALO and
  HALO_DIAMETERS object diameters (so that an object crossing a core's border is seen whole by
  both blocks), and with blocks resized by `factor` half a tile (so that the network sees
  every core pixel with the context the whole plane gives it), all in the model's pixels,
  divided by `factor` and rounded up to a multiple of 16."""
  tile = model.predictor(settings).tile
  diameter = model.object_diameter or 0.0
  halo = max(MIN_HALO, math.ceil(tile * settings.overlap), math.ceil(HALO_DIAMETERS * diameter),
             tile // 2 if factor != 1.0 else 0)
  halo = math.ceil(halo / factor)
  return -(-halo // 16) * 16


def _check(model, source: sources.Source, settings: segment.Settings,
           pixel_size) -> tuple[float, str | None]:
  """(how much each block is resized for the model, a note saying so or None), as the
  in-memory path decides it (`segment.model_factor`: by --diameter, else by the pixel size of
  the level, `pixel_size`). Raises UserError for what the chunked path does not do: a first
  pass to measure the objects, a normalisation of the whole plane's fixed grid."""
  if settings.diameter == segment.AUTO_DIAMETER:
    raise UserError('--diameter=0 (measured on a first pass) needs the whole image: give the '
                    'objects\' diameter in pixels for a zarr input')
  data = model.config.data
  method = preprocess.resolve(data.normalization, data.kind)
  if method not in preprocess.BLOCKWISE_METHODS:
    raise UserError(f'config.data.normalization={method}: runs CLAHE on a fixed grid of the '
                    'whole plane, which chunked prediction cannot split into blocks')
  factor, note = segment.model_factor(model.config, pixel_size, settings.diameter,
                                      settings.rescale)
  return factor, f'{source.layout.path} (level {source.level}): {note}' if note else None


def _outputs(source: sources.Source, dst: str, instances: bool,
             into_input: bool) -> job_lib.Outputs:
  out = pathlib.Path(dst)
  table = str(out / f'{source.name}_objects.csv') if instances else None
  state = str(out / f'.{source.name}.chunked')
  if into_input:
    return job_lib.Outputs(None, str(pathlib.Path(source.layout.path) / 'labels'), table, state)
  image = out / f'{source.name}.ome.zarr'
  return job_lib.Outputs(str(image), str(image / 'labels'), table, state)


def _existing_expected(outputs: job_lib.Outputs, names: list[str]) -> list[str]:
  """The zarr groups a run creates before it predicts (its table comes at the end)."""
  return [outputs.image] if outputs.image else [outputs.label(n) for n in names]


def _existing(outputs: job_lib.Outputs, names: list[str]) -> list[str]:
  paths = _existing_expected(outputs, names) + ([outputs.table] if outputs.table else [])
  return [p for p in paths if pathlib.Path(p).exists()]


def _prepare(outputs: job_lib.Outputs, names: list[str], identity: dict,
             overwrite: bool) -> bool:
  """Whether the run continues an unfinished one; removes what overwrite replaces. Raises
  UserError (writing nothing) for outputs that exist without overwrite."""
  state = job_lib.State(outputs.state)
  previous = state.identity()
  existing = _existing(outputs, names)
  if previous == identity and not overwrite:
    created = [pathlib.Path(p).exists() for p in _existing_expected(outputs, names)]
    if state.done('setup', 'outputs') and not all(created):
      state.remove()  # its outputs were deleted since: start again
      return False
    return True
  if (existing or previous is not None) and not overwrite:
    if previous is not None and not existing:
      raise UserError(f'{outputs.state} holds an unfinished run with other settings; use '
                      '--overwrite to start again, or another --output')
    raise UserError(f'{existing[0]} exists; use --overwrite to replace it, or another '
                    '--output')
  for path in existing:
    target = pathlib.Path(path)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
  state.remove()
  return False


def _axes(source: sources.Source) -> ngff.Axes:
  letters = source.plane_axes
  layout = source.layout
  if layout.kind == 'ome-zarr':
    index = [layout.axes.index(a) for a in letters]
    return ngff.Axes(letters, tuple(layout.units[i] for i in index),
                     tuple(float(layout.scales[source.level][i]) for i in index))
  size = source.pixel_size
  units = tuple('micrometer' if size and a in 'YX' else None for a in letters)
  return ngff.Axes(letters, units, tuple(size if size and a in 'YX' else 1.0 for a in letters))


def _create(job: job_lib.Job, names: list[str], version: str) -> None:
  """The output groups and arrays (all pyramid levels, empty); idempotent."""
  shape = (*job.source.plane_shape, *job.grid.shape)
  chunk, axes = job.grid.size, job.source.plane_axes
  if job.outputs.image is not None:
    root = ngff.open_group(job.outputs.image, 'a', version)
    if '0' not in root:
      ngff.create_multiscale(root, shape, chunk, np.float32 if job.save_prob else np.uint8,
                             axes)
  labels = ngff.open_group(job.outputs.labels, 'a', version)
  for name in names:
    if name not in labels:
      group = labels.create_group(name)
      ngff.create_multiscale(group, shape, chunk,
                             np.uint8 if name == 'mask' else np.dtype(job.id_dtype), axes)


def _write_metadata(job: job_lib.Job, names: list[str], version: str) -> None:
  axes = _axes(job.source)
  levels = len(ngff.level_shapes((*job.source.plane_shape, *job.grid.shape), job.grid.size))
  if job.outputs.image is not None:
    root = ngff.open_group(job.outputs.image, 'r+')
    root.attrs.update(ngff.image_attrs(axes, levels, 'probability', version))
  labels = ngff.open_group(job.outputs.labels, 'r+')
  for name in names:
    labels[name].attrs.update(ngff.label_attrs(axes, levels, name, version))
  attrs = ngff.labels_attrs(dict(labels.attrs), names, version)
  labels.attrs.update(attrs)


# ----------------------------------------------------------------------------- statistics

def _reader(source: sources.Source, plane: tuple[int, ...]):
  return lambda rows, cols: source.read(plane, rows, cols)


def _median_task(source, item):
  plane, rows, cols = item
  return statistics.pass_median(_reader(source, plane), source.shape, rows, cols)


def _repaired_task(source, hot, blurred, item):
  plane, rows, cols = item
  return statistics.pass_repaired(_reader(source, plane), source.shape, rows, cols, hot,
                                  blurred)


def _clahe_task(source, hot, norm, item):
  plane, rows, cols = item
  return statistics.pass_clahe(_reader(source, plane), source.shape, rows, cols, hot, norm)


def measure(source: sources.Source, index: int, grid: grid_lib.Grid, config, run) -> (
    statistics.PlaneStats):
  """The `PlaneStats` of plane `index` (module docstring of statistics.py); `run(fn, items)`
  runs block tasks on the engine."""
  method, kind = config.data.normalization, config.data.kind
  plane = source.planes()[index]
  if not statistics.exact(source.dtype):
    windows = [source.read(plane, rows, cols) for rows, cols in
               statistics.sample_windows(grid.shape)]
    return statistics.sampled(windows, method, kind, grid.shape)
  items = [(plane, *b.core) for b in grid.blocks(1)]
  median = statistics.merge(run(functools.partial(_median_task, source), items))
  hot = tuple(statistics.percentiles(median, preprocess.HOT_PIXEL_PERCENTILES))
  percentile = preprocess.resolve(method, kind) == 'percentile'
  parts = run(functools.partial(_repaired_task, source, hot, percentile), items)
  stats = statistics.HistogramStatistics(
      statistics.merge([p[0] for p in parts]), statistics.merge([p[1] for p in parts]),
      statistics.merge([p[2] for p in parts]) if percentile else None, grid.shape[1])

  def clahe_moments(norm):
    counts = run(functools.partial(_clahe_task, source, hot, norm), items)
    return statistics.clahe_moments(statistics.merge(counts))

  norm = preprocess.normalization(stats, method, kind, grid.shape, clahe_moments)
  return statistics.PlaneStats(hot, norm, exact=True)


def _stats_to_json(stats: statistics.PlaneStats) -> str:
  return json.dumps(dataclasses.asdict(stats))


def _stats_from_json(text: str) -> statistics.PlaneStats:
  raw = json.loads(text)
  norm = dict(raw['norm'], shape=tuple(raw['norm']['shape']))
  return statistics.PlaneStats(tuple(raw['hot']), preprocess.Normalization(**norm),
                               raw['exact'])


# ----------------------------------------------------------------------------- passes

def _downsample_task(item):
  source, target, index = item
  ngff.downsample_chunk(blocks.array(source), blocks.array(target), index)


def _pyramids(job: job_lib.Job, names: list[str], run) -> None:
  groups = ([job.outputs.image] if job.outputs.image else []) + [
      job.outputs.label(n) for n in names]
  state = job_lib.State(job.outputs.state)
  levels = len(ngff.level_shapes((*job.source.plane_shape, *job.grid.shape), job.grid.size))
  for group in groups:
    for level in range(1, levels):
      key = f'{pathlib.Path(group).name}_{level}'
      if state.done('pyramid', key):
        continue
      target = blocks.array(f'{group}/{level}')
      items = [(f'{group}/{level - 1}', f'{group}/{level}', index)
               for index in ngff.chunk_indices(target)]
      run(_downsample_task, items)
      state.mark('pyramid', key)


def _link(job: job_lib.Job, all_blocks: list, run) -> dict:
  """{plane: (ids, roots)}: the map of joined objects, computed once (recorded)."""
  state = job_lib.State(job.outputs.state)
  if not state.has('links', 'all'):
    found = run(functools.partial(link.block_links, job), all_blocks)
    arrays = {}
    for plane in sorted({b.plane for b in all_blocks}):
      ids, roots = link.join([f for f, b in zip(found, all_blocks) if b.plane == plane])
      arrays[f'ids_{plane}'], arrays[f'roots_{plane}'] = ids, roots
    state.save('links', 'all', **arrays)
  saved = state.load('links', 'all')
  maps = {int(k.split('_')[1]): (saved[k], saved[f'roots_{k.split("_")[1]}'])
          for k in saved if k.startswith('ids_')}
  items = []
  for plane, (ids, roots) in maps.items():
    for name, (keys, values) in link.split(job, ids, roots, plane).items():
      _, row, col = name.split('_')
      block = job.grid.block(plane, int(row), int(col))
      if not state.done('relabel', name):
        items.append((block, keys, values))
  run(functools.partial(link.relabel, job), items)
  return maps


# ----------------------------------------------------------------------------- the run

def _identity(model, source, settings, grid, outputs, save_prob, version) -> dict:
  """What makes two runs the same run (run.json, as JSON reads it back): a run continues
  only its own records."""
  return json.loads(json.dumps({
      'input': str(pathlib.Path(source.layout.path).resolve()), 'level': source.level,
      'channel': source.channel, 'axes': source.layout.axes,
      'model': str(model.folder.resolve()), 'step': model.step,
      'settings': dataclasses.asdict(settings), 'grid': dataclasses.asdict(grid),
      'outputs': dataclasses.asdict(outputs), 'save_prob': save_prob, 'ngff': version}))


def segment_zarr(model, src: str, dst: str, *, axes: str | None = None, level: int = 0,
                 channel: int | None = None, threshold: float | None = None,
                 tta: bool = False, instances: bool = False, min_size: int | None = None,
                 pixel_size: float | None = None, diameter: float | None = None,
                 rescale: bool = True, tile: int = 0, overlap: float = 0.25,
                 save_prob: bool = False, block: int = DEFAULT_BLOCK,
                 halo: int | None = None, scheduler: str = 'threads', workers: int = 0,
                 overwrite: bool = False, into_input: bool = False,
                 ngff_version: str | None = None, progress: bool = True) -> dict:
  """Segments the image `src` (OME-Zarr, zarr array with `axes`, or tiled/pyramidal TIFF) at
  pyramid `level` with `model` (flmiseg.load), block by block, into `dst`.

  Args:
    model: a flmiseg Model.
    src, dst: the input; the output folder (its <name>.ome.zarr, <name>_objects.csv).
    axes, level, channel: how to read the input (sources.open_source).
    threshold ... overlap: as Model.segment (the in-memory path's settings); pixel_size
      None: the level's, from the input's metadata. With a pixel size or diameter that calls
      for it, each block is resized for the model and its outputs back (grid.py).
    save_prob: the probability image as float32 (else uint8, 255 x the probability).
    block: the blocks' (and chunks') side; halo: their extended region (None: default_halo),
      in the image's pixels.
    scheduler: 'threads', 'processes' or a dask.distributed scheduler's address;
      workers: threads or processes of the local ones (0: 2 threads, a process per CPU).
    overwrite: replace existing outputs (else they are an error; an unfinished run of the
      same arguments continues).
    into_input: write the label images into the input OME-Zarr's labels/ group.
    ngff_version: '0.4' or '0.5' (None: the input's, else 0.5).
    progress: show the bar over the blocks.
  Returns:
    {'output', 'labels', 'table', 'blocks', 'resumed', 'objects', 'threshold',
     'threshold_source', 'notes'}.
  Raises:
    UserError (one line, nothing written) for bad input, settings, outputs or scheduler.
  """
  settings = segment.Settings(tile=tile, overlap=overlap, tta=tta, threshold=threshold,
                              instances=instances, min_size=min_size, channel=channel,
                              pixel_size=pixel_size, diameter=diameter, rescale=rescale)
  settings.check()
  segment.check_diameter(model.config, diameter, model.folder)
  source = sources.open_source(src, axes, level, channel)
  factor, resized = _check(model, source, settings, pixel_size or source.pixel_size)
  if factor == 1.0 and model.resolved(settings)[0].diameter == segment.AUTO_DIAMETER:
    # The model measures objects on a first pass in memory: not over a whole image here.
    resized = (f'{source.layout.path}: not resized by the size of its objects, which the '
               'model measures on a first pass in memory; give --diameter to resize')
  settings, threshold_source = model.resolved(settings, measure=False)
  halo = default_halo(model, settings, factor) if halo is None else halo
  _check_block(block, halo)
  # Only instances, and the network's context of resized blocks, look past a block's core.
  halo = halo if instances or factor != 1.0 else 0
  version = _version(source, ngff_version, into_input)
  if into_input and save_prob:
    raise UserError('--save_prob with --labels_into_input: a probability is not a label '
                    'image; write a new OME-Zarr instead')
  grid = grid_lib.Grid(source.shape, block, halo, model.predictor(settings).tile, overlap,
                       factor)
  outputs = _outputs(source, dst, instances, into_input)
  names = ['mask'] + (['instances'] if instances else [])
  id_dtype = 'uint32' if grid.shape[0] * grid.shape[1] < 2 ** 32 - 1 else 'uint64'
  job = job_lib.Job(source, job_lib.ModelRecipe.of(model), settings, grid, (), outputs,
                    id_dtype, save_prob)
  identity = _identity(model, source, settings, grid, outputs, save_prob, version)
  with engine.Engine(scheduler, workers) as runner:  # an unreachable address: UserError
    result = _run(model, job, names, version, identity, overwrite, runner, progress,
                  threshold_source)
  return {**result, 'notes': ([resized] if resized else []) + result['notes']}


def _check_block(block: int, halo: int) -> None:
  if block < 16 or halo < 0:
    raise UserError(f'--block={block}: use at least 16 pixels' if block < 16 else
                    f'--halo={halo}: must be >= 0')
  if halo > block:  # an extended region would reach past the neighbouring blocks
    raise UserError(f'--block={block}: smaller than the halo of {halo} px that each block '
                    f'reads around it (the tiles\' overlap and 2 object diameters, in the '
                    f'image\'s pixels); use --block={halo} or more')


def _version(source: sources.Source, wanted: str | None, into_input: bool) -> str:
  if into_input:
    if source.layout.kind != 'ome-zarr':
      raise UserError(f'--labels_into_input: {source.layout.path} is not an OME-Zarr image')
    if wanted and wanted != source.layout.version:
      raise UserError(f'--ngff_version={wanted}: the input is NGFF {source.layout.version}, '
                      'which its labels must follow')
    return source.layout.version
  if wanted and wanted not in ngff.FORMATS:
    raise UserError(f'--ngff_version={wanted}: valid: {", ".join(ngff.FORMATS)}')
  if wanted:
    return wanted
  return source.layout.version if source.layout.version in ngff.FORMATS else '0.5'


def _run(model, job, names, version, identity, overwrite, runner, progress,
         threshold_source) -> dict:
  resumed = _prepare(job.outputs, names, identity, overwrite)
  state = job_lib.State(job.outputs.state)
  pathlib.Path(job.outputs.state).parent.mkdir(parents=True, exist_ok=True)
  state.start(identity)
  blocks.forget_arrays()
  engine.share_model(job.recipe, model)
  if not state.done('setup', 'outputs'):
    _create(job, names, version)
    state.mark('setup', 'outputs')
  run = runner.map
  stats, notes = [], []
  for index in range(len(job.source.planes())):
    if not state.has('stats', f'p{index}'):
      measured = measure(job.source, index, job.grid, model.config, run)
      state.save('stats', f'p{index}', json=np.array(_stats_to_json(measured)))
    stats.append(_stats_from_json(str(state.load('stats', f'p{index}')['json'])))
  if not all(s.exact for s in stats):
    notes.append(f'{job.source.layout.path}: normalised with statistics sampled from '
                 f'{statistics.SAMPLES} blocks ({job.source.dtype} pixels are not counted '
                 'exactly)')
  job = dataclasses.replace(job, stats=tuple(stats))
  all_blocks = job.grid.blocks(len(job.source.planes()))
  pending = [b for b in all_blocks if not state.has('blocks', b.name)]
  run(functools.partial(blocks.predict, job), pending, desc='blocks' if progress else None)
  objects = None
  if job.settings.instances:
    maps = _link(job, all_blocks, run)
    objects = link.write_table(job, all_blocks, maps, pathlib.Path(job.outputs.table))
  _pyramids(job, names, run)
  _write_metadata(job, names, version)
  blocks.forget_arrays()
  state.remove()
  return {'output': job.outputs.image or str(pathlib.Path(job.outputs.labels).parent),
          'labels': [job.outputs.label(n) for n in names], 'table': job.outputs.table,
          'blocks': len(all_blocks), 'resumed': len(all_blocks) - len(pending) if resumed
          else 0, 'objects': objects, 'threshold': job.settings.threshold,
          'threshold_source': threshold_source, 'notes': notes}
