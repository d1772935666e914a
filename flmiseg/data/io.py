"""Reading and writing microscopy images and masks (TIFF via tifffile, PNG and others via
OpenCV), with errors that name the file.

`read_image` returns a 2-D array (or a (planes, H, W) stack) in its native dtype (uint8,
uint16, float32, ...); it builds on `read_image_file` (imagefile.py), which keeps the axes,
channels and pixel size. RGB(A) images are converted to one channel (luminance) with a
one-time warning. Masks follow one rule: any nonzero pixel is foreground, so 0/255, 0/1 and
label images all work. `write_tiff` writes OME, ImageJ or plain TIFFs that keep axes and
pixel size.
"""

import os
import pathlib
import shutil
import struct

import numpy as np
import tifffile

from flmiseg.data import imagefile
from flmiseg.core.errors import UserError

TIFF_SUFFIXES = imagefile.TIFF_SUFFIXES
IMAGE_SUFFIXES = imagefile.IMAGE_SUFFIXES

# The axes-aware reader lives in imagefile.py; these names are part of io's interface.
ImageFile = imagefile.ImageFile
read_image_file = imagefile.read_image_file
select_planes = imagefile.select_planes
restore_axes = imagefile.restore_axes
output_stem = imagefile.output_stem
check_axes_flag = imagefile.check_axes_flag

# Only these dtypes open in ImageJ; tifffile refuses others with imagej=True.
_IMAGEJ_DTYPES = frozenset(np.dtype(t) for t in ('uint8', 'uint16', 'float32'))
_OME_DTYPES = frozenset(np.dtype(t) for t in (
    'bool', 'int8', 'uint8', 'int16', 'uint16', 'int32', 'uint32', 'float32', 'float64'))


def read_image(path: str | os.PathLike, allow_stack: bool = False,
               channel: int | None = None) -> np.ndarray:
  """Reads a single-channel image, (H, W) in its native dtype (bool becomes uint8).

  Axes of size 1 other than Y and X are dropped. With allow_stack=True an image with more
  planes (Z, T, ...) is returned as (planes, H, W), its non-YX axes flattened in C order.
  With `channel` (config.data.channel) that channel of a multi-channel image is read (an
  RGB image's channels are red, green, blue); an image with one channel is read whole for
  channel 0.
  Raises UserError naming the file when it is missing, unreadable, empty, has several
  channels (without `channel`) or fewer than `channel` + 1, is a stack without allow_stack,
  or holds NaN/inf values.
  """
  path = pathlib.Path(path)
  return _one_channel(read_image_file(path, rgb_as_channels=channel is not None), path,
                      allow_stack, channel)


def _one_channel(image: ImageFile, path: pathlib.Path, allow_stack: bool,
                 channel: int | None) -> np.ndarray:
  """`read_image`'s result from the ImageFile of `path` (read with rgb_as_channels when
  `channel` is given)."""
  if channel is not None:
    count = image.data.shape[image.axes.index('C')] if 'C' in image.axes else 1
    if channel >= count:
      raise UserError(f'{path}: {count} channel(s); config.data.channel={channel} needs at '
                      f'least {channel + 1}')
    if 'C' in image.axes:
      image = ImageFile(np.take(image.data, channel, axis=image.axes.index('C')),
                        image.axes.replace('C', ''), image.pixel_size)
  keep = [i for i, a in enumerate(image.axes) if a in 'YX' or image.data.shape[i] > 1]
  shape = tuple(image.data.shape[i] for i in keep)
  axes = ''.join(image.axes[i] for i in keep)
  if 'C' in axes:
    what = ('stacks take --channel=N' if allow_stack else
            'choose one for training with --config.data.channel=N')
    raise UserError(f'{path}: {shape[axes.index("C")]} channels ({axes}, shape {shape}); '
                    f'{what}')
  if len(axes) > 2 and not allow_stack:
    raise UserError(f'{path}: expected a 2-D image, got shape {shape} (axes {axes}; a '
                    'stack? use --mode=predict for stacks)')
  squeezed = ImageFile(image.data.reshape(shape), axes, image.pixel_size)
  planes, _, _ = select_planes(squeezed, None, path)
  return planes[0] if len(axes) == 2 else planes


def read_mask(path: str | os.PathLike, ignore_value: int = -1) -> np.ndarray:
  """Reads a mask as (H, W) uint8: 0 background, 1 foreground, 255 ignored.

  Any nonzero pixel is foreground, except, when ignore_value >= 0, pixels equal to
  ignore_value: those are unlabelled (sparse annotations) and read as 255. With the default
  ignore_value=-1 the result is in {0, 1}.
  """
  return binarize_mask(read_mask_values(path), ignore_value)


def read_mask_values(path: str | os.PathLike) -> np.ndarray:
  """A mask file's values, (H, W), as `read_image` reads them (grey and single-colour RGB
  masks keep their values), except a multi-colour RGB mask (an annotation tool's colour per
  object or class): each colour becomes its own label, numbered in the order of its (R, G,
  B) value, black 0 (uint16). Its foreground is then exactly its non-black pixels, and its
  objects stay apart as in a label image."""
  path = pathlib.Path(path)
  image = read_image_file(path, rgb_as_channels=True)
  if image.channel_names != ('red', 'green', 'blue'):  # not RGB: read as any image
    return _one_channel(image, path, False, None)
  if image.data.ndim != 3:  # an RGB stack: read_image refuses it with its one line
    return read_image(path)
  channels = np.moveaxis(image.data, image.axes.index('C'), 0)
  single = imagefile.rgb_single_channel(channels)
  if single is not None:  # grey or single-colour: its values
    return np.ascontiguousarray(single)
  colours, labels = np.unique(channels.reshape(3, -1).T, axis=0, return_inverse=True)
  labels = labels.reshape(channels.shape[1:]) + (0 if not colours[0].any() else 1)
  if labels.max() > np.iinfo(np.uint16).max:
    raise UserError(f'{path}: {len(colours)} colours; a colour-coded mask may have at most '
                    '65535')
  return labels.astype(np.uint16)


def binarize_mask(mask: np.ndarray, ignore_value: int = -1) -> np.ndarray:
  """A mask's values as read_mask returns them: uint8 0, 1 (nonzero) or 255 (ignore_value)."""
  out = (mask != 0).astype(np.uint8)
  if ignore_value >= 0:
    out[mask == ignore_value] = 255  # 255: the usual "ignore index" of segmentation labels
  return out


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


def _default_axes(ndim: int) -> str:
  if not 2 <= ndim <= 5:
    raise ValueError(f'write_tiff: give axes for a {ndim}-D array')
  return {2: 'YX', 3: 'ZYX', 4: 'TZYX', 5: 'TZCYX'}[ndim]


def _tiff_flavour(path: pathlib.Path, array: np.ndarray, axes: str,
                  pixel_size: float | None) -> dict:
  """tifffile.imwrite arguments: OME, ImageJ or plain TIFF (rules in write_tiff)."""
  # OME and ImageJ readers drop axes of size 1, so only a plain TIFF keeps those.
  singleton = any(n == 1 for a, n in zip(axes, array.shape) if a not in 'YX')
  ome_name = path.name.lower().endswith(('.ome.tif', '.ome.tiff'))
  if ome_name and axes.endswith('YX') and not singleton and array.dtype in _OME_DTYPES:
    metadata = {'axes': axes}
    if pixel_size is not None:
      metadata.update(PhysicalSizeX=pixel_size, PhysicalSizeY=pixel_size,
                      PhysicalSizeXUnit='µm', PhysicalSizeYUnit='µm')
    return dict(ome=True, imagej=False, photometric='minisblack', metadata=metadata)
  in_order = axes == ''.join(a for a in imagefile.AXES if a in axes)
  if not ome_name and in_order and not singleton and array.dtype in _IMAGEJ_DTYPES:
    kwargs = dict(ome=False, imagej=True, photometric='minisblack', metadata={'axes': axes})
    if pixel_size is not None:
      kwargs['metadata']['unit'] = 'um'
      kwargs['resolution'] = (1 / pixel_size, 1 / pixel_size)
    return kwargs
  kwargs = dict(ome=False, imagej=False, photometric='minisblack', metadata={'axes': axes})
  if pixel_size is not None:
    kwargs.update(resolution=(1e4 / pixel_size, 1e4 / pixel_size),
                  resolutionunit='CENTIMETER')
  return kwargs


def write_tiff(path: str | os.PathLike, array: np.ndarray, axes: str | None = None,
               pixel_size: float | None = None) -> None:
  """Writes an array as a zlib-compressed TIFF, atomically: a reader never sees half a file.

  The flavour follows the final file name and the data, so that `read_image_file` gives back
  the same axes and pixel size:
    * '*.ome.tif(f)': OME-TIFF with PhysicalSizeX/Y in µm, when the axes end in YX, no
      non-YX axis has size 1 and the dtype is one OME knows (not 64-bit integers);
    * other names: an ImageJ hyperstack (unit 'um', XResolution = 1 / pixel_size) when the
      dtype is uint8, uint16 or float32, the axes are in ImageJ's TZCYX order and no non-YX
      axis has size 1;
    * otherwise a plain TIFF with the axes in tifffile's shaped description and the pixel
      size in the resolution tags (ResolutionUnit CENTIMETER).

  Args:
    path: the output file.
    array: the pixels, one dimension per letter of `axes`.
    axes: letters from 'TZCYX' with Y and X; None means 'YX', 'ZYX', 'TZYX' or 'TZCYX' by
      the number of dimensions.
    pixel_size: micrometres per pixel (X and Y); None when unknown.
  """
  path = pathlib.Path(path)
  array = np.asarray(array)
  axes = _default_axes(array.ndim) if axes is None else axes.upper()
  if (len(axes) != array.ndim or len(set(axes)) != len(axes) or 'Y' not in axes
      or 'X' not in axes or any(a not in imagefile.AXES for a in axes)):
    raise ValueError(f'write_tiff: axes {axes!r} do not fit shape {array.shape}')
  if pixel_size is not None and not (np.isfinite(pixel_size) and pixel_size > 0):
    raise ValueError(f'write_tiff: pixel size {pixel_size} is not positive')
  kwargs = _tiff_flavour(path, array, axes, pixel_size)
  # The temporary name hides the '.ome.tif' ending; the flavour was chosen above from the
  # final name and is passed to tifffile explicitly (ome=, imagej=).
  tmp = path.with_name(f'.{path.name}.tmp')
  try:
    tifffile.imwrite(tmp, array, compression='zlib', **kwargs)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def make_dir(path, label: str, what: str) -> pathlib.Path:
  """`path` created with its parents; a UserError '<label>: cannot create <what> (<why>)'
  when it cannot be."""
  path = pathlib.Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'{label}: cannot create {what} ({e.strerror})') from e
  return path


def make_cache_dir(cache_dir) -> pathlib.Path:
  """`cache_dir` (a run's preprocessing cache) created with its parents; a UserError naming it
  when it cannot be."""
  return make_dir(cache_dir, str(cache_dir), 'the preprocessing cache')
