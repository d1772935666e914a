"""One block of a plane, predicted with the inference core and written (`predict`).

The block reads the pixels its tiles and their normalisation need, repairs and normalises them
with the whole plane's statistics (flmiseg/chunked/statistics.py), predicts the whole plane's
tiles that cover its extended region and blends them in the whole plane's order
(`tiling.blend`), so its outputs there are the in-memory path's, bit for bit. It thresholds
them, writes its core's probability and mask, and with instances labels its extended region
(`instances.output_labels`, the in-memory post-processing) and writes the core's objects under
their *anchor ids*: 1 + the plane's raster index (y * W + x) of the object's first pixel in
the core. Ids are then unique in the plane without any table, and the same object seen whole
by two blocks gets its two parts' anchors, which flmiseg/chunked/link.py joins into the
smaller: the object's first pixel in the plane. Its record (`State.save`, after the writes)
holds the extended region's ids outside the core (the halo, for linking) and each object's
sums for the objects table (area, coordinates, intensity).

A block resized for the model (the grid's factor != 1) is normalised the same way, at the
image's pixels, then resized, tiled and resized back as `segment.Predictor.plane` does a whole
plane (`resized_outputs`): its outputs are close to the in-memory path's with the same
resizing, not equal (the resized pixels depend on where the plane is cut, and 'percentile'
and 'zscore' statistics are the image's, not the resized image's).
"""

import threading

import numpy as np
from scipy import ndimage
import zarr

from flmiseg.chunked import engine
from flmiseg.chunked import job as job_lib
from flmiseg.chunked import statistics
from flmiseg.data import preprocess
from flmiseg.inference import segment
from flmiseg.inference import tiling
from flmiseg.objects import instances

_ARRAYS = {}  # per process: zarr array path -> opened array
_LOCK = threading.Lock()


def array(path: str):
  """The zarr array at `path`, opened once per process for writing."""
  with _LOCK:
    if path not in _ARRAYS:
      _ARRAYS[path] = zarr.open_array(path, mode='r+')
    return _ARRAYS[path]


def forget_arrays() -> None:
  """Drops this process's opened arrays (after a run, before its outputs are replaced)."""
  with _LOCK:
    _ARRAYS.clear()


def outputs_of(job: job_lib.Job, block) -> tuple[np.ndarray, np.ndarray]:
  """(outputs (h, w, C) of the block's extended region, the repaired pixels of its core):
  the in-memory path's outputs of those pixels (module docstring), 0 where there is no
  data."""
  model = engine.model_of(job.recipe)
  predictor = model.predictor(job.settings)
  h, w = job.grid.shape
  plane = job.source.planes()[block.plane]
  stats = job.stats[block.plane]
  (r0, r1), (c0, c1) = block.region
  rows, cols = (r0, min(r1, h)), (c0, min(c1, w))
  context = stats.norm.context(rows, cols)
  fixed, missing = statistics.repaired(
      lambda ys, xs: job.source.read(plane, ys, xs), (h, w), *context, stats.hot)
  origin = (context[0][0], context[1][0])
  x = preprocess.apply_normalization(fixed, origin, stats.norm, rows, cols)
  (e0, e1), (f0, f1) = block.extended
  inside = (slice(e0 - r0, e1 - r0), slice(f0 - c0, f1 - c0))
  if job.grid.factor != 1.0:
    out = resized_outputs(predictor, x, job.grid.factor)[inside]
  else:
    # A plane smaller than a tile is mirrored to a tile, as sliding_window mirrors it.
    x = np.pad(x, ((0, r1 - rows[1]), (0, c1 - cols[1])), mode='reflect')
    total, weight = tiling.blend(predictor.probs_of, x, list(block.corners), predictor.tile,
                                 predictor.batch_size)
    out = total[inside] / weight[inside][..., None]
  if missing is not None:
    out[missing[e0 - origin[0]:e1 - origin[0], f0 - origin[1]:f1 - origin[1]]] = 0.0
  (y0, y1), (x0, x1) = block.core
  return out, fixed[y0 - origin[0]:y1 - origin[0], x0 - origin[1]:x1 - origin[1]]


def resized_outputs(predictor: segment.Predictor, x: np.ndarray, factor: float) -> np.ndarray:
  """float32 outputs (h, w, C) of a normalised region (h, w), resized by `factor` for the
  network, tiled on its own (`tiling.sliding_window`) and resized back, with the sizes,
  interpolations and clipping of `segment.Predictor.plane`."""
  h, w = x.shape
  scaled = segment.resize(x, (max(1, round(h * factor)), max(1, round(w * factor))))
  out = tiling.sliding_window(predictor.probs_of, scaled, predictor.tile, predictor.overlap,
                              predictor.batch_size, batch_multiple=predictor.batch_multiple)
  return np.stack([np.clip(segment.resize(c, (h, w)), 0.0, 1.0) for c in np.moveaxis(out, -1, 0)],
                  axis=-1)


def anchors(core: np.ndarray, origin: tuple[int, int], width: int, dtype,
            size: int) -> np.ndarray:
  """A look-up table of `size` entries: each label of `core` (a block's core, at plane
  `origin` (y, x)) -> 1 + the plane's raster index of its first pixel there; others -> 0."""
  boxes = ndimage.find_objects(core)
  table = np.zeros(max(size, len(boxes) + 1), dtype)
  for value, box in enumerate(boxes, start=1):
    if box is None:
      continue
    row = box[0].start
    col = box[1].start + int(np.argmax(core[row, box[1]] == value))
    table[value] = 1 + (origin[0] + row) * width + origin[1] + col
  return table


def object_sums(core: np.ndarray, table: np.ndarray, origin: tuple[int, int],
                pixels: np.ndarray) -> dict:
  """Per object of a core's labels: its anchor id (`table`), area and the sums of its
  pixels' plane coordinates and intensities (float64, exact for integers)."""
  flat = core.ravel()
  rows, cols = np.indices(core.shape)
  area = np.bincount(flat, minlength=table.size)
  sum_y = np.bincount(flat, weights=(rows + origin[0]).ravel(), minlength=table.size)
  sum_x = np.bincount(flat, weights=(cols + origin[1]).ravel(), minlength=table.size)
  sum_i = np.bincount(flat, weights=pixels.astype(np.float64).ravel(), minlength=table.size)
  keep = np.flatnonzero(area)
  keep = keep[keep > 0]
  return {'ids': table[keep], 'area': area[keep], 'sum_y': sum_y[keep],
          'sum_x': sum_x[keep], 'sum_i': sum_i[keep]}


def predict(job: job_lib.Job, block) -> None:
  """Predicts `block` and writes its core's outputs, then its record (module docstring)."""
  out, pixels = outputs_of(job, block)
  (e0, _), (f0, _) = block.extended
  (y0, y1), (x0, x1) = block.core
  core = (slice(y0 - e0, y1 - e0), slice(x0 - f0, x1 - f0))
  prob = out[core][..., 0]
  settings = job.settings
  index = (*job.source.planes()[block.plane], slice(y0, y1), slice(x0, x1))
  if job.outputs.image is not None:
    array(f'{job.outputs.image}/0')[index] = (
        prob if job.save_prob else np.rint(prob * 255.0).astype(np.uint8))
  array(f'{job.outputs.label("mask")}/0')[index] = (prob > settings.threshold).astype(np.uint8)
  record = {}
  if settings.instances:
    labels = instances.output_labels(out, settings.threshold, settings.seed_dynamic,
                                     settings.min_size)
    table = anchors(labels[core], (y0, x0), job.grid.shape[1], job.id_dtype,
                    int(labels.max()) + 1)
    array(f'{job.outputs.label("instances")}/0')[index] = table[labels[core]]
    ring = table[labels]
    ring[core] = 0  # the halo only: what this block saw of its objects past its core
    record = {'ring': ring, **object_sums(labels[core], table, (y0, x0), pixels)}
  job_lib.State(job.outputs.state).save('blocks', block.name, **record)
