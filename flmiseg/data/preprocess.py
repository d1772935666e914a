"""Intensity normalisation of microscopy images, as the reference does it and as users of
other tools expect.

Methods (`config.data.normalization`):
  'auto'          the reference's choice for `config.data.kind`: 'clahe_zscore' for er/mito,
                  'clahe_unit' for nucleus.
  'clahe_zscore'  CLAHE (clip 2.0, 8x8 tiles) on the full bit depth, scale to [0, 1] by the
                  dtype's maximum, then per-image z-score (reference ER/MITO).
  'clahe_unit'    CLAHE, then scale to [0, 1] by the dtype's maximum (reference NUCLEUS).
  'percentile'    map the 1st..99.8th percentiles to 0..1 (not clipped).
  'zscore'        per-image z-score only.
All statistics are taken over the whole image, once (never per tile). A constant image maps to
zeros rather than dividing by zero. Output: float32 (H, W).
"""

import cv2
import numpy as np

from flmiseg.errors import UserError

METHODS = ('auto', 'clahe_zscore', 'clahe_unit', 'percentile', 'zscore')
_AUTO = {'er': 'clahe_zscore', 'mito': 'clahe_zscore', 'nucleus': 'clahe_unit'}
_EPS = 1e-6


def resolve(method: str, kind: str) -> str:
  """The concrete method for `method` ('auto' picks by dataset kind)."""
  if method not in METHODS:
    raise UserError(f'config.data.normalization={method!r} is not a method; valid: '
                    f'{", ".join(METHODS)}')
  if method == 'auto':
    if kind not in _AUTO:
      raise UserError(f'config.data.kind={kind!r} is not a kind; valid: {", ".join(_AUTO)}')
    return _AUTO[kind]
  return method


def _as_integer_image(image: np.ndarray) -> tuple[np.ndarray, float]:
  """uint8/uint16 image for CLAHE, and the value that maps to 1.0 afterwards."""
  if image.dtype == np.uint8:
    return image, 255.0
  if image.dtype == np.uint16:
    return image, 65535.0
  # Other dtypes (float, int32, ...): stretch min..max onto 16 bits first.
  image = image.astype(np.float64)
  low, high = image.min(), image.max()
  scaled = (image - low) / max(high - low, _EPS) * 65535.0
  return np.round(scaled).astype(np.uint16), 65535.0


def clahe(image: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> tuple[np.ndarray, float]:
  """Contrast-limited adaptive histogram equalisation at the image's bit depth.

  Returns the equalised integer image and its full-scale value (255 or 65535).
  """
  integer, full_scale = _as_integer_image(image)
  op = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
  return op.apply(np.ascontiguousarray(integer)), full_scale


def zscore(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float32)
  mean, std = x.mean(dtype=np.float64), x.std(dtype=np.float64)
  return ((x - mean) / max(std, _EPS)).astype(np.float32)


def percentile_normalize(x: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
  x = x.astype(np.float32)
  lo, hi = np.percentile(x, [low, high])
  return ((x - lo) / max(hi - lo, _EPS)).astype(np.float32)


def normalize(image: np.ndarray, method: str, kind: str = 'er') -> np.ndarray:
  """Normalises a 2-D image with `method` (see module docstring); float32 (H, W)."""
  method = resolve(method, kind)
  if method in ('clahe_zscore', 'clahe_unit'):
    equalised, full_scale = clahe(image)
    unit = equalised.astype(np.float32) / full_scale
    return zscore(unit) if method == 'clahe_zscore' else unit
  if method == 'percentile':
    return percentile_normalize(image)
  return zscore(image)
