"""Reading and writing microscopy images and masks (TIFF via tifffile, PNG and others via
OpenCV), with errors that name the file.

Images are returned as 2-D arrays in their native dtype (uint8, uint16, float32, ...). RGB(A)
images are converted to one channel (luminance) with a one-time warning. Masks follow one rule:
any nonzero pixel is foreground, so 0/255, 0/1 and label images all work.
"""

import os
import pathlib
import shutil
import struct

from absl import logging
import cv2
import numpy as np
import tifffile

from flmiseg.errors import UserError

TIFF_SUFFIXES = ('.tif', '.tiff')
IMAGE_SUFFIXES = TIFF_SUFFIXES + ('.png', '.jpg', '.jpeg', '.bmp')

_warned_rgb = False


def _read_raw(path: pathlib.Path) -> np.ndarray:
  """Reads any supported file into an array (2-D, 3-D stack or H x W x C)."""
  if not path.is_file():
    raise UserError(f'{path}: file not found')
  if path.stat().st_size == 0:
    raise UserError(f'{path}: file is empty (0 bytes)')
  suffix = path.suffix.lower()
  try:
    if suffix in TIFF_SUFFIXES:
      array = tifffile.imread(path)
    else:
      array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
      if array is not None and array.ndim == 3:
        # OpenCV gives BGR(A); make it RGB(A) so the luminance weights below apply.
        array = array[..., ::-1][..., -3:] if array.shape[-1] >= 3 else array
  except Exception as e:  # tifffile raises many types for corrupt files.
    raise UserError(f'{path}: cannot read image ({type(e).__name__}: {e})') from e
  if array is None or (suffix in TIFF_SUFFIXES and np.size(array) == 0):
    raise UserError(f'{path}: cannot read image (corrupt, truncated or not an image)')
  return np.asarray(array)


def _to_single_channel(array: np.ndarray, path: pathlib.Path) -> np.ndarray:
  global _warned_rgb
  if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
    if not _warned_rgb:
      logging.warning('%s: RGB image converted to one channel (luminance); later RGB '
                      'images are converted silently.', path)
      _warned_rgb = True
    rgb = array[..., :3].astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    if np.issubdtype(array.dtype, np.integer):
      gray = np.round(gray).astype(array.dtype)
    return gray
  if array.ndim == 3 and array.shape[-1] == 1:
    return array[..., 0]
  return array


def read_image(path: str | os.PathLike, allow_stack: bool = False) -> np.ndarray:
  """Reads a single-channel image, (H, W) in its native dtype.

  With allow_stack=True a 3-D TIFF stack (planes, H, W) is returned as is.
  Raises UserError naming the file when it is missing, unreadable, empty, of the wrong
  dimensionality, or holds NaN/inf values.
  """
  path = pathlib.Path(path)
  array = _to_single_channel(_read_raw(path), path)
  if array.size == 0 or 0 in array.shape:
    raise UserError(f'{path}: image has zero size {array.shape}')
  if array.ndim == 3 and not allow_stack:
    raise UserError(f'{path}: expected a 2-D image, got shape {array.shape} (a stack? '
                    'use --mode=predict for stacks)')
  if array.ndim not in (2, 3):
    raise UserError(f'{path}: expected a 2-D image, got shape {array.shape}')
  if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
    raise UserError(f'{path}: image contains NaN or inf values')
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  return array


def read_mask(path: str | os.PathLike) -> np.ndarray:
  """Reads a mask as (H, W) uint8 in {0, 1}: any nonzero pixel is foreground."""
  mask = read_image(path)
  return (mask != 0).astype(np.uint8)


def pixel_count(path: str | os.PathLike) -> int:
  """Pixels (times channels or planes) of an image, from its header where cheap.

  TIFF: the first series' shape; PNG: the IHDR chunk; other formats and unreadable files: an
  upper bound from the file size (one byte per pixel, uncompressed). For disk estimates only;
  `read_image` still checks the file.
  """
  path = pathlib.Path(path)
  try:
    if path.suffix.lower() in TIFF_SUFFIXES:
      with tifffile.TiffFile(path) as tif:
        return int(np.prod(tif.series[0].shape))
    with open(path, 'rb') as f:
      head = f.read(24)
    if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
      width, height = struct.unpack('>II', head[16:24])
      return width * height
  except Exception:  # pylint: disable=broad-except  # a bad file is reported by read_image.
    pass
  return path.stat().st_size if path.is_file() else 0


def _human(num_bytes: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if num_bytes < 1024 or unit == 'GiB':
      return f'{num_bytes:.0f} {unit}' if unit == 'B' else f'{num_bytes:.1f} {unit}'
    num_bytes /= 1024
  return ''


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
  """Raises UserError naming `folder` when its filesystem has fewer than `needed` bytes free."""
  folder = pathlib.Path(folder).absolute()
  existing = folder
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  free = shutil.disk_usage(existing).free
  if needed > free:
    raise UserError(f'{folder}: not enough disk space for {what}: about {_human(needed)} '
                    f'needed, {_human(free)} free; free some space or use another --workdir')


def write_tiff(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes an array as a (compressed) TIFF, atomically: a reader never sees half a file."""
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.tmp')
  tifffile.imwrite(tmp, array, compression='zlib')
  os.replace(tmp, path)
