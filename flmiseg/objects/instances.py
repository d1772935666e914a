"""Instance segmentation: separating touching objects, as host-side numpy.

The method (config.model.instance_head='distance'): the model has one extra output channel, a
logit whose sigmoid regresses each object's normalised distance map: the Euclidean distance of
a pixel to the nearest pixel outside its own object (background or another object), divided
by the largest distance in that object, so every object rises from ~0 at its edge to 1 at its
centre whatever its size (`distance_target`). Two touching nuclei give two peaks with a valley
between them. Post-processing (`from_distance`), as Naylor et al. (IEEE TMI 2019) do with
their regressed distance maps: the predicted distance, lightly smoothed (Gaussian sigma
SEED_SMOOTHING px), seeds one object at each of its h-maxima (regional maxima that rise at
least `dynamic` above the saddle joining them to a higher one, so noise bumps on one object do
not split it); a seeded watershed on the negated distance splits the foreground (the semantic
mask) between the seeds, and foreground components that received no seed become objects of
their own. The dynamic is calibrated with the threshold on the validation split
(`calibration.calibrate_dynamic`). It works with every model of the zoo (one more output
channel) and costs one watershed on the CPU per image.

Models without the head get connected components of the mask (`connected_components`),
which merge touching objects.
"""

import numpy as np
from scipy import ndimage
from skimage import measure
from skimage import morphology
from skimage import segmentation

from flmiseg.core.errors import UserError

HEADS = ('', 'distance')  # config.model.instance_head values ('' = semantic only)
SEED_DYNAMIC = 0.1  # default h of the seeds' h-maxima, in units of the normalised distance
DYNAMIC_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)  # values calibration tries
SEED_SMOOTHING = 1.0  # Gaussian sigma (pixels) applied to the distance before finding seeds
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity


def distance_target(labels: np.ndarray) -> np.ndarray:
  """float32 (H, W) in [0, 1]: each object's distance map divided by its maximum.

  labels: (H, W) integer label image, 0 background. Distances are to the nearest pixel of
  another label or the background; the image border counts as outside, so an object cut by
  the border peaks inside the image.
  """
  labels = np.asarray(labels)
  out = np.zeros(labels.shape, np.float32)
  for value, box in enumerate(ndimage.find_objects(labels), start=1):
    if box is None:
      continue
    # One pixel of margin (zeros past the border), so the edge is outside the object.
    rows = slice(max(box[0].start - 1, 0), box[0].stop + 1)
    cols = slice(max(box[1].start - 1, 0), box[1].stop + 1)
    inside = np.pad(labels[rows, cols] == value, 1)
    distance = ndimage.distance_transform_edt(inside)[1:-1, 1:-1]
    peak = distance.max()
    if peak > 0:
      region = out[rows, cols]
      region[inside[1:-1, 1:-1]] = (distance / peak)[inside[1:-1, 1:-1]]
  return out


def targets_from_mask(mask: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
  """The distance target of a training mask: from its label image when it has one, else
  from the 8-connected components of the binary mask (touching objects stay one)."""
  if labels is None:
    labels, _ = ndimage.label(mask > 0, structure=_EIGHT)
  return distance_target(labels)


def _to_uint16(labels: np.ndarray) -> np.ndarray:
  labels, _, _ = segmentation.relabel_sequential(labels)
  if labels.max() > np.iinfo(np.uint16).max:
    raise UserError(f'{labels.max()} instances do not fit a uint16 label image')
  return labels.astype(np.uint16)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
  sizes = np.bincount(labels.ravel())
  small = sizes < min_size
  small[0] = False
  labels = labels.copy()
  labels[small[labels]] = 0
  return labels


def connected_components(mask: np.ndarray, min_size: int = 0) -> np.ndarray:
  """uint16 labels 1..n of the 8-connected components of at least min_size pixels."""
  return _to_uint16(component_labels(mask, min_size))


def component_labels(mask: np.ndarray, min_size: int = 0) -> np.ndarray:
  """`connected_components`' labels before renumbering, any integer dtype."""
  return _drop_small(measure.label(mask > 0, connectivity=2), min_size)


def h_maxima(image: np.ndarray, h: float) -> np.ndarray:
  """uint8 (H, W): `skimage.morphology.h_maxima(image, h)`, exactly, of a float64 image >= 0
  whose zeros are background, computed object by object.

  skimage reconstructs the image from itself lowered by h (reconstruction by dilation), which
  sorts every pixel: 85 % of `from_distance`'s time on a 1024x1024 nucleus field. A pixel of
  a connected object (8-connected pixels > 0) is reached through the background only with
  values <= 0, and those reach every object alike: the lowered image's maximum, capped at 0
  (`floor`). So each object's reconstruction is the one of its bounding box, raised to that
  floor: the same values (reconstruction picks values, it does no arithmetic), from the
  object's pixels only."""
  if h > np.ptp(image):
    return np.zeros(image.shape, np.uint8)
  objects, count = ndimage.label(image > 0, structure=_EIGHT)
  if count == 0 or np.all(objects):  # no background to pass through: skimage's own way
    return morphology.h_maxima(image, h)
  resolution = 2 * np.finfo(image.dtype).resolution * np.abs(image)
  lowered = image - h - resolution  # skimage's marker, to the bit
  floor = min(0.0, lowered.max())
  out = np.zeros(image.shape, np.uint8)
  for index, box in enumerate(ndimage.find_objects(objects), start=1):
    rebuilt = morphology.reconstruction(lowered[box], image[box], method='dilation')
    inside = objects[box] == index
    peaks = (image[box] - np.maximum(rebuilt, floor)) >= h
    out[box][inside & peaks] = 1
  return out


def from_distance(mask: np.ndarray, distance: np.ndarray,
                  dynamic: float = SEED_DYNAMIC, min_size: int = 0) -> np.ndarray:
  """uint16 instance labels 1..n of a semantic mask split by a predicted distance map.

  Args:
    mask: (H, W) bool, the semantic foreground.
    distance: (H, W) float, the predicted normalised distance (sigmoid of the head).
    dynamic: the h of the h-maxima that seed objects (see the module docstring).
    min_size: objects smaller than this many pixels are removed.
  Deterministic: the same inputs give the same labels.
  """
  return _to_uint16(distance_labels(mask, distance, dynamic, min_size))


def distance_labels(mask: np.ndarray, distance: np.ndarray, dynamic: float = SEED_DYNAMIC,
                    min_size: int = 0) -> np.ndarray:
  """`from_distance`'s labels as int32 (numbered as they come, with gaps where small objects
  were removed), for images with more objects than a uint16 holds (flmiseg/chunked/)."""
  mask = np.asarray(mask, bool)
  smooth = ndimage.gaussian_filter(np.asarray(distance, np.float64), SEED_SMOOTHING)
  smooth = np.where(mask, smooth, 0.0)
  seeds, _ = ndimage.label(h_maxima(smooth, dynamic) > 0, structure=_EIGHT)
  seeds = np.where(mask, seeds, 0)
  labels = segmentation.watershed(-smooth, markers=seeds, mask=mask)
  # Foreground that no seed reached (objects too thin or dim for a seed): objects of their own.
  orphans, num_orphans = ndimage.label(mask & (labels == 0), structure=_EIGHT)
  if num_orphans:
    labels = np.where(orphans > 0, orphans + labels.max(), labels)
  return _drop_small(labels, min_size)


def from_outputs(outputs: np.ndarray, threshold: float, dynamic: float,
                 min_size: int) -> np.ndarray:
  """uint16 instance labels of one image's model outputs (h, w, C): the mask (channel 0 >
  threshold) split by the instance head's distance (channel 1) where the model has one,
  else its connected components."""
  return _to_uint16(output_labels(outputs, threshold, dynamic, min_size))


def output_labels(outputs: np.ndarray, threshold: float, dynamic: float,
                  min_size: int) -> np.ndarray:
  """`from_outputs`' labels before they are renumbered 1..n as uint16 (gaps where small
  objects were removed): int32 or int64, for blocks of any size (flmiseg/chunked/)."""
  mask = outputs[..., 0] > threshold
  if outputs.shape[-1] > 1:
    return distance_labels(mask, outputs[..., 1], dynamic, min_size)
  return component_labels(mask, min_size)


def object_table(labels: np.ndarray, image: np.ndarray,
                 pixel_size: float | None) -> tuple[list[str], list[list]]:
  """(header, rows) of one row per object: label, area, centroid, mean raw intensity.

  With a pixel size (micrometres), area is in um^2 and the centroid in um (columns named so);
  otherwise in pixels.
  """
  scale = pixel_size or 1.0
  header = object_header(pixel_size)
  rows = []
  for region in measure.regionprops(labels.astype(np.int32), intensity_image=image):
    y, x = region.centroid
    rows.append([int(region.label), float(region.area) * scale ** 2, y * scale, x * scale,
                 float(region.intensity_mean)])
  return header, rows


def object_header(pixel_size: float | None) -> list[str]:
  """The columns of `object_table` (in um with a pixel size, else in pixels)."""
  unit = 'um' if pixel_size else 'px'
  return ['label', f'area_{unit}2', f'centroid_y_{unit}', f'centroid_x_{unit}',
          'mean_intensity']


def object_row(label: int, area: float, sum_y: float, sum_x: float, sum_i: float,
               pixel_size: float | None) -> list:
  """`object_table`'s row of an object from its area and the sums of its pixels' y, x and
  intensities (the same numbers: centroid and mean are those sums over the area)."""
  scale = pixel_size or 1.0
  return [int(label), float(area) * scale ** 2, sum_y / area * scale, sum_x / area * scale,
          float(sum_i / area)]
