"""A plane's statistics, measured once over the whole plane, block by block.

Prediction repairs hot pixels with bounds taken from the whole plane and normalises with the
whole plane's statistics (flmiseg/data/preprocess.py); a plane that is never held whole gets
them here, in passes over its blocks (flmiseg/chunked/run.py runs them on the engine):

  * integer planes of at most 16 bits, exactly: each block returns the counts of its values
    (`pass_median`: the 3x3 median, for the hot pixels' bounds; `pass_repaired`: the
    repaired pixels, their horizontal differences (the noise) and their 3x3 median;
    `pass_clahe`: the CLAHE output, for clahe_zscore's z-score), and `HistogramStatistics`
    answers preprocess.Statistics from the summed counts as numpy answers it from the pixels:
    np.percentile's and np.median's arithmetic on the same order statistics, so the bounds
    are the in-memory path's to the bit (the z-score's mean and standard deviation agree to
    rounding: numpy sums pairwise, here the sums are exact);
  * other planes (float, 32-bit): the whole plane when it holds at most WHOLE_PIXELS pixels
    (then exactly), else a mosaic of SAMPLES blocks of SAMPLE_SIDE pixels spread over it
    (`sample`): an estimate, which the run reports.

Per-block statistics never normalise a block: that would change the mask from block to block.
"""

import dataclasses
import math

import cv2
import numpy as np

from flmiseg.data import preprocess

WHOLE_PIXELS = 4096 * 4096  # other planes up to this size are read whole for their statistics
SAMPLES, SAMPLE_SIDE = 16, 1024  # else this many blocks of this side, spread over the plane


def exact(dtype: np.dtype) -> bool:
  """Whether a plane of `dtype` gets exact statistics from counts of its values."""
  dtype = np.dtype(dtype)
  return dtype.kind in 'uib' and dtype.itemsize <= 2


# ----------------------------------------------------------------------------- counts

Counts = tuple[np.ndarray, np.ndarray]  # (sorted distinct values, how often each occurs)


def count(values: np.ndarray) -> Counts:
  """The counts of integer `values` (any shape)."""
  values = np.asarray(values).ravel()
  if not values.size:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  values = values.astype(np.int64)
  low = int(values.min())
  dense = np.bincount(values - low)
  present = np.flatnonzero(dense)
  return present + low, dense[present]


def merge(parts: list[Counts]) -> Counts:
  """The counts of all the parts' values together."""
  parts = [p for p in parts if len(p[0])]
  if not parts:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  low = min(int(v[0]) for v, _ in parts)
  high = max(int(v[-1]) for v, _ in parts)
  dense = np.zeros(high - low + 1, np.int64)
  for values, counts in parts:
    np.add.at(dense, values - low, counts)
  present = np.flatnonzero(dense)
  return present + low, dense[present]


def _order(counts: Counts, ranks: np.ndarray) -> np.ndarray:
  """The values at 0-based `ranks` of the sorted pixels, as float64."""
  values, n = counts
  return values[np.searchsorted(np.cumsum(n), ranks, side='right')].astype(np.float64)


def percentiles(counts: Counts, q) -> list[float]:
  """np.percentile(pixels, q) (linear) of the pixels that `counts` counts, to the bit: the
  same order statistics, combined with numpy's arithmetic (_lerp)."""
  total = int(counts[1].sum())
  quantiles = np.true_divide(np.asarray(q, np.float64), 100)
  virtual = (total - 1) * quantiles
  below = np.floor(virtual)
  gamma = virtual - below
  lower = np.clip(below, 0, total - 1).astype(np.int64)
  upper = np.clip(below + 1, 0, total - 1).astype(np.int64)
  a, b = _order(counts, lower), _order(counts, upper)
  diff = b - a
  out = a + diff * gamma
  out = np.where(gamma >= 0.5, b - diff * (1 - gamma), out)
  return [float(v) for v in out]


def median(counts: Counts) -> float:
  """np.median of the pixels that `counts` counts: the middle one, or the mean of the two."""
  total = int(counts[1].sum())
  if total % 2:
    return float(_order(counts, np.array([total // 2]))[0])
  pair = _order(counts, np.array([total // 2 - 1, total // 2]))
  return float(np.mean(pair))


def _distinct(values: np.ndarray, counts: np.ndarray) -> Counts:
  order = np.argsort(values, kind='stable')
  values, counts = values[order], counts[order]
  keys, starts = np.unique(values, return_index=True)
  return keys, np.add.reduceat(counts, starts)


def noise_sigma(diffs: Counts) -> float:
  """`preprocess.noise_sigma` of a plane from the counts of its horizontal differences."""
  if not len(diffs[0]):
    return 0.0
  centre = median(diffs)
  spread = _distinct(np.abs(diffs[0].astype(np.float64) - centre), diffs[1])
  return float(1.4826 * median(spread) / np.sqrt(2.0))


@dataclasses.dataclass(frozen=True)
class HistogramStatistics:
  """preprocess.Statistics of a plane from counts of its (repaired) pixels, their horizontal
  differences and their 3x3 median (None when not measured: 'percentile' alone reads it)."""
  pixels: Counts
  diffs: Counts
  blurred: Counts | None
  width: int

  def percentiles(self, q):
    return percentiles(self.pixels, q)

  def extent(self):
    return float(self.pixels[0][0]), float(self.pixels[0][-1])

  def noise(self):
    return None if self.width < 2 else noise_sigma(self.diffs)

  def blurred_percentile(self, q):
    return percentiles(self.blurred, [q])[0]

  def moments(self):
    return moments(self.pixels)


def moments(counts: Counts) -> tuple[float, float]:
  """(mean, standard deviation) of the float32 pixels that `counts` counts, in float64."""
  values = counts[0].astype(np.float32).astype(np.float64)
  total = int(counts[1].sum())
  mean = math.fsum(values * counts[1]) / total
  return mean, math.sqrt(math.fsum((values - mean) ** 2 * counts[1]) / total)


# ----------------------------------------------------------------------------- blocks

@dataclasses.dataclass(frozen=True)
class PlaneStats:
  """What every block of a plane is repaired and normalised with."""
  hot: tuple[float, float]  # HOT_PIXEL_PERCENTILES of the 3x3 median (preprocess)
  norm: preprocess.Normalization
  exact: bool  # measured over every pixel (else on SAMPLES blocks)


def _grow(span: tuple[int, int], by: int, size: int) -> tuple[int, int]:
  return max(0, span[0] - by), min(size, span[1] + by)


def repaired(read, shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int],
             hot: tuple[float, float]) -> tuple[np.ndarray, np.ndarray | None]:
  """(the repaired pixels [rows) x [cols) of a plane of `shape`, where they have no data or
  None) as `preprocess.repair` gives them in the whole plane: NaN/inf pixels (float planes)
  take the pixels mirrored at the nearest pixel with data (within one pixel more than the
  window: an estimate where no data reaches past it), hot pixels their 3x3 median against
  the plane's bounds. `read(rows, cols)` gives raw pixels."""
  outer = _grow(rows, 1, shape[0]), _grow(cols, 1, shape[1])
  raw = read(*outer)
  missing = None
  if np.issubdtype(raw.dtype, np.floating):
    gone = ~np.isfinite(raw)
    if gone.any():
      raw = preprocess.mirror_fill(raw, gone) if not gone.all() else np.zeros_like(raw)
      missing = gone
  median = cv2.medianBlur(raw.astype(np.float32), 3)
  fixed = preprocess.replace_hot_pixels(raw, median, hot)
  inner = (slice(rows[0] - outer[0][0], rows[1] - outer[0][0]),
           slice(cols[0] - outer[1][0], cols[1] - outer[1][0]))
  return fixed[inner], (None if missing is None or not missing[inner].any() else
                        missing[inner])


def pass_median(read, shape, rows, cols) -> Counts:
  """Counts of the 3x3 median of the plane's pixels [rows) x [cols)."""
  outer = _grow(rows, 1, shape[0]), _grow(cols, 1, shape[1])
  median = cv2.medianBlur(read(*outer).astype(np.float32), 3)
  return count(median[rows[0] - outer[0][0]:rows[1] - outer[0][0],
                      cols[0] - outer[1][0]:cols[1] - outer[1][0]])


def pass_repaired(read, shape, rows, cols, hot, blurred: bool) -> tuple[Counts, Counts,
                                                                        Counts | None]:
  """Counts of the repaired pixels [rows) x [cols), of their differences with their right
  neighbours (within the plane), and with `blurred` of their 3x3 median."""
  grown = _grow(rows, 1, shape[0]), _grow(cols, 1, shape[1])
  fixed, _ = repaired(read, shape, *grown, hot)
  y, x = rows[0] - grown[0][0], cols[0] - grown[1][0]
  core = fixed[y:y + rows[1] - rows[0], x:x + cols[1] - cols[0]]
  right = fixed[y:y + rows[1] - rows[0], x:x + min(cols[1] + 1, shape[1]) - cols[0]]
  diffs = count(np.diff(right.astype(np.int64), axis=1))
  median = None
  if blurred:
    median = count(cv2.medianBlur(fixed.astype(np.float32), 3)[
        y:y + rows[1] - rows[0], x:x + cols[1] - cols[0]])
  return count(core), diffs, median


def pass_clahe(read, shape, rows, cols, hot, norm: preprocess.Normalization) -> Counts:
  """Counts of the CLAHE (0..255) of the repaired plane at [rows) x [cols)."""
  ctx_rows, ctx_cols = norm.context(rows, cols)
  fixed, _ = repaired(read, shape, ctx_rows, ctx_cols, hot)
  out = preprocess.apply_clahe(fixed, (ctx_rows[0], ctx_cols[0]), norm, rows, cols)
  return count(np.rint(out * 255.0))


def clahe_moments(counts: Counts) -> tuple[float, float]:
  """(mean, std) of the float32 CLAHE output (value / 255) that `counts` counts."""
  values = (counts[0].astype(np.float32) / np.float32(255.0)).astype(np.float64)
  total = int(counts[1].sum())
  mean = math.fsum(values * counts[1]) / total
  return mean, math.sqrt(math.fsum((values - mean) ** 2 * counts[1]) / total)


# ----------------------------------------------------------------------------- samples

def sample_windows(shape: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """The windows a plane is measured on when it is not measured whole: the whole plane up
  to WHOLE_PIXELS, else SAMPLES windows of SAMPLE_SIDE on a regular grid."""
  h, w = shape
  if h * w <= WHOLE_PIXELS:
    return [((0, h), (0, w))]
  side_y, side_x = min(h, SAMPLE_SIDE), min(w, SAMPLE_SIDE)
  per_axis = int(math.isqrt(SAMPLES))
  ys = np.linspace(0, h - side_y, per_axis).round().astype(int)
  xs = np.linspace(0, w - side_x, per_axis).round().astype(int)
  return [((int(y), int(y) + side_y), (int(x), int(x) + side_x)) for y in ys for x in xs]


def sampled(windows: list[np.ndarray], method: str, kind: str,
            shape: tuple[int, int]) -> PlaneStats:
  """`PlaneStats` of a plane from its raw pixels in `sample_windows` (stacked as one image:
  the noise is measured along rows, within each window), as preprocess measures a plane in
  memory: exact when the one window is the whole plane."""
  mosaic = np.concatenate(windows, axis=0)
  if np.issubdtype(mosaic.dtype, np.floating):
    gone = ~np.isfinite(mosaic)
    if gone.any():
      mosaic = preprocess.mirror_fill(mosaic, gone) if not gone.all() else np.zeros_like(
          mosaic)
  median = cv2.medianBlur(mosaic.astype(np.float32), 3)
  hot = tuple(float(v) for v in np.percentile(median, preprocess.HOT_PIXEL_PERCENTILES))
  fixed = preprocess.replace_hot_pixels(mosaic, median, hot)

  def clahe_stats(_):
    x = preprocess.clahe(fixed).astype(np.float32)
    return x.mean(dtype=np.float64), x.std(dtype=np.float64)

  norm = preprocess.normalization(preprocess.ArrayStatistics(fixed), method, kind, shape,
                                  clahe_stats)
  return PlaneStats(hot, norm, exact=len(windows) == 1)
