"""Masks for the user's own images: `--mode=predict`.

  python -m flmiseg.main --config=CONFIG --workdir=DIR --mode=predict \
      --input=PATH --output=OUT [--tta] [--save_prob] [--instances] [--overwrite]

PATH is an image file, a folder (its image files, not recursive) or a glob ('data/*.tif') of
8/16-bit TIFF/PNG images of any size, or TIFF stacks (planes, H, W), predicted plane by plane.
For each input `<name>.<ext>` OUT receives:
  <name>_mask.tif      uint8 0/255, the input's shape ((H, W), or (planes, H, W) for a stack);
  <name>_overlay.png   the image (1-99.8 percentile display range; a stack's middle plane)
                       with the mask's contour in yellow;
  <name>_prob.tif      float32 foreground probability, with --save_prob;
  <name>_instances.tif uint16 connected-component labels (8-connected, per plane), components
                       smaller than --min_size pixels removed, with --instances.
When two inputs share a name (a.tif, a.png), the extension joins it (a_tif_mask.tif).

How an image is predicted:
  * normalised once, over the whole image (or plane), with the training config's method, so
    every tile sees the same statistics (the CLAHE mapping too);
  * cut into tiles of the training crop size (--tile to change) overlapping by --overlap,
    batched over the devices, and blended with Gaussian weights (sigma = tile / 8; a tile's
    edge pixels weigh exp(-8) of its centre), so tiling seams vanish and any image size works
    within a bounded device memory; images smaller than a tile are zero-padded, as in
    training;
  * with --tta, averaged over the 8 flips/rotations of each tile;
  * thresholded at the calibrated threshold stored with the best checkpoint (see
    flmiseg/evaluate.py), or config.eval.threshold when there is none, or --threshold.
Never writes into an input folder, and refuses to replace existing results unless
--overwrite. Files that are not images are skipped with a warning; images that cannot be
read are skipped too and reported at the end as an error (exit status 2).
"""

import dataclasses
import glob
import json
import math
import os
import pathlib

from absl import logging
import cv2
import jax
import jax.numpy as jnp
import numpy as np
from skimage import measure
from skimage import segmentation
import tqdm

from flmiseg import evaluate
from flmiseg import sharding
from flmiseg import train
from flmiseg.data import io
from flmiseg.data import preprocess
from flmiseg.errors import UserError

_GLOB_CHARS = '*?['
OUTPUT_SUFFIXES = ('_mask.tif', '_overlay.png', '_prob.tif', '_instances.tif')


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
  min_size: int = 16
  overwrite: bool = False


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
  """The output stem of each input: its name without extension, unique within the run."""
  stems = [p.stem for p in inputs]
  names = [f'{p.stem}_{p.suffix.lstrip(".").lower()}' if stems.count(p.stem) > 1 else p.stem
           for p in inputs]
  seen = {}
  for name, p in zip(names, inputs):
    if name in seen:
      raise UserError(f'--input: {seen[name]} and {p} would write the same outputs '
                      f'({name}_mask.tif); predict them into separate --output folders')
    seen[name] = p
  return names


def check_output(out: pathlib.Path, inputs: list[pathlib.Path], names: list[str],
                 options: Options) -> None:
  """Refuses an output folder that is an input folder, or would replace existing results."""
  out_resolved = out.resolve()
  for folder in sorted({p.parent.resolve() for p in inputs}):
    if out_resolved == folder:
      raise UserError(f'--output={options.output} is the folder of the input images; choose '
                      'another folder so that results never mix with (or replace) your data')
  suffixes = ['_mask.tif', '_overlay.png']
  suffixes += ['_prob.tif'] if options.save_prob else []
  suffixes += ['_instances.tif'] if options.instances else []
  existing = [out / f'{n}{s}' for n in names for s in suffixes if (out / f'{n}{s}').exists()]
  if existing and not options.overwrite:
    more = f' and {len(existing) - 1} other result(s)' if len(existing) > 1 else ''
    raise UserError(f'{existing[0]} exists{more}; use --overwrite to replace, or another '
                    '--output')
  if out.exists() and not out.is_dir():
    raise UserError(f'--output={options.output} is a file, not a folder')
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'--output={options.output}: cannot create it ({e.strerror})') from e
  if not os.access(out, os.W_OK):
    raise UserError(f'--output={options.output}: not writable')


# ----------------------------------------------------------------------------- tiling

def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
  """Start offsets of tiles covering [0, size): evenly spread, first 0, last size - tile."""
  if size <= tile:
    return [0]
  step = max(1, int(round(tile * (1.0 - overlap))))
  n = math.ceil((size - tile) / step) + 1
  return [int(round(i * (size - tile) / (n - 1))) for i in range(n)]


def gaussian_weight(tile: int) -> np.ndarray:
  """(tile, tile) float32 blending weights: a Gaussian of sigma tile/8, 1 at the centre."""
  x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
  g = np.exp(-0.5 * (x / (tile / 8)) ** 2)
  return np.outer(g, g).astype(np.float32)


def sliding_window(prob_fn, image: np.ndarray, tile: int, overlap: float, batch_size: int,
                   progress: bool = False) -> np.ndarray:
  """Probabilities (H, W) of a normalised (H, W) image by blended overlapping tiles.

  prob_fn maps a (batch_size, tile, tile, 1) float32 array to probabilities of that shape.
  """
  h, w = image.shape
  ph, pw = max(h, tile), max(w, tile)
  padded = np.zeros((ph, pw), np.float32)  # zeros beyond the image, as training pads
  padded[:h, :w] = image
  corners = [(y, x) for y in tile_starts(ph, tile, overlap)
             for x in tile_starts(pw, tile, overlap)]
  weight = gaussian_weight(tile)
  total = np.zeros((ph, pw), np.float32)
  norm = np.zeros((ph, pw), np.float32)
  bar = tqdm.tqdm(total=len(corners), desc='tiles', unit='tile', leave=False,
                  disable=not progress or len(corners) <= batch_size)
  for start in range(0, len(corners), batch_size):
    chunk = corners[start:start + batch_size]
    tiles = np.zeros((batch_size, tile, tile, 1), np.float32)
    for j, (y, x) in enumerate(chunk):
      tiles[j, ..., 0] = padded[y:y + tile, x:x + tile]
    probs = np.asarray(prob_fn(tiles))
    for j, (y, x) in enumerate(chunk):
      total[y:y + tile, x:x + tile] += probs[j, ..., 0] * weight
      norm[y:y + tile, x:x + tile] += weight
    bar.update(len(chunk))
  bar.close()
  return (total / norm)[:h, :w]


# ----------------------------------------------------------------------------- model

def _dihedral(x, k: int, inverse: bool = False):
  """One of the 8 symmetries of the square on NHWC arrays (k // 4: flip, k % 4: rot90)."""
  rot, flip = k % 4, k // 4
  if not inverse:
    x = jnp.flip(x, axis=2) if flip else x
    return jnp.rot90(x, rot, axes=(1, 2))
  x = jnp.rot90(x, -rot, axes=(1, 2))
  return jnp.flip(x, axis=2) if flip else x


def make_prob_fn(state, mesh, tta: bool):
  """A jitted tiles -> probabilities function over the mesh (batch sharded)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  variables = sharding.replicate(variables, mesh)

  def probs(variables, x):
    def once(x):
      logits, _ = state.apply_fn(variables, x, train=False)
      return jax.nn.sigmoid(logits.astype(jnp.float32))
    if not tta:
      return once(x)
    return sum(_dihedral(once(_dihedral(x, k)), k, inverse=True) for k in range(8)) / 8

  data = sharding.data_sharding(mesh)
  fn = jax.jit(probs, in_shardings=(sharding.replicated(mesh), data), out_shardings=data)
  return lambda tiles: jax.device_get(fn(variables, jax.device_put(tiles, data)))


def _localize(state):
  """The replicated state as single-device arrays of this process (for a local mesh)."""
  return jax.tree.map(
      lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, state)


def load_model(config, workdir: pathlib.Path):
  """(state of the best checkpoint, its step) for `config`'s model, trained in `workdir`."""
  saved = workdir / 'config.json'
  if saved.exists():
    trained = json.loads(saved.read_text()).get('model', {})
    for key, value in trained.items():
      if key in config.model and config.model[key] != value:
        raise UserError(f'--config.model.{key}={config.model[key]!r}, but {workdir} was '
                        f'trained with {value!r}; use the training config')
  crop = config.data.crop_size
  _, _, _, state, _ = train.build(config, workdir, (crop, crop), 1)
  return train.restore_best(config, workdir, state)


# ----------------------------------------------------------------------------- outputs

def display_image(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W) of an image, mapping its 1-99.8 percentiles to 0-255."""
  x = image.astype(np.float32)
  lo, hi = np.percentile(x, [1.0, 99.8])
  return np.clip((x - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """BGR uint8 image with the mask's contours drawn in yellow."""
  bgr = cv2.cvtColor(display_image(image), cv2.COLOR_GRAY2BGR)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST,
                                 cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(bgr, contours, -1, (0, 255, 255), 1)
  return bgr


def label_instances(mask: np.ndarray, min_size: int) -> np.ndarray:
  """uint16 labels 1..n of the 8-connected components of at least min_size pixels."""
  labels = measure.label(mask > 0, connectivity=2)
  sizes = np.bincount(labels.ravel())
  labels[(sizes < min_size)[labels]] = 0  # (skimage renamed remove_small_objects' argument)
  labels, _, _ = segmentation.relabel_sequential(labels)
  if labels.max() > np.iinfo(np.uint16).max:
    raise UserError(f'{labels.max()} instances do not fit a uint16 label image')
  return labels.astype(np.uint16)


def _write_png(path: pathlib.Path, image: np.ndarray) -> None:
  tmp = path.with_name(f'.{path.name}.tmp.png')
  if not cv2.imwrite(str(tmp), image):
    raise UserError(f'{path}: cannot write')
  os.replace(tmp, path)


# ----------------------------------------------------------------------------- driver

def predict_image(prob_fn, raw: np.ndarray, config, options: Options, tile: int,
                  batch_size: int) -> np.ndarray:
  """float32 probabilities of a raw (H, W) image or (planes, H, W) stack, the same shape."""
  planes = raw if raw.ndim == 3 else raw[None]
  out = np.zeros(planes.shape, np.float32)
  for i, plane in enumerate(planes):
    normalised = preprocess.normalize(plane, config.data.normalization, config.data.kind)
    out[i] = sliding_window(prob_fn, normalised, tile, options.overlap, batch_size,
                            progress=True)
  return out if raw.ndim == 3 else out[0]


def run(config, workdir, options: Options) -> dict:
  """Predicts every input image; returns {'written': [...], 'skipped': [...], ...}."""
  workdir = pathlib.Path(workdir)
  if not 0.0 <= options.overlap < 1.0:
    raise UserError(f'--overlap={options.overlap}: must be in [0, 1)')
  tile = options.tile or config.data.crop_size
  if tile < 16:
    raise UserError(f'--tile={tile}: use at least 16 pixels')
  inputs, skipped = find_inputs(options.input)
  if jax.process_count() > 1:  # every process predicts its own share on its own devices
    inputs = inputs[jax.process_index()::jax.process_count()]
  names = output_names(inputs)
  if not options.output:
    raise UserError('--output is required with --mode=predict (a folder for the results)')
  out = pathlib.Path(options.output)
  check_output(out, inputs, names, options)

  state, step = load_model(config, workdir)
  threshold, source = options.threshold, '--threshold'
  if threshold is None:
    threshold, source = evaluate.calibrated_threshold(workdir, step), 'calibrated'
  if threshold is None:
    threshold, source = config.eval.threshold, 'config.eval.threshold'
  mesh = sharding.make_mesh(jax.local_devices())
  n = len(jax.local_devices())
  batch_size = max(n, -(-(options.batch_size or config.eval.batch_size) // n) * n)
  prob_fn = make_prob_fn(_localize(state), mesh, options.tta)
  logging.info('Predicting %d image(s) with the step-%d checkpoint, threshold %.3f (%s)%s',
               len(inputs), step, threshold, source, ', 8x TTA' if options.tta else '')

  written, failed = [], []
  for path, name in tqdm.tqdm(list(zip(inputs, names)), desc='images', unit='image'):
    try:
      raw = io.read_image(path, allow_stack=True)
    except UserError as e:
      logging.warning('Skipping %s', e)
      failed.append(str(e))
      continue
    prob = predict_image(prob_fn, raw, config, options, tile, batch_size)
    mask = prob > threshold
    io.write_tiff(out / f'{name}_mask.tif', (mask * 255).astype(np.uint8))
    middle = len(raw) // 2 if raw.ndim == 3 else None
    view = (raw[middle], mask[middle]) if middle is not None else (raw, mask)
    _write_png(out / f'{name}_overlay.png', overlay(*view))
    if options.save_prob:
      io.write_tiff(out / f'{name}_prob.tif', prob)
    if options.instances:
      planes = mask if mask.ndim == 3 else mask[None]
      labels = np.stack([label_instances(p, options.min_size) for p in planes])
      io.write_tiff(out / f'{name}_instances.tif', labels if mask.ndim == 3 else labels[0])
    written.append(name)
  result = {'written': written, 'skipped': skipped, 'failed': failed, 'threshold': threshold,
            'threshold_source': source, 'output': str(out)}
  if failed:
    raise UserError(f'{len(failed)} of {len(inputs)} image(s) could not be read (the others '
                    f'were written to {out}): {"; ".join(failed)}')
  return result
