"""Intensity normalisation of microscopy images: the same intensities give the same network
input whatever the file's bit depth, container or exposure.

Methods (`config.data.normalization`):
  'auto'          by `config.data.kind`: 'clahe_zscore' for er/mito, 'clahe_unit' for nucleus
                  (the reference's choices, made bit-depth invariant).
  'clahe_zscore'  robust stretch (bounded for bright debris: `clahe_range`), CLAHE, then
                  per-image z-score.
  'clahe_unit'    the same stretch, CLAHE, output in [0, 1].
  'percentile'    map the 1st..99.8th percentiles to 0..1 (not clipped), as CSBDeep/StarDist;
                  bounded for sparse fields and for bright debris (`percentile_normalize`).
  'zscore'        per-image z-score only.
  'reference_clahe_zscore', 'reference_clahe_unit'
                  the reference code exactly: CLAHE on the raw integer image, divided by the
                  dtype's maximum (255 or 65535), then z-score (or not).

Where this departs from the reference, and why: the reference runs CLAHE on the raw integer
image and divides by the container's maximum, so what the network sees depends on the file's
bit depth, not its content. OpenCV's CLAHE on a 16-bit image uses 65,536 histogram bins, where
the clip limit rounds down to one count per bin: the result is mostly the rank of the distinct
grey levels in each tile, divided by 65535. The same 8-bit pixels stored in a 16-bit file (as
many cameras and converters write them) then reach a nucleus model with a maximum of about 0.4
instead of 1.0 (tests/test_normalization.py), and a nucleus model trained on 8-bit files finds
almost nothing. Here the CLAHE methods first stretch the image's own 1st..99.8th percentiles
onto 0..255 (the top 0.2 % and bottom 1 % saturate), then run CLAHE (clip 2.0) at 8 bits, the
setting the clip limit is defined for, with tiles of about 32 pixels (the reference's 8x8 grid
on its 256x256 images) rather than a fixed 8x8 grid, so a 128x128 crop, a 256x256 image and
a 2048x2048 field get the same local contrast (a fixed grid made fine-tuning on small crops
see other inputs than whole-image prediction). The result depends on the image's content
only: the same intensities stored as uint8, uint16, 12-bit-in-16, float in [0, 1] or float
camera counts give exactly the same input, and a different exposure nearly the same.

All statistics are taken over the whole image, once (never per tile). A constant image maps to
zeros. Output: float32 (H, W). They are read through one interface (`Statistics`: percentiles
of the pixels and of their 3x3 median, extent, pixel noise), which `ArrayStatistics` answers
for a plane in memory and flmiseg/chunked/statistics.py block by block for a plane that is
not; `normalization` turns them into a `Normalization` (method and bounds), and
`apply_normalization` normalises any block of the plane with it (CLAHE through a window of the
plane's own tiles, flmiseg/data/clahe.py), as `normalize` does the whole plane.

Before normalisation, `repair` mends what is not the specimen (training, evaluation and
predict alike): hot pixels, and pixels without data (NaN, a stitching border of fill values).
"""

import dataclasses
from typing import Protocol

import cv2
import numpy as np
from scipy import ndimage

from flmiseg.core.errors import UserError
from flmiseg.data import clahe as clahe_window


METHODS = ('auto', 'clahe_zscore', 'clahe_unit', 'percentile', 'zscore',
           'reference_clahe_zscore', 'reference_clahe_unit')
_AUTO = {'er': 'clahe_zscore', 'mito': 'clahe_zscore', 'nucleus': 'clahe_unit'}
# The percentiles that the robust stretch (and the 'percentile' method) maps to 0 and 1.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.8
CLAHE_CLIP_LIMIT, CLAHE_TILES = 2.0, 8
# The invariant CLAHE methods use tiles of this side instead of a fixed 8x8 grid: the
# reference's 8x8 on its 256x256 images.
CLAHE_TILE_PIXELS = 32
_EPS = 1e-6


def mirror_point(method: str, kind: str) -> float:
  """m such that m - x is, about, the normalised image of the inverted raw image (its dtype's
  maximum minus each value) when x is the normalised image: 1 for the methods with output in
  [0, 1] (exact for 'percentile' up to the asymmetry of its percentiles), 0 for the z-scored
  ones (exact for 'zscore'; CLAHE is not symmetric, so only about for the CLAHE methods)."""
  return 0.0 if resolve(method, kind).endswith('zscore') else 1.0


def resolve(method: str, kind: str) -> str:
  """The concrete method for `method` ('auto' picks by dataset kind)."""
  if method not in METHODS:
    raise ValueError(f'config.data.normalization={method!r} is not a method; valid: '
                     f'{", ".join(METHODS)}')
  if method == 'auto':
    if kind not in _AUTO:
      raise ValueError(f'config.data.kind={kind!r} is not a kind; valid: {", ".join(_AUTO)}')
    return _AUTO[kind]
  return method


class Statistics(Protocol):
  """What normalisation reads of a whole plane (`ArrayStatistics` for one in memory)."""

  def percentiles(self, q: list[float]) -> list[float]:
    """The plane's q-th percentiles (np.percentile's linear interpolation)."""

  def extent(self) -> tuple[float, float]:
    """(min, max) of the plane."""

  def noise(self) -> float | None:
    """`noise_sigma` of the plane; None when it is not a 2-D plane at least 2 pixels wide."""

  def blurred_percentile(self, q: float) -> float:
    """The q-th percentile of the plane's 3x3 median (cv2.medianBlur of its float32)."""

  def moments(self) -> tuple[float, float]:
    """(mean, standard deviation) of the plane's float32 pixels, in float64."""


class ArrayStatistics:
  """`Statistics` of an array held in memory, as the functions below always measured it."""

  def __init__(self, image: np.ndarray):
    self.image = image
    self.x = np.asarray(image, np.float64)

  def percentiles(self, q):
    return list(np.percentile(self.x, q))

  def extent(self):
    return self.x.min(), self.x.max()

  def noise(self):
    if self.x.ndim != 2 or self.x.shape[1] < 2:
      return None
    return noise_sigma(self.x)

  def blurred_percentile(self, q):
    return float(np.percentile(cv2.medianBlur(self.x.astype(np.float32), 3), q))

  def moments(self):
    x = np.asarray(self.image).astype(np.float32)
    return x.mean(dtype=np.float64), x.std(dtype=np.float64)


def _robust_range(stats: Statistics, low: float, high: float) -> tuple[float, float]:
  lo, hi = stats.percentiles([low, high])
  if hi - lo <= 0:
    lo, hi = stats.extent()
  return float(lo), float(hi)


def robust_range(image: np.ndarray, low: float = LOW_PERCENTILE,
                 high: float = HIGH_PERCENTILE) -> tuple[float, float]:
  """(lo, hi): the image's `low` and `high` percentiles, or its min and max when those
  coincide (a nearly constant image); lo == hi only for a constant image."""
  return _robust_range(ArrayStatistics(image), low, high)


def stretch_to_uint8(image: np.ndarray,
                     bounds: tuple[float, float] | None = None) -> np.ndarray:
  """uint8 (H, W): `bounds` (lo, hi), by default the image's robust range (`robust_range`),
  mapped onto 0..255, saturating outside it; all zeros for a constant image."""
  lo, hi = robust_range(image) if bounds is None else bounds
  if hi <= lo:
    return np.zeros(image.shape, np.uint8)
  unit = (np.asarray(image, np.float64) - lo) / (hi - lo)
  return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def clahe_grid(shape: tuple[int, int]) -> tuple[int, int]:
  """CLAHE's (columns, rows) of tiles for an image: tiles of about CLAHE_TILE_PIXELS, so the
  local contrast it evens out has the same extent in a 128x128 crop, a 256x256 image (8x8,
  the reference's grid) and a 2048x2048 field."""
  h, w = shape
  return (max(1, round(w / CLAHE_TILE_PIXELS)), max(1, round(h / CLAHE_TILE_PIXELS)))


def clahe(image: np.ndarray) -> np.ndarray:
  """float32 (H, W) in [0, 1]: CLAHE (clip 2, tiles of ~32 px) of the robustly stretched
  image (`clahe_range`)."""
  stretched = stretch_to_uint8(image, clahe_range(image))
  if not stretched.any():  # a constant image: CLAHE would lift it to a uniform grey
    return np.zeros(image.shape, np.float32)
  op = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=clahe_grid(image.shape))
  return op.apply(stretched).astype(np.float32) / 255.0


def reference_clahe(image: np.ndarray) -> np.ndarray:
  """float32 (H, W): the reference's CLAHE on the raw integer image, divided by the dtype's
  maximum (255 or 65535). Other dtypes are first stretched min..max onto 16 bits."""
  if image.dtype in (np.uint8, np.uint16):
    integer = image
  else:
    x = image.astype(np.float64)
    integer = np.round((x - x.min()) / max(x.max() - x.min(), _EPS) * 65535).astype(np.uint16)
  full_scale = 255.0 if integer.dtype == np.uint8 else 65535.0
  op = cv2.createCLAHE(clipLimit=CLAHE_CLIP_LIMIT, tileGridSize=(CLAHE_TILES, CLAHE_TILES))
  return op.apply(np.ascontiguousarray(integer)).astype(np.float32) / full_scale


def zscore(x: np.ndarray) -> np.ndarray:
  """float32: (x - mean) / std over the whole array; zeros for a constant array."""
  x = x.astype(np.float32)
  return standardize(x, x.mean(dtype=np.float64), x.std(dtype=np.float64))


def standardize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """float32 (x - mean) / std of float32 `x` with its whole image's float64 `mean`, `std`
  (`zscore` of a block)."""
  return ((x - np.float64(mean)) / max(std, _EPS)).astype(np.float32)


# A sparse field, a few objects in a large image (under ~0.2 % of its pixels), puts the 99.8th
# percentile into the background, whose noise the stretch then spreads over 0..1, with the
# objects far above it: the shipped nucleus model found 0.63 IoU on a simulated 1024x1024
# field with 0.12 % nuclei (0.97 with the bound below). So when the 99.8th percentile lies
# within SPARSE_NOISE_SIGMAS noise standard deviations (`noise_sigma`) of the median, the
# brightest structures (the 99.99th percentile of the 3x3 median, which no hot pixel moves)
# map to at most SPARSE_TOP_RATIO. A dense structure puts the 99.8th percentile far above the
# noise (22-56 sigma in the simulated end-to-end images; that sparse field 6.4, the fields
# with more nuclei 18 and more), so debris over a dense structure never triggers it. In the
# shipped models' training images the brightest structures lie at a median 1.2 of the
# stretch and below 2.3 in 99 % of them.
SPARSE_NOISE_SIGMAS = 10.0
SPARSE_TOP_RATIO = 2.5
# Bright debris (dead cells, aggregates) over more than 0.2 % of an image puts the 99.8th
# percentile into the debris and compresses the structure below 0.1: 6 discs of radius 8 at
# 10x the structure took the shipped er model to 0.06 IoU, mito and nucleus to 0.45. So when
# the 99th percentile is a dense structure (SPARSE_NOISE_SIGMAS above the median), the
# 99.8th's stretch is at most DEBRIS_RATIO times the 99th's; in the shipped models' training
# images with a dense structure it is at a median 1.3 and at most 2.3.
DEBRIS_RATIO = 3.0


def noise_sigma(x: np.ndarray, where: np.ndarray | None = None) -> float:
  """The standard deviation of a 2-D image's pixel noise: the median absolute deviation of
  the differences of horizontal neighbours (both in `where`, when given), which structures
  larger than a pixel hardly move, scaled to a Gaussian's sigma; 0 without such pairs."""
  d = np.diff(np.asarray(x, np.float64), axis=1)
  if where is not None:
    d = d[where[:, 1:] & where[:, :-1]]
  if d.size == 0:
    return 0.0
  return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def _dense_structure(stats: Statistics) -> tuple[float, float, float] | None:
  """(median, 99th percentile, SPARSE_NOISE_SIGMAS noise sigmas) of a 2-D image, or None
  for other arrays and for an image without measurable noise (sigma 0: noise-free or flat,
  which keeps the plain stretch)."""
  sigma = stats.noise()
  if sigma is None:
    return None
  noise = SPARSE_NOISE_SIGMAS * sigma
  if noise <= 0:
    return None
  median, p99 = stats.percentiles([50.0, 99.0])
  return float(median), float(p99), noise


def percentile_range(stats: Statistics, low: float = LOW_PERCENTILE,
                     high: float = HIGH_PERCENTILE) -> tuple[float, float]:
  """(lo, hi) that 'percentile' maps to 0..1: the `low`..`high` percentiles; in a 2-D image
  with noise, a sparse field's brightest structures to at most SPARSE_TOP_RATIO, and over a
  dense structure the `high` percentile's stretch to at most DEBRIS_RATIO times the 99th's."""
  lo, hi = _robust_range(stats, low, high)
  dense = _dense_structure(stats)
  if dense is not None:
    median, p99, noise = dense
    if hi - median < noise:  # a sparse field
      top = stats.blurred_percentile(99.99)
      hi = max(hi, lo + (top - lo) / SPARSE_TOP_RATIO)
    elif p99 - median >= noise:  # a dense structure: debris is capped
      hi = min(hi, lo + DEBRIS_RATIO * (p99 - lo))
  return lo, hi


def unit_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """float32 (x - lo) / (hi - lo), not clipped (the 'percentile' method's output)."""
  return ((np.asarray(x, np.float64) - lo) / max(hi - lo, _EPS)).astype(np.float32)


def percentile_normalize(x: np.ndarray, low: float = LOW_PERCENTILE,
                         high: float = HIGH_PERCENTILE) -> np.ndarray:
  """float32: the `low`..`high` percentiles mapped to 0..1 (not clipped), bounded for sparse
  fields and bright debris (`percentile_range`)."""
  stats = ArrayStatistics(x)
  return unit_range(stats.x, *percentile_range(stats, low, high))


def clahe_range(image: np.ndarray) -> tuple[float, float]:
  """(lo, hi) that the CLAHE methods stretch onto 0..255 before CLAHE: `robust_range`, its
  top bounded over a dense structure as `percentile_normalize` bounds it for bright debris
  (at most DEBRIS_RATIO times the 99th percentile's stretch). Without the bound, debris
  over 0.2 % of an image (6 discs of radius 8 in 512x512 at 10x the brightest nuclei) took
  the 8-bit stretch's top: nuclei at a tenth of the brightest kept about 6 grey levels above
  a background whose noise rounded away (0.022 in clahe_unit, the bright ones 0.12; now 0.11
  and 0.42; docs/datasets.md). It applies in none of the default simulated images (240
  checked) and in 1 of 60 'wide' nucleus ones."""
  return clahe_bounds(ArrayStatistics(image))


def clahe_bounds(stats: Statistics) -> tuple[float, float]:
  """`clahe_range` of a plane's `Statistics`."""
  lo, hi = _robust_range(stats, LOW_PERCENTILE, HIGH_PERCENTILE)
  dense = _dense_structure(stats)
  if dense is not None and dense[1] - dense[0] >= dense[2]:
    hi = min(hi, lo + DEBRIS_RATIO * (dense[1] - lo))
  return lo, hi


def normalize(image: np.ndarray, method: str, kind: str = 'er') -> np.ndarray:
  """Normalises a 2-D image with `method` (see module docstring); float32 (H, W)."""
  method = resolve(method, kind)
  if method == 'clahe_zscore':
    return zscore(clahe(image))
  if method == 'clahe_unit':
    return clahe(image)
  if method == 'reference_clahe_zscore':
    return zscore(reference_clahe(image))
  if method == 'reference_clahe_unit':
    return reference_clahe(image)
  if method == 'percentile':
    return percentile_normalize(image)
  return zscore(image)


# ----------------------------------------------------------------------------- blocks

# The methods a plane can be normalised with block by block (the reference ones run CLAHE on
# a fixed 8x8 grid of the raw plane, whose tiles grow with the plane).
BLOCKWISE_METHODS = ('clahe_zscore', 'clahe_unit', 'percentile', 'zscore')


@dataclasses.dataclass(frozen=True)
class Normalization:
  """A plane's normalisation, measured once over the whole plane (`normalization`), so that
  any block of it is normalised alone as `normalize` normalises the whole
  (`apply_normalization`)."""
  method: str  # resolved, one of BLOCKWISE_METHODS
  shape: tuple[int, int]  # the plane's (H, W): CLAHE's tiles depend on it
  lo: float = 0.0  # the stretch: onto 0..255 before CLAHE, onto 0..1 for 'percentile'
  hi: float = 0.0
  blank: bool = False  # CLAHE methods: the stretched plane is all 0 (constant): zeros out
  mean: float = 0.0  # the z-score: of the plane ('zscore'), of its CLAHE ('clahe_zscore')
  std: float = 1.0

  @property
  def tiling(self) -> clahe_window.Tiling:
    return clahe_window.Tiling(self.shape, clahe_grid(self.shape))

  def context(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[tuple, tuple]:
    """(rows, cols) of the plane that normalising its pixels [rows) x [cols) reads."""
    if not self.method.startswith('clahe'):
      return rows, cols
    need_y, need_x = self.tiling.rows_needed(*rows), self.tiling.cols_needed(*cols)
    return ((min(rows[0], need_y[0]), max(rows[1], need_y[1])),
            (min(cols[0], need_x[0]), max(cols[1], need_x[1])))


def normalization(stats: Statistics, method: str, kind: str, shape: tuple[int, int],
                  clahe_moments=None) -> Normalization:
  """The `Normalization` of a plane of `shape` from its `stats`. 'clahe_zscore' z-scores the
  CLAHE of the plane: `clahe_moments(normalization without them)` measures its (mean, std).
  Raises ValueError for a method outside BLOCKWISE_METHODS."""
  method = resolve(method, kind)
  if method not in BLOCKWISE_METHODS:
    raise ValueError(f'normalization {method!r} cannot be applied block by block (it runs '
                     f'CLAHE on a fixed grid of the whole plane); these can: '
                     f'{", ".join(BLOCKWISE_METHODS)}')
  if method == 'percentile':
    return Normalization(method, shape, *percentile_range(stats))
  if method == 'zscore':
    mean, std = stats.moments()
    return Normalization(method, shape, mean=mean, std=std)
  lo, hi = clahe_bounds(stats)
  blank = not stretch_to_uint8(np.array([stats.extent()[1]]), (lo, hi)).any()
  norm = Normalization(method, shape, lo, hi, blank)
  if method == 'clahe_zscore':
    mean, std = clahe_moments(norm)
    norm = dataclasses.replace(norm, mean=mean, std=std)
  return norm


def apply_clahe(region: np.ndarray, origin: tuple[int, int], norm: Normalization,
                rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
  """float32 in [0, 1]: `clahe` of the whole plane at its pixels [rows) x [cols), from
  `region`, the plane's raw pixels from `origin` on, covering `norm.context(rows, cols)`."""
  if norm.blank:
    return np.zeros((rows[1] - rows[0], cols[1] - cols[0]), np.float32)
  stretched = stretch_to_uint8(region, (norm.lo, norm.hi))
  out = clahe_window.window(stretched, origin, norm.tiling, rows, cols, CLAHE_CLIP_LIMIT)
  return out.astype(np.float32) / 255.0


def apply_normalization(region: np.ndarray, origin: tuple[int, int], norm: Normalization,
                        rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
  """float32: `normalize` of the whole plane at its pixels [rows) x [cols), from `region`,
  the plane's raw pixels from `origin` (y, x) on, covering `norm.context(rows, cols)`."""
  if norm.method.startswith('clahe'):
    out = apply_clahe(region, origin, norm, rows, cols)
    return standardize(out, norm.mean, norm.std) if norm.method == 'clahe_zscore' else out
  window = region[rows[0] - origin[0]:rows[1] - origin[0],
                  cols[0] - origin[1]:cols[1] - origin[1]]
  if norm.method == 'percentile':
    return unit_range(window, norm.lo, norm.hi)
  return standardize(window.astype(np.float32), norm.mean, norm.std)


# ----------------------------------------------------------------------------- repair

# Pixels at a plane's minimum are read as no data (a stitching, registration or masking
# border) when they are at least this fraction of the plane and the median of the pixels
# that touch them lies at least NO_DATA_GAP of the plane's range (to its 99.8th percentile)
# above them: a camera's offset and background are then far above the fill value. Zeros that
# are the background itself (a confocal's clipped offset, a background-subtracted image) and
# clipped dark pixels (the saturated cores of dark nuclei on a bright background) have
# neighbours just above them and stay data, and so does the flat background of an image
# without noise (sharp rendered objects on black; `noise_sigma` of the rest 0).
NO_DATA_FRACTION = 0.005
NO_DATA_MIN_PIXELS = 64  # and at least this many pixels
NO_DATA_GAP = 0.2
# A hot pixel (or a cosmic-ray hit) lies above the 99.8th percentile of the plane's 3x3
# median and more than HOT_PIXEL_STEP times that median's 1st-99.8th percentile range above
# its own median, which replaces it. A structure the PSF spreads over its neighbours never is.
HOT_PIXEL_STEP = 1.0


def _no_data(plane: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
  """The `valid` pixels of a plane that form a no-data block at its minimum, else None."""
  fill = plane[valid].min()
  at_min = valid & (plane == fill)
  if np.count_nonzero(at_min) < max(NO_DATA_FRACTION * plane.size, NO_DATA_MIN_PIXELS):
    return None
  ring = valid & ~at_min & cv2.dilate(at_min.astype(np.uint8), np.ones((3, 3), np.uint8)
                                      ).astype(bool)
  if not ring.any() or noise_sigma(plane, valid & ~at_min) <= 0:
    return None  # (no noise in the other pixels: a clean, rendered image, not a camera's)
  high = np.percentile(plane[valid], 99.8)
  gap = np.median(plane[ring]) - fill
  return at_min if high > fill and gap >= NO_DATA_GAP * (high - fill) else None


def mirror_fill(plane: np.ndarray, gone: np.ndarray) -> np.ndarray:
  """The plane with its `gone` pixels filled by the image mirrored at the nearest pixel with
  data (that pixel itself where the mirror point has none), as a straight border is
  reflected. A flat fill made an edge: the shipped er model lost 0.13 IoU on the 32 columns
  beside a stitching border filled with the background's level (docs/inference.md)."""
  near = ndimage.distance_transform_edt(gone, return_distances=False, return_indices=True)
  h, w = plane.shape
  ys, xs = np.indices(plane.shape)
  my = np.clip(2 * near[0] - ys, 0, h - 1)
  mx = np.clip(2 * near[1] - xs, 0, w - 1)
  mirrored = np.where(gone[my, mx], plane[near[0], near[1]], plane[my, mx])
  return np.where(gone, mirrored, plane).astype(plane.dtype)


# The percentiles of a plane's 3x3 median that bound its hot pixels (`_hot_pixels`).
HOT_PIXEL_PERCENTILES = (1.0, 99.8)


def _hot_pixels(plane: np.ndarray) -> np.ndarray:
  """The plane with its hot pixels replaced by the median of their 3x3 neighbourhood."""
  median = cv2.medianBlur(plane.astype(np.float32), 3)
  lo, hi = np.percentile(median, HOT_PIXEL_PERCENTILES)  # not moved by the hot pixels
  return replace_hot_pixels(plane, median, (lo, hi))


def replace_hot_pixels(plane: np.ndarray, median: np.ndarray,
                       bounds: tuple[float, float]) -> np.ndarray:
  """`plane` (any block of a plane) with its hot pixels replaced by `median`, their 3x3
  median, given the whole plane's HOT_PIXEL_PERCENTILES of that median (`bounds`)."""
  lo, hi = bounds
  hot = (plane > hi) & (plane - median > HOT_PIXEL_STEP * (hi - lo))
  return np.where(hot, median, plane).astype(plane.dtype) if hot.any() else plane


def repair(planes: np.ndarray, name) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
  """(planes, where they have no data, warning lines) of raw planes (N, H, W) before the
  network, so that a camera's defects and a file's empty areas do not reach it:

  * NaN/inf pixels (ImageJ writes NaN where a 32-bit image has no data) and a block of fill
    values at a plane's minimum far below its other pixels (`_no_data`: the black border of
    a stitched or registered image) are no data: they take the image mirrored at the
    nearest pixel with data (`mirror_fill`) and get the outputs 0 (`segment.segment_planes`);
  * hot pixels (`_hot_pixels`) take the median of their 3x3 neighbourhood.

  Both were measured to wreck the shipped models' masks (docs/inference.md). `missing` is
  None when every pixel has data. A plane without a finite pixel is a UserError naming
  `name`."""
  planes = np.asarray(planes)
  if planes.dtype == bool:  # a binary image: neither fill values nor hot pixels
    return planes, None, []
  nan = None
  if np.issubdtype(planes.dtype, np.floating):
    nan = ~np.isfinite(planes)
    if nan.all(axis=(1, 2)).any():
      raise UserError(f'{name}: no pixel of the image (or of one of its planes) is a finite '
                      'number (all NaN or inf)')
    nan = nan if nan.any() else None
  out, missing, borders = [], [], 0
  for i, plane in enumerate(planes):
    gone = np.zeros(plane.shape, bool) if nan is None else nan[i].copy()
    block = _no_data(plane, ~gone)
    if block is not None:
      gone |= block
      borders += int(np.count_nonzero(block))
    if gone.any():
      plane = mirror_fill(plane, gone)
    out.append(_hot_pixels(plane))
    missing.append(gone)
  notes = []
  if nan is not None:
    notes.append(f'{name}: {int(np.count_nonzero(nan)):,} NaN or inf pixel(s) read as no data: '
                 'background in the mask')
  if borders:
    notes.append(f'{name}: {borders:,} pixel(s) at the image\'s lowest value, far below its '
                 'other pixels, read as no data (a stitching or registration border?): '
                 'background in the mask')
  missing = np.stack(missing)
  return np.stack(out), (missing if missing.any() else None), notes


# ----------------------------------------------------------------------------- statistics

# Per-image statistics of a normalised image, summarised over the training images and
# compared at predict time to warn about images unlike those the model was trained on.
STAT_NAMES = ('p1', 'p50', 'p99', 'mean', 'std')


def image_stats(normalised: np.ndarray) -> dict[str, float]:
  """{p1, p50, p99, mean, std} of a normalised image (float)."""
  x = np.asarray(normalised, np.float64)
  p1, p50, p99 = np.percentile(x, [1, 50, 99])
  return {'p1': float(p1), 'p50': float(p50), 'p99': float(p99), 'mean': float(x.mean()),
          'std': float(x.std())}
