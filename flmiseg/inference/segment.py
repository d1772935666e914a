"""The inference core: raw planes in; probabilities, masks and instance labels out.

No files here: flmiseg/inference/model.py (arrays of any axes) and flmiseg/cli/predict.py
(image files) hand planes (N, H, W), repaired by `preprocess.repair`, to `segment_planes`:

  * the resizing is decided (`planes_factor`): with a diameter (of the image's objects,
    pixels; AUTO_DIAMETER: measured on a first pass) so the objects match the model's
    (config.data.object_diameter), else by pixel size when both the image's and the model's
    are known and differ by more than RESCALE_TOLERANCE;
  * each plane is resized, normalised once over the whole plane with the run's method, cut
    into blended tiles (flmiseg/inference/tiling.py, with TTA when asked), and the outputs
    resized back (`Predictor`);
  * pixels without data get outputs 0; the probabilities are thresholded, and with instances
    split into objects (`instances.from_outputs`).

`Settings` holds what a call asks for; its threshold and instance settings are filled in by
the model (`Model.resolved`, flmiseg/store/settings.py) before they get here.
"""

import dataclasses

import cv2
import numpy as np

from flmiseg.core.errors import UserError
from flmiseg.data import preprocess
from flmiseg.inference import tiling
from flmiseg.objects import instances
from flmiseg.store import rundir
from flmiseg.store import settings as stored

# Pixel sizes (and object diameters) within this relative difference count as equal.
RESCALE_TOLERANCE = 0.1
# diameter=0: measured on a first pass at the image's own size
AUTO_DIAMETER = stored.MEASURED


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to segment (predict's flags of the same names). None: the model decides."""
  tile: int = 0  # 0: the config's training crop size.
  overlap: float = 0.25
  batch_size: int = 0  # Tiles per device step; 0: config.eval.batch_size.
  tta: bool = False
  threshold: float | None = None  # None: calibrated, else config.eval.threshold.
  instances: bool = False
  min_size: int | None = None  # None: config.eval.min_size.
  seed_dynamic: float | None = None  # None: calibrated, else config.eval.seed_dynamic.
  channel: int | None = None  # The channel of a multi-channel image.
  pixel_size: float | None = None  # Micrometres per pixel of the image (None: unknown).
  # The image's typical object diameter, pixels; AUTO_DIAMETER: measured.
  diameter: float | None = None
  rescale: bool = True  # Resize to the model's pixel size when both are known.
  # A second pass at this gain finds objects too dim for the first (`dim_pass`); 0: off,
  # None: the model's (config.eval.dim_gain).
  dim_gain: float | None = None

  def check(self) -> None:
    """Raises UserError naming the first invalid setting (by its predict flag)."""
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
    if self.min_size is not None and self.min_size < 0:
      raise UserError(f'--min_size={self.min_size}: must be >= 0')
    if self.dim_gain is not None and not (self.dim_gain == 0 or self.dim_gain > 1):
      raise UserError(f'--dim_gain={self.dim_gain:g}: 0 (off) or a gain above 1 (e.g. 4)')


def resize(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """float32 `plane` resized to `shape` (area averaging when shrinking, else bilinear)."""
  h, w = shape
  shrink = h * w < plane.shape[0] * plane.shape[1]
  return cv2.resize(plane.astype(np.float32), (w, h),
                    interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


@dataclasses.dataclass
class Predictor:
  """Probabilities of raw planes with a trained model (weights, run config, tiling)."""
  probs_of: object  # tiles (B, t, t, 1) -> outputs (B, t, t, C): tiling.prob_fn(...)
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


# ----------------------------------------------------------------------------- resizing

def rescale_factor(image_pixel_size: float | None, model_pixel_size: float | None,
                   allowed: bool = True) -> float:
  """How much to resize an image so its pixels match the model's (1.0: leave it)."""
  if not allowed or not image_pixel_size or not model_pixel_size:
    return 1.0
  factor = image_pixel_size / model_pixel_size
  return 1.0 if abs(factor - 1.0) <= RESCALE_TOLERANCE else factor


def _needs_object_diameter(config, setting: str, model, why: str) -> None:
  """Raises UserError naming `setting` (e.g. '--diameter=12') and `model` when the model
  records no object diameter (config.data.object_diameter); `why` ends the line."""
  if not config.data.get('object_diameter', 0.0):
    raise UserError(f'{setting}: {model} records no object diameter '
                    f'(config.data.object_diameter), {why}')


def check_dim_gain(config, dim_gain: float | None, model) -> None:
  """Raises UserError when a dim pass is asked of a model that records no object diameter
  (what the dim pass sizes its new objects by); `model` names it."""
  if dim_gain:
    _needs_object_diameter(config, f'--dim_gain={dim_gain:g}', model,
                           'which the dim pass needs to tell objects from specks')


def check_diameter(config, diameter: float | None, model) -> None:
  """Raises UserError when a diameter is given for a model that records no object diameter;
  `model` names it."""
  if diameter is not None:
    _needs_object_diameter(config, f'--diameter={diameter:g}', model,
                           'so there is nothing to match; resize the images, or give '
                           '--pixel_size to a model that records its pixel size')


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


def estimated_diameter(outputs: np.ndarray, settings: Settings,
                       missing: np.ndarray | None = None) -> tuple[float | None, str]:
  """(the objects' diameter in pixels, a note saying so) measured on the outputs (N, H, W, C)
  of a first pass over planes at their own size (`missing` pixels set to 0 in them), the
  `object_diameter` of their instances at the resolved `settings`; (None, a note) when it
  finds no object."""
  if missing is not None:
    outputs[missing] = 0.0
  diameter = object_diameter([_instances(o, settings) for o in outputs])
  if diameter is None:
    return None, 'no object found to measure (a first pass): not resized'
  return diameter, f'its objects measure {diameter:.3g} px across (a first pass)'


def planes_factor(predictor: Predictor, planes: np.ndarray, settings: Settings,
                  pixel_size: float | None,
                  missing: np.ndarray | None = None) -> tuple[float, list[str], tuple | None]:
  """(how much to resize raw planes (N, H, W) for the model, notes saying so, the first pass or
  None): `model_factor` of settings.diameter, or with AUTO_DIAMETER of the diameter measured
  on a first pass at the planes' own size (`estimated_diameter`), whose (outputs, stats) come
  back for reuse when no resizing follows. `pixel_size`: the image's, when known."""
  diameter, notes, first = settings.diameter, [], None
  if diameter == AUTO_DIAMETER:
    first = predictor.planes(planes)
    diameter, measured = estimated_diameter(first[0], settings, missing)
    notes.append(measured)
  factor, resized = model_factor(predictor.config, pixel_size, diameter, settings.rescale)
  return factor, notes + ([resized] if resized else []), first if factor == 1.0 else None


# ----------------------------------------------------------------------------- segmenting

@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class Planes:
  """What `segment_planes` gives for planes (N, H, W)."""
  outputs: np.ndarray  # float32 (N, H, W, C): the probability, the distance (instance head)
  stats: list  # per plane, of the normalised plane (preprocess.image_stats)
  mask: np.ndarray  # bool (N, H, W)
  labels: np.ndarray | None  # uint16 (N, H, W) instance labels, with settings.instances
  notes: list  # how the planes were resized (or measured), one line each


def _instances(outputs: np.ndarray, settings: Settings) -> np.ndarray:
  return instances.from_outputs(outputs, settings.threshold, settings.seed_dynamic,
                                settings.min_size)


def segment_planes(predictor: Predictor, planes: np.ndarray, settings: Settings,
                   pixel_size: float | None = None, missing: np.ndarray | None = None,
                   progress=None) -> Planes:
  """The outputs, mask and instances of raw planes (N, H, W) of an image of `pixel_size`
  (micrometres, when known) at resolved `settings` (threshold, seed_dynamic and min_size
  set: `Model.resolved`). `missing`: the map of pixels without data of
  `preprocess.repair`, whose outputs become 0 (background, in no instance). `progress(fraction
  done)` is called after each batch of tiles."""
  factor, notes, first = planes_factor(predictor, planes, settings, pixel_size, missing)
  if first is None:
    outputs, stats = predictor.planes(planes, factor, progress)
  else:
    outputs, stats = first
    if progress is not None:
      progress(1.0)
  if missing is not None:
    outputs[missing] = 0.0
  if settings.dim_gain:
    added = 0
    for i, plane in enumerate(planes):
      outputs[i], count = dim_pass(predictor, plane, outputs[i], factor, settings.threshold,
                                   settings.dim_gain)
      added += count
    notes.append(f'the dim pass (--dim_gain={settings.dim_gain:g}) added {added} '
                 f'object{"" if added == 1 else "s"}')
    if missing is not None:  # its second pass saw the repaired pixels too
      outputs[missing] = 0.0
  mask = outputs[..., 0] > settings.threshold
  labels = np.stack([_instances(o, settings) for o in outputs]) if settings.instances else None
  return Planes(outputs, stats, mask, labels, notes)


# ----------------------------------------------------------------------------- the dim pass

# Objects far dimmer than their bright neighbours come out of the first pass's normalisation
# near the background, and are missed. The dim pass looks again with everything brighter
# than 1/gain of the plane's normalised range clipped there, so that what was dim fills gain
# times more of it, and adds what it finds away from the first pass's objects:
DIM_MIN_SPREAD = 2.0  # only where the first pass's objects span at least twice the range of
#                      the rest of the plane (their pixels set to its median)
DIM_MARGIN = 4.0  # first-pass objects, grown by this many network pixels, are left as they are
DIM_MIN_AREA = 0.1  # a new object covers at least this share of a disc of the model's
#                    object diameter (config.data.object_diameter)
DIM_CONTRAST = 2.0  # and is brighter than the ring around it (a quarter of that diameter
#                    wide) by this many noise sigmas (`preprocess.noise_sigma`),
DIM_NOISE_FLOOR = 0.005  # the sigma at least this share of the plane's normalised range


def dim_pass(predictor: Predictor, raw: np.ndarray, outputs: np.ndarray, factor: float,
             threshold: float, gain: float) -> tuple[np.ndarray, int]:
  """(the outputs (H, W, C) of the raw plane (H, W), resized by `factor` for the network, with
  the objects that a second pass at `gain` finds; how many it added). Each is a connected
  component of the second pass's mask that keeps off the first pass's objects grown by
  DIM_MARGIN, covers DIM_MIN_AREA of a disc of the model's object diameter and stands
  DIM_CONTRAST noise sigmas above the ring around it; its pixels take the second pass's
  outputs (probability, distance). Unchanged when the first pass found nothing or the plane's
  objects are not much brighter than the rest (DIM_MIN_SPREAD)."""
  found = outputs[..., 0] > threshold
  if not found.any():
    return outputs, 0
  radius = max(1, round(DIM_MARGIN / factor))
  grown = cv2.dilate(found.astype(np.uint8), cv2.getStructuringElement(
      cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))).astype(bool)
  if grown.all():
    return outputs, 0
  raw = np.asarray(raw, np.float32)
  stats = preprocess.ArrayStatistics(raw)
  lo, hi = preprocess.percentile_range(stats)
  background = float(np.median(raw[~grown]))
  rest = np.where(grown, background, raw)
  rest_lo, rest_hi = preprocess.percentile_range(preprocess.ArrayStatistics(rest))
  if hi - lo < DIM_MIN_SPREAD * max(rest_hi - rest_lo, 1e-6):
    return outputs, 0
  second, _ = predictor.plane(np.minimum(raw, lo + (hi - lo) / gain), factor)
  candidates = ((second[..., 0] > threshold) & ~grown).astype(np.uint8)
  count, labels, boxes, _ = cv2.connectedComponentsWithStats(candidates, connectivity=8)
  diameter = predictor.config.data.object_diameter / factor
  min_area = DIM_MIN_AREA * np.pi / 4 * diameter ** 2
  sigma = max(stats.noise() or 0.0, DIM_NOISE_FLOOR * (hi - lo))
  ring = max(2, round(diameter / 4))
  ring_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
  near = cv2.dilate(grown.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
  out, added = outputs.copy(), 0
  h, w = found.shape
  for k in range(1, count):
    x, y, bw, bh, area = boxes[k]
    if area < min_area:
      continue
    # The object's box grown by the ring: all that the tests below look at.
    y0, y1 = max(0, y - ring - 1), min(h, y + bh + ring + 1)
    x0, x1 = max(0, x - ring - 1), min(w, x + bw + ring + 1)
    obj = labels[y0:y1, x0:x1] == k
    if (obj & near[y0:y1, x0:x1]).any():
      continue
    around = cv2.dilate(obj.astype(np.uint8), ring_kernel).astype(bool) & ~obj & \
        ~grown[y0:y1, x0:x1]
    patch = raw[y0:y1, x0:x1]
    level = patch[around].mean() if around.any() else background
    if patch[obj].mean() - level < DIM_CONTRAST * sigma:
      continue
    out[y0:y1, x0:x1][obj] = second[y0:y1, x0:x1][obj]
    added += 1
  return out, added


def image_warning(name, stats: list[dict], mask: np.ndarray,
                  training: dict | None) -> str | None:
  """One line when an image looks unlike the training images (`training`: the run's
  input_stats.json) or its mask is ~empty/full."""
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
  return (f'{name}: {"; ".join(notes)}; the mask may be wrong (check --channel, '
          '--pixel_size and that the model fits this kind of image)')
