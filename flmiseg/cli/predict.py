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

How an image is predicted:
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
  * thresholded at the calibrated threshold stored with the best checkpoint, or
    config.eval.threshold when there is none, or --threshold.
A one-line warning names each image whose normalised statistics lie far outside the training
images' (DIR/input_stats.json) or whose mask is empty or covers nearly everything.
Never writes into an input folder, refuses to replace existing results unless --overwrite,
and creates nothing when the run has no trained model. Files that are not images are skipped
with a warning; images that cannot be read are skipped too and reported at the end as an
error (exit status 2).
"""

import csv
import dataclasses
import glob
import os
import pathlib

from absl import logging
import cv2
import jax
import numpy as np
import tqdm

from flmiseg.evaluation import calibration
from flmiseg.inference import tiling
from flmiseg.objects import instances
from flmiseg.store import rundir
from flmiseg.core import sharding
from flmiseg.data import io
from flmiseg.data import preprocess
from flmiseg.core.errors import UserError

_GLOB_CHARS = '*?['
OUTPUT_KINDS = ('mask', 'overlay', 'prob', 'instances', 'objects')
# Pixel sizes within this relative difference count as equal (no rescaling).
RESCALE_TOLERANCE = 0.1
AUTO_DIAMETER = 0.0  # --diameter=0: measured on a first pass at the image's own size
# The backend when --backend is not given (docs/benchmarks.md times both on a CPU).
BACKENDS = ('jax', 'onnx')  # --backend: JAX, or ONNX Runtime on the CPU
DEFAULT_BACKEND = 'jax'


@dataclasses.dataclass(frozen=True)
class Options:
  """What --mode=predict was asked to do (see flmiseg/main.py for the flags)."""
  input: str
  output: str
  tile: int = 0  # 0: the config's training crop size.
  overlap: float = 0.25
  batch_size: int = 0  # Tiles per device step; 0: config.eval.batch_size.
  tta: bool = False
  threshold: float | None = None  # None: calibrated, else config.eval.threshold.
  save_prob: bool = False
  instances: bool = False
  min_size: int | None = None  # None: config.eval.min_size.
  seed_dynamic: float | None = None  # None: calibrated, else config.eval.seed_dynamic.
  channel: int | None = None  # The channel of a multi-channel image.
  axes: str = ''  # Axes of files without metadata ('' = from the file).
  pixel_size: float | None = None  # Micrometres per pixel of the inputs (None = from file).
  # The inputs' typical object diameter, pixels (--diameter); AUTO_DIAMETER: measured.
  diameter: float | None = None
  rescale: bool = True  # Resize to the model's pixel size when both are known.
  overwrite: bool = False
  backend: str = 'jax'  # 'jax', or 'onnx': ONNX Runtime on the CPU (flmiseg/export/onnx_backend.py).

  def check(self) -> None:
    """Raises UserError naming the first invalid option."""
    if not 0.0 <= self.overlap < 1.0:
      raise UserError(f'--overlap={self.overlap}: must be in [0, 1)')
    if self.tile and self.tile < 16:
      raise UserError(f'--tile={self.tile}: use at least 16 pixels')
    if self.pixel_size is not None and not self.pixel_size > 0:
      raise UserError(f'--pixel_size={self.pixel_size}: must be a positive size in '
                      'micrometres')
    if self.diameter is not None and not self.diameter >= 0:
      raise UserError(f'--diameter={self.diameter:g}: must be a positive size in pixels, or 0 '
                      'to measure it')
    if self.diameter is not None and (self.pixel_size is not None or not self.rescale):
      raise UserError(f'--diameter={self.diameter:g} with '
                      f'{"--pixel_size" if self.pixel_size is not None else "--no_rescale"}: '
                      'give one (--diameter resizes by the size of the objects)')
    if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
      raise UserError(f'--threshold={self.threshold}: must be a probability in [0, 1]')
    if self.channel is not None and self.channel < 0:
      raise UserError(f'--channel={self.channel}: channels are numbered from 0')
    if self.axes:
      io.check_axes_flag(self.axes)
    if self.min_size is not None and self.min_size < 0:
      raise UserError(f'--min_size={self.min_size}: must be >= 0')
    if self.backend not in BACKENDS:
      raise UserError(f'--backend={self.backend!r}: valid: {", ".join(BACKENDS)}')
    if not self.output:
      raise UserError('--output is required with --mode=predict (a folder for the results)')

  def kinds(self) -> tuple[str, ...]:
    """The outputs written per image."""
    return ('mask', 'overlay') + (('prob',) if self.save_prob else ()) + (
        ('instances', 'objects') if self.instances else ())


# ----------------------------------------------------------------------------- inputs

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


# ----------------------------------------------------------------------------- outputs

def display_image(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W) of an image, mapping its 1-99.8 percentiles to 0-255."""
  return preprocess.stretch_to_uint8(image)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """BGR uint8 image with the mask's contours drawn in yellow."""
  bgr = cv2.cvtColor(display_image(image), cv2.COLOR_GRAY2BGR)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST,
                                 cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(bgr, contours, -1, (0, 255, 255), 1)
  return bgr


def write_objects(path: pathlib.Path, labels: np.ndarray, planes: np.ndarray,
                  pixel_size: float | None) -> None:
  """<name>_objects.csv: one row per object of each plane (instances.object_table)."""
  rows, header = [], None
  for index, (plane_labels, plane) in enumerate(zip(labels, planes)):
    header, plane_rows = instances.object_table(plane_labels, plane, pixel_size)
    rows += [[index] + row for row in plane_rows]
  tmp = path.with_name(f'.{path.name}.tmp')
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['plane'] + header)
    writer.writerows(rows)
  os.replace(tmp, path)


def _write_png(path: pathlib.Path, image: np.ndarray) -> None:
  tmp = path.with_name(f'.{path.name}.tmp.png')
  if not cv2.imwrite(str(tmp), image):
    raise UserError(f'{path}: cannot write')
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- one image

def rescale_factor(image_pixel_size: float | None, model_pixel_size: float | None,
                   allowed: bool = True) -> float:
  """How much to resize an image so its pixels match the model's (1.0: leave it)."""
  if not allowed or not image_pixel_size or not model_pixel_size:
    return 1.0
  factor = image_pixel_size / model_pixel_size
  return 1.0 if abs(factor - 1.0) <= RESCALE_TOLERANCE else factor


def check_diameter(config, diameter: float | None, model) -> None:
  """Raises UserError when --diameter is given for a model that records no object diameter
  (config.data.object_diameter)."""
  if diameter is not None and not config.data.get('object_diameter', 0.0):
    raise UserError(f'--diameter={diameter:g}: {model} records no object diameter '
                    '(config.data.object_diameter), so there is nothing to match; resize the '
                    'images, or give --pixel_size to a model that records its pixel size')


def model_factor(config, pixel_size: float | None, diameter: float | None = None,
                 allowed: bool = True) -> tuple[float, str | None]:
  """(how much to resize an image for the model, a note saying so or None): with `diameter`
  (the image's objects, pixels) so they match config.data.object_diameter, else by pixel size
  (`rescale_factor`); within RESCALE_TOLERANCE of 1, 1.0."""
  if diameter is not None:
    model_diameter = config.data.object_diameter
    factor = model_diameter / diameter
    if abs(factor - 1.0) <= RESCALE_TOLERANCE:
      return 1.0, None
    return factor, (f'resized x{factor:.3g} so its objects ({diameter:.3g} px, --diameter) '
                    f'match the model\'s ({model_diameter:g} px)')
  factor = rescale_factor(pixel_size, config.data.pixel_size or None, allowed)
  if factor == 1.0:
    return 1.0, None
  return factor, (f'resized x{factor:.3g} to the model\'s pixel size '
                  f'({config.data.pixel_size:g} um; the image\'s is {pixel_size:g} um)')


def estimated_diameter(outputs: np.ndarray, threshold: float, options,
                       missing: np.ndarray | None = None) -> tuple[float | None, str]:
  """(the objects' diameter in pixels, a note saying so) measured on the outputs (N, H, W, C)
  of a first pass over planes at their own size (`missing` pixels set to 0 in them), the
  `object_diameter` of its instances; (None, a note) when it finds no object. `options` holds
  min_size and seed_dynamic (`instance_options`)."""
  if missing is not None:
    outputs[missing] = 0.0
  diameter = object_diameter([instances.from_outputs(o, threshold, options.seed_dynamic,
                                                     options.min_size) for o in outputs])
  if diameter is None:
    return None, 'no object found to measure (--diameter=0): not resized'
  return diameter, f'its objects measure {diameter:.3g} px across (--diameter=0, a first pass)'


def planes_factor(predictor: 'Predictor', planes: np.ndarray, threshold: float,
                  options: Options, pixel_size: float | None,
                  missing: np.ndarray | None = None) -> tuple[float, list[str], tuple | None]:
  """(how much to resize raw planes (N, H, W) for the model, notes saying so, the first pass or
  None): `model_factor` of options.diameter, or with --diameter=0 of the diameter measured on
  a first pass at the planes' own size (`estimated_diameter`), whose (outputs, stats) come
  back for `segment_planes` to reuse when no resizing follows."""
  diameter, notes, first = options.diameter, [], None
  if diameter == AUTO_DIAMETER:
    first = predictor.planes(planes)
    diameter, measured = estimated_diameter(first[0], threshold, options, missing)
    notes.append(measured)
  factor, resized = model_factor(predictor.config, pixel_size, diameter, options.rescale)
  return factor, notes + ([resized] if resized else []), first if factor == 1.0 else None


def object_diameter(label_images) -> float | None:
  """The typical diameter of the objects of label images (each 0 background, 1..n its own
  objects), pixels: the area-weighted median of the diameters of circles of their areas (the
  size of the objects that cover half the foreground, so that fragments weigh little); None
  without objects."""
  areas = np.concatenate([np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
                          for labels in label_images])
  areas = np.sort(areas[areas > 0])
  if not len(areas):
    return None
  median = areas[np.searchsorted(np.cumsum(areas), areas.sum() / 2)]
  return float(2.0 * np.sqrt(median / np.pi))


def resize(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """float32 `plane` resized to `shape` (area averaging when shrinking, else bilinear)."""
  h, w = shape
  shrink = h * w < plane.shape[0] * plane.shape[1]
  return cv2.resize(plane.astype(np.float32), (w, h),
                    interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclasses.dataclass
class Predictor:
  """Probabilities of raw planes with a trained model (weights, run config, tiling)."""
  probs_of: object  # tiling.prob_fn(...)
  config: object
  tile: int
  overlap: float
  batch_size: int
  batch_multiple: int = 0  # a short last batch of tiles, rounded to this (sliding_window)

  def plane(self, raw: np.ndarray, factor: float = 1.0,
            on_batch=None) -> tuple[np.ndarray, dict]:
    """(float32 outputs (H, W, C), stats of the normalised plane) of a raw (H, W) plane,
    resized by `factor` for the network and back. Channel 0 is the foreground probability,
    channel 1 the instance head's distance (models with one). `on_batch(done, total)`, when
    given, is called with the tiles done after each batch (a progress bar)."""
    h, w = raw.shape
    scaled = raw if factor == 1.0 else resize(
        raw, (max(1, round(h * factor)), max(1, round(w * factor))))
    data = self.config.data
    normalised = preprocess.normalize(scaled, data.normalization, data.kind)
    prob = tiling.sliding_window(self.probs_of, normalised, self.tile, self.overlap,
                                    self.batch_size, progress=True, on_batch=on_batch,
                                    batch_multiple=self.batch_multiple)
    if factor != 1.0:
      prob = np.stack([np.clip(resize(c, (h, w)), 0.0, 1.0) for c in np.moveaxis(prob, -1, 0)],
                      axis=-1)
    return prob, preprocess.image_stats(normalised)

  def planes(self, planes: np.ndarray, factor: float = 1.0,
             progress=None) -> tuple[np.ndarray, list[dict]]:
    """(outputs (N, H, W, C), per-plane stats) of raw planes (N, H, W). `progress(fraction
    done)`, when given, is called after each batch of tiles."""
    results = []
    for i, p in enumerate(planes):
      on_batch = None if progress is None else (
          lambda done, total, i=i: progress((i + done / total) / len(planes)))
      results.append(self.plane(p, factor, on_batch))
    return np.stack([r[0] for r in results]), [r[1] for r in results]


def segment_planes(predictor: Predictor, planes: np.ndarray, factor: float, threshold: float,
                   options: Options, progress=None, missing: np.ndarray | None = None,
                   first: tuple | None = None):
  """(outputs (N, H, W, C), per-plane stats, mask (N, H, W) bool, instance labels (N, H, W)
  uint16 or None) of planes (N, H, W) (raw, or repaired by `preprocess.repair`, whose map of pixels
  without data, `missing`, then gets outputs 0: background, in no instance): the
  probabilities thresholded at `threshold`, and with options.instances the instances
  (`instances.from_outputs`, with options.seed_dynamic and options.min_size filled in by
  `instance_options`). `first`: the (outputs, stats) of these planes at this factor, already
  computed (`planes_factor`)."""
  if first is None:
    outputs, stats = predictor.planes(planes, factor, progress)
  else:
    outputs, stats = first
    if progress is not None:
      progress(1.0)
  if missing is not None:
    outputs[missing] = 0.0
  mask = outputs[..., 0] > threshold
  labels = np.stack([instances.from_outputs(o, threshold, options.seed_dynamic,
                                            options.min_size)
                     for o in outputs]) if options.instances else None
  return outputs, stats, mask, labels


def image_warning(path, stats: list[dict], mask: np.ndarray, training: dict | None) -> str | None:
  """One line when an image looks unlike the training images or its mask is ~empty/full."""
  notes = []
  unusual = [(i, u) for i, s in enumerate(stats) for u in [rundir.unusual_stats(s, training)]
             if u]
  if unusual:
    where = f' (plane {unusual[0][0]})' if len(stats) > 1 else ''
    notes.append(f'unlike the training images{where}: {", ".join(unusual[0][1])}')
  full = rundir.foreground_note(float(mask.mean()))
  if full:
    notes.append(full)
  if not notes:
    return None
  return (f'{path}: {"; ".join(notes)}; the mask may be wrong (check --channel, '
          '--pixel_size and that the model fits this kind of image)')


def predict_file(predictor: Predictor, path: pathlib.Path, name: str, out: pathlib.Path,
                 options: Options, threshold: float, training: dict | None) -> list[str]:
  """Predicts one file and writes its outputs; returns its warning lines."""
  image = io.read_image_file(path, options.axes or None,
                             rgb_as_channels=options.channel is not None, missing_ok=True)
  trained_channel = predictor.config.data.channel  # -1: trained on single-channel images
  channel = options.channel
  if channel is None and trained_channel >= 0 and 'C' in image.axes:
    count = image.data.shape[image.axes.index('C')]
    if trained_channel >= count:
      raise UserError(f'{path}: {count} channel(s), but the model was trained on channel '
                      f'{trained_channel} (config.data.channel); choose one with --channel=N')
    channel = trained_channel
  planes, out_axes, out_shape = io.select_planes(image, channel, path)
  planes, missing, notes = preprocess.repair(planes, path)
  pixel_size = options.pixel_size or image.pixel_size
  factor, resized, first = planes_factor(predictor, planes, threshold, options, pixel_size,
                                         missing)
  outputs, stats, mask, labels = segment_planes(predictor, planes, factor, threshold, options,
                                                missing=missing, first=first)
  prob = outputs[..., 0]
  write = lambda kind, array: io.write_tiff(  # pylint: disable=g-long-lambda
      output_path(out, name, kind, image.ome), io.restore_axes(array, out_axes, out_shape),
      axes=out_axes, pixel_size=pixel_size)
  write('mask', (mask * 255).astype(np.uint8))
  middle = len(planes) // 2
  _write_png(output_path(out, name, 'overlay', image.ome),
             overlay(planes[middle], mask[middle]))
  if options.save_prob:
    write('prob', prob)
  if options.instances:
    write('instances', labels)
    write_objects(output_path(out, name, 'objects', image.ome), labels, planes, pixel_size)
  notes = notes + [f'{path}: {note}' for note in resized]
  warning = image_warning(path, stats, mask, training)
  return notes + ([warning] if warning else [])


# ----------------------------------------------------------------------------- driver

def resolve_threshold(config, workdir, step: int, options: Options) -> tuple[float, str]:
  """(threshold, where it came from): --threshold, else calibrated, else the config's."""
  if options.threshold is not None:
    return options.threshold, '--threshold'
  calibrated = calibration.calibrated_threshold(workdir, step)
  if calibrated is not None:
    return calibrated, 'calibrated'
  return config.eval.threshold, 'config.eval.threshold'


def make_predictor(config, state, mesh, options: Options) -> Predictor:
  """The Predictor of loaded weights (`tiling.load`) with `options`' tile
  (`tiling.network_tile`), overlap, batch size (0: config.eval.batch_size) and TTA."""
  return Predictor(
      tiling.prob_fn(state, mesh, options.tta), config,
      tiling.network_tile(options.tile, config), options.overlap,
      tiling.round_up_batch(options.batch_size or config.eval.batch_size, mesh.size),
      batch_multiple=mesh.size)


def load_predictor(config, workdir, options: Options) -> tuple[Predictor, int]:
  """(Predictor, checkpoint step) of the model in `workdir` on options.backend: JAX over
  this process's devices, or ONNX Runtime (flmiseg/export/onnx_backend.py)."""
  if options.backend == 'onnx':
    from flmiseg.export import onnx_backend  # pylint: disable=g-import-not-at-top  # (the extra)
    return onnx_backend.make_predictor(config, workdir, options)
  mesh = sharding.make_mesh(jax.local_devices())
  state, step = tiling.load(config, workdir, mesh)
  return make_predictor(config, state, mesh, options), step


def instance_options(config, workdir, step: int, options: Options) -> Options:
  """`options` with the instance settings left to the run filled in: min_size from
  config.eval.min_size, seed_dynamic calibrated for checkpoint `step`, else the config's."""
  if options.min_size is None:
    options = dataclasses.replace(options, min_size=config.eval.get('min_size', 16))
  if options.seed_dynamic is None:
    calibrated = calibration.calibrated_dynamic(workdir, step)
    options = dataclasses.replace(options, seed_dynamic=calibrated if calibrated is not None
                                  else config.eval.get('seed_dynamic', instances.SEED_DYNAMIC))
  return options


def run(config, workdir, options: Options) -> dict:
  """Predicts every input image; returns {'written': [...], 'skipped': [...], ...}.

  `config` is the run's (flmiseg/store/rundir.py); nothing is created unless the run holds a
  trained model and every option is valid.
  """
  workdir = pathlib.Path(workdir)
  options.check()
  inputs, skipped = find_inputs(options.input)
  if jax.process_count() > 1:  # every process predicts its own share on its own devices
    inputs = inputs[jax.process_index()::jax.process_count()]
  names = output_names(inputs)
  out = pathlib.Path(options.output)
  check_output(out, inputs, names, options)
  check_diameter(config, options.diameter, workdir)
  predictor, step = load_predictor(config, workdir, options)
  threshold, source = resolve_threshold(config, workdir, step, options)
  if note := tiling.tile_note(options.tile, config):
    logging.warning('%s', note)
  created = not out.exists()
  make_output(out, options)
  options = instance_options(config, workdir, step, options)
  if options.instances and not config.model.get('instance_head'):
    logging.warning('%s has no instance head (config.model.instance_head): instances are '
                    'connected components of the mask, so touching objects stay merged',
                    workdir)
  training = rundir.read_input_stats(workdir)
  logging.info('Predicting %d image(s) with the step-%d checkpoint of %s, threshold %.3f '
               '(%s)%s', len(inputs), step, workdir, threshold, source,
               ', 8x TTA' if options.tta else '')
  written, failed = [], []
  for path, name in tqdm.tqdm(list(zip(inputs, names)), desc='images', unit='image',
                              leave=False, disable=len(inputs) == 1):
    try:
      notes = predict_file(predictor, path, name, out, options, threshold, training)
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
  result = {'written': written, 'skipped': skipped, 'failed': failed, 'threshold': threshold,
            'threshold_source': source, 'output': str(out)}
  if failed:
    _remove_if_empty(out, created)
    raise UserError(f'{len(failed)} of {len(inputs)} image(s) could not be predicted (the '
                    f'others were written to {out}): {"; ".join(failed)}')
  return result


def _remove_if_empty(out: pathlib.Path, created: bool) -> None:
  """Removes the output folder this run created when nothing was written into it."""
  if created and out.is_dir() and not any(out.iterdir()):
    out.rmdir()
