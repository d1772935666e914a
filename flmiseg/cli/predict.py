"""Masks for the user's own images: `--mode=predict`.

  python -m flmiseg.main --mode=predict --workdir=RUN --input=PATH --output=OUT \
      [--tta] [--save_prob] [--instances] [--channel=N] [--axes=CZYX] [--pixel_size=0.1]
      [--diameter=12]

RUN is a trained run directory: its config.json decides the model and the preprocessing.
PATH is an image file, a folder (its image files, not recursive) or a glob ('data/*.tif') of
8/16-bit or float TIFF (plain, ImageJ hyperstack or OME-TIFF) or PNG images of any size.
Axes come from the file's OME/ImageJ metadata (`--axes` for files without); a multi-channel
image needs `--channel`, unless the model was trained on one channel of such images
(config.data.channel, then the default; RGB images take a colour only from `--channel`); Z
and T planes are predicted plane by plane and written back with the same axes. For each
input `<name>.<ext>` (`<name>.ome.tif` too) OUT receives:
  <name>_mask.tif      uint8 0/255, the input's shape without its channel axis;
  <name>_overlay.png   the image (1-99.8 percentile display range; the middle plane of a
                       stack) with the mask's contour in yellow;
  <name>_prob.tif      float32 foreground probability, with --save_prob;
  <name>_instances.tif uint16 instance labels (per plane), objects smaller than --min_size
                       pixels removed, with --instances: split by the model's instance head
                       (config.model.instance_head, flmiseg/objects/instances.py) when it has one,
                       else 8-connected components of the mask (touching objects merge);
  <name>_objects.csv   with --instances, one row per object: plane, label, area, centroid
                       (in um and um^2 when the pixel size is known, else pixels) and mean
                       intensity of the input.
(`.ome.tif` instead of `.tif` for OME-TIFF inputs.) Every TIFF carries the input's axes and
pixel size (ImageJ resolution and unit, or OME PhysicalSize). When two inputs share a name
(a.tif, a.png), the extension joins it (a_tif_mask.tif).

This module is the file layer: it finds the inputs, reads their axes, names and writes the
outputs (the pictures and tables: flmiseg/cli/render.py). The model is loaded once
(flmiseg/inference/model.py) and every image goes through the inference core
(flmiseg/inference/segment.py), as `flmiseg.load(...).segment(array)` does:
  * repaired (`preprocess.repair`): NaN/inf pixels and a stitching border of fill values are
    no data (background, 0 in every output, one warning line), hot pixels take their
    neighbours' median;
  * when both the image's pixel size (metadata or --pixel_size) and the model's
    (config.data.pixel_size) are known and differ by more than 10 %, the image is resized
    to the model's pixel size and the probabilities back (--no_rescale: never); with
    --diameter (the objects' typical diameter, pixels; 0: measured on a first pass) it is
    resized instead so its objects match the model's (config.data.object_diameter, the
    shipped nucleus model's 31 px);
  * normalised once, over the whole plane, with the run's method, so every tile sees the same
    statistics (flmiseg/data/preprocess.py: the same intensities give the same mask whatever
    the bit depth or exposure);
  * cut into tiles of the training crop size (--tile to change; rounded up to a multiple of
    32, the networks' stride) overlapping by --overlap,
    batched over the devices, and blended with Gaussian weights (flmiseg/inference/tiling.py);
  * with --tta, averaged over the 8 flips/rotations of each tile;
  * thresholded at --threshold, else the threshold calibrated for the best checkpoint, else
    config.eval.threshold (flmiseg/store/settings.py).
A one-line warning names each image whose normalised statistics lie far outside the training
images' (DIR/input_stats.json) or whose mask is empty or covers nearly everything.
Images bigger than memory go block by block into an OME-Zarr (`run_chunked`,
flmiseg/chunked/: the zarr extra): a zarr input (an OME-Zarr, NGFF 0.4 or 0.5, or a zarr
array with --axes) always, a tiled or pyramidal TIFF with --chunked; --level picks the
pyramid level, --scheduler the Dask engine (threads, processes or a dask.distributed
address), --block the blocks' side; OUT receives <name>.ome.zarr (the probability image with
labels/mask and, with --instances, labels/instances) and <name>_objects.csv;
--labels_into_input writes the label images into the input's own labels/ group instead. A
killed run started again continues. Never writes into an input folder (but for
--labels_into_input), refuses to replace existing results unless --overwrite, and creates
nothing when the run has no trained model. Files that are not images are skipped with a
warning; images that cannot be read are skipped too and reported at the end as an error
(exit status 2).
"""

import dataclasses
import glob
import os
import pathlib

from absl import logging
import jax
import numpy as np
import tqdm

from flmiseg.cli import render
from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import preprocess
from flmiseg.export import onnx_backend
from flmiseg.inference import model as model_lib
from flmiseg.inference import segment
from flmiseg.inference import tiling
from flmiseg.store import settings as stored

_GLOB_CHARS = '*?['
OUTPUT_KINDS = ('mask', 'overlay', 'prob', 'instances', 'objects')
# The backend when --backend is not given (docs/benchmarks.md times both on a CPU).
BACKENDS = ('jax', 'onnx')  # --backend: JAX, or ONNX Runtime on the CPU
DEFAULT_BACKEND = 'jax'


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options(segment.Settings):
  """What --mode=predict was asked to do (see flmiseg/main.py for the flags): where to read
  and write, and how to segment (segment.Settings)."""
  input: str
  output: str
  save_prob: bool = False
  axes: str = ''  # Axes of files without metadata ('' = from the file).
  overwrite: bool = False
  backend: str = DEFAULT_BACKEND  # or 'onnx': ONNX Runtime (flmiseg/export/onnx_backend.py).
  # Chunked prediction (flmiseg/chunked/): None: for zarr inputs only.
  chunked: bool | None = None
  level: int = 0  # The pyramid level.
  scheduler: str = 'threads'  # threads, processes or a dask.distributed scheduler address.
  workers: int = 0  # Threads or processes of the local schedulers; 0: 2 threads, or a CPU each.
  block: int = 0  # The blocks' side; 0: flmiseg/chunked/run.py's DEFAULT_BLOCK.
  halo: int | None = None  # None: run.default_halo.
  labels_into_input: bool = False
  ngff_version: str | None = None  # '0.4' or '0.5'; None: the input's, else 0.5.

  def is_chunked(self) -> bool:
    """Whether the input is predicted block by block (a zarr input, or --chunked)."""
    return self.chunked if self.chunked is not None else is_zarr(self.input)

  def check(self) -> None:
    """Raises UserError naming the first invalid option."""
    super().check()
    if not self.is_chunked():
      given = [f for f, v in (('--level', self.level), ('--block', self.block),
                              ('--halo', self.halo is not None),
                              ('--labels_into_input', self.labels_into_input),
                              ('--ngff_version', self.ngff_version),
                              ('--scheduler', self.scheduler != 'threads'),
                              ('--workers', self.workers)) if v]
      if given:
        raise UserError(f'{given[0]} is for chunked prediction: a zarr --input, or --chunked '
                        'for a tiled TIFF')
    elif self.backend != DEFAULT_BACKEND:
      raise UserError(f'--backend={self.backend}: chunked prediction runs on JAX')
    if self.axes:
      io.check_axes_flag(self.axes)
    if self.backend not in BACKENDS:
      raise UserError(f'--backend={self.backend!r}: valid: {", ".join(BACKENDS)}')
    if not self.output:
      raise UserError('--output is required with --mode=predict (a folder for the results)')

  def kinds(self) -> tuple[str, ...]:
    """The outputs written per image."""
    return ('mask', 'overlay') + (('prob',) if self.save_prob else ()) + (
        ('instances', 'objects') if self.instances else ())


# ----------------------------------------------------------------------------- inputs

def is_zarr(spec: str) -> bool:
  """Whether --input names a zarr image (X.zarr, X.ome.zarr, or a folder with zarr
  metadata), predicted block by block."""
  path = pathlib.Path(spec) if spec else None
  return bool(path) and path.is_dir() and (path.name.lower().endswith('.zarr') or any(
      (path / f).exists() for f in ('zarr.json', '.zgroup', '.zarray')))


def find_inputs(spec: str) -> tuple[list[pathlib.Path], list[str]]:
  """(image files, skipped notes) for a file, folder or glob; raises if nothing matches."""
  if not spec:
    raise UserError('--input is required with --mode=predict (a file, folder or glob)')
  path = pathlib.Path(spec)
  if any(c in spec for c in _GLOB_CHARS) and not path.exists():
    candidates = [pathlib.Path(p) for p in sorted(glob.glob(spec))]
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
      raise UserError(f'--input={spec}: no file matches this pattern')
  elif path.is_dir():
    candidates = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith('.'))
    if not candidates:
      raise UserError(f'--input={spec}: the folder has no files')
  elif path.is_file():
    candidates = [path]
  else:
    raise UserError(f'--input={spec}: no such file or folder')
  images = [p for p in candidates if p.suffix.lower() in io.IMAGE_SUFFIXES]
  skipped = [f'{p} (not an image: {p.suffix or "no extension"})' for p in candidates
             if p.suffix.lower() not in io.IMAGE_SUFFIXES]
  for note in skipped:
    logging.warning('Skipping %s', note)
  if not images:
    raise UserError(f'--input={spec}: no image files (.tif, .tiff, .png, ...) found')
  return images, skipped


def output_names(inputs: list[pathlib.Path]) -> list[str]:
  """The output stem of each input: its name without extension (and without '.ome'),
  unique within the run."""
  stems = [io.output_stem(p)[0] for p in inputs]
  names = [f'{stem}_{p.suffix.lstrip(".").lower()}' if stems.count(stem) > 1 else stem
           for stem, p in zip(stems, inputs)]
  seen = {}
  for name, p in zip(names, inputs):
    if name in seen:
      raise UserError(f'--input: {seen[name]} and {p} would write the same outputs '
                      f'({name}_mask.tif); predict them into separate --output folders')
    seen[name] = p
  return names


def output_path(out: pathlib.Path, name: str, kind: str, ome: bool) -> pathlib.Path:
  """OUT/<name>_<kind>.tif (.ome.tif for OME inputs; the overlay is a PNG)."""
  if kind == 'overlay':
    return out / f'{name}_overlay.png'
  if kind == 'objects':
    return out / f'{name}_objects.csv'
  return out / f'{name}_{kind}{".ome.tif" if ome else ".tif"}'


def check_output(out: pathlib.Path, inputs: list[pathlib.Path], names: list[str],
                 options: Options) -> None:
  """Refuses an output folder that is an input folder, a file, or would replace existing
  results; creates nothing."""
  out_resolved = out.resolve()
  for folder in sorted({p.parent.resolve() for p in inputs}):
    if out_resolved == folder:
      raise UserError(f'--output={options.output} is the folder of the input images; choose '
                      'another folder so that results never mix with (or replace) your data')
  if out.exists() and not out.is_dir():
    raise UserError(f'--output={options.output} is a file, not a folder')
  existing = [output_path(out, n, k, io.output_stem(p)[1])
              for p, n in zip(inputs, names) for k in options.kinds()]
  existing = [p for p in existing if p.exists()]
  if existing and not options.overwrite:
    more = f' and {len(existing) - 1} other result(s)' if len(existing) > 1 else ''
    raise UserError(f'{existing[0]} exists{more}; use --overwrite to replace, or another '
                    '--output')


def make_output(out: pathlib.Path, options: Options) -> None:
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'--output={options.output}: cannot create it ({e.strerror})') from e
  if not os.access(out, os.W_OK):
    raise UserError(f'--output={options.output}: not writable')


# ----------------------------------------------------------------------------- one image

def image_channel(config, image, path, channel: int | None) -> int | None:
  """The channel to segment of a read `image`: `channel` (--channel), else the one the model
  was trained on (config.data.channel) when the image has channels."""
  trained_channel = config.data.channel  # -1: trained on single-channel images
  if channel is None and trained_channel >= 0 and 'C' in image.axes:
    count = image.data.shape[image.axes.index('C')]
    if trained_channel >= count:
      raise UserError(f'{path}: {count} channel(s), but the model was trained on channel '
                      f'{trained_channel} (config.data.channel); choose one with --channel=N')
    channel = trained_channel
  return channel


def predict_file(model: model_lib.Model, predictor: segment.Predictor, path: pathlib.Path,
                 name: str, out: pathlib.Path, options: Options) -> list[str]:
  """Predicts one file with `predictor` (of `model`) at resolved `options` and writes its
  outputs; returns its warning lines."""
  image = io.read_image_file(path, options.axes or None,
                             rgb_as_channels=options.channel is not None, missing_ok=True)
  channel = image_channel(model.config, image, path, options.channel)
  planes, out_axes, out_shape = io.select_planes(image, channel, path)
  planes, missing, notes = preprocess.repair(planes, path)
  pixel_size = options.pixel_size or image.pixel_size
  found = segment.segment_planes(predictor, planes, options, pixel_size, missing)
  write = lambda kind, array: io.write_tiff(  # pylint: disable=g-long-lambda
      output_path(out, name, kind, image.ome), io.restore_axes(array, out_axes, out_shape),
      axes=out_axes, pixel_size=pixel_size)
  write('mask', (found.mask * 255).astype(np.uint8))
  middle = len(planes) // 2
  render.write_overlay(output_path(out, name, 'overlay', image.ome), planes[middle],
                       found.mask[middle])
  if options.save_prob:
    write('prob', found.outputs[..., 0])
  if options.instances:
    write('instances', found.labels)
    render.write_objects(output_path(out, name, 'objects', image.ome), found.labels, planes,
                         pixel_size)
  warning = segment.image_warning(path, found.stats, found.mask, model.input_stats)
  return notes + [f'{path}: {note}' for note in found.notes] + ([warning] if warning else [])


# ----------------------------------------------------------------------------- driver

def load_predictor(model: model_lib.Model, options: Options) -> segment.Predictor:
  """The Predictor of `model` on options.backend: JAX over this process's devices, or ONNX
  Runtime (flmiseg/export/onnx_backend.py)."""
  if options.backend == 'onnx':
    return onnx_backend.predictor(model, options)
  return model.predictor(options)


def run(config, workdir, options: Options) -> dict:
  """Predicts every input image; returns {'written': [...], 'skipped': [...], ...}.

  `config` is the run's (flmiseg/store/rundir.py: with the command line's inference
  settings); nothing is created unless the run holds a trained model and every option is
  valid.
  """
  workdir = pathlib.Path(workdir)
  options.check()
  if options.is_chunked():
    return run_chunked(config, workdir, options)
  inputs, skipped = find_inputs(options.input)
  if jax.process_count() > 1:  # every process predicts its own share on its own devices
    inputs = inputs[jax.process_index()::jax.process_count()]
  names = output_names(inputs)
  out = pathlib.Path(options.output)
  check_output(out, inputs, names, options)
  segment.check_diameter(config, options.diameter, workdir)
  segment.check_dim_gain(config, options.dim_gain, workdir)
  model = model_lib.Model(workdir, config)
  predictor = load_predictor(model, options)
  options, source = model.resolved(options)
  source = '--threshold' if source == stored.GIVEN else source
  if note := tiling.tile_note(options.tile, config):
    logging.warning('%s', note)
  created = not out.exists()
  make_output(out, options)
  if options.instances and (note := model.instance_note()):
    logging.warning('%s', note)
  logging.info('Predicting %d image(s) with the step-%d checkpoint of %s, threshold %.3f '
               '(%s)%s', len(inputs), model.step, workdir, options.threshold, source,
               ', 8x TTA' if options.tta else '')
  written, failed = [], []
  for path, name in tqdm.tqdm(list(zip(inputs, names)), desc='images', unit='image',
                              leave=False, disable=len(inputs) == 1):
    try:
      notes = predict_file(model, predictor, path, name, out, options)
    except UserError as e:
      if len(inputs) == 1:
        _remove_if_empty(out, created)
        raise
      logging.warning('Skipping %s', e)
      failed.append(str(e))
      continue
    for note in notes:
      logging.warning('%s', note)
    written.append(name)
  result = {'written': written, 'skipped': skipped, 'failed': failed,
            'threshold': options.threshold, 'threshold_source': source, 'output': str(out)}
  if failed:
    _remove_if_empty(out, created)
    raise UserError(f'{len(failed)} of {len(inputs)} image(s) could not be predicted (the '
                    f'others were written to {out}): {"; ".join(failed)}')
  return result


def _remove_if_empty(out: pathlib.Path, created: bool) -> None:
  """Removes the output folder this run created when nothing was written into it."""
  if created and out.is_dir() and not any(out.iterdir()):
    out.rmdir()


def run_chunked(config, workdir: pathlib.Path, options: Options) -> dict:
  """Predicts one image bigger than memory block by block (flmiseg/chunked/run.py); returns
  predict's summary ({'written', 'skipped', 'failed', 'threshold', ...}) and the chunked
  run's ('blocks', 'resumed', 'objects', 'table')."""
  if not options.output:
    raise UserError('--output is required with --mode=predict (a folder for the results)')
  try:
    from flmiseg.chunked import run as chunked  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'--input={options.input}: chunked prediction needs the zarr extra '
                    f'(pip install "flmiseg[zarr]"; {e})') from e
  segment.check_diameter(config, options.diameter, workdir)
  if options.dim_gain:
    raise UserError(f'--dim_gain={options.dim_gain:g}: not block by block (a zarr input or '
                    '--chunked): the dim pass needs the first pass\'s objects over the whole '
                    'image')
  model = model_lib.Model(workdir, config)
  if options.instances and (note := model.instance_note()):
    logging.warning('%s', note)
  result = chunked.segment_zarr(
      model, options.input, options.output, axes=options.axes or None, level=options.level,
      channel=options.channel, threshold=options.threshold, tta=options.tta,
      instances=options.instances, min_size=options.min_size, pixel_size=options.pixel_size,
      diameter=options.diameter, rescale=options.rescale, tile=options.tile,
      overlap=options.overlap, save_prob=options.save_prob,
      block=options.block or chunked.DEFAULT_BLOCK, halo=options.halo,
      scheduler=options.scheduler, workers=options.workers, overwrite=options.overwrite,
      into_input=options.labels_into_input, ngff_version=options.ngff_version)
  for note in result['notes']:
    logging.warning('%s', note)
  source = '--threshold' if result['threshold_source'] == stored.GIVEN else (
      result['threshold_source'])
  return {**result, 'written': [result['output']], 'skipped': [], 'failed': [],
          'threshold_source': source}
