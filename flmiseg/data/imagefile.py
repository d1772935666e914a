"""Microscopy image files with their axes, channels and pixel size.

`read_image_file` reads a TIFF (plain, ImageJ hyperstack or OME-TIFF; tifffile's first series)
or a PNG/JPEG/BMP (OpenCV) into an `ImageFile` whose axes are letters from 'TZCYX', one per
dimension. `select_planes` picks one channel and flattens everything but Y and X into planes
of shape (N, Y, X) for a 2-D model; `restore_axes` puts per-plane outputs back into the
image's layout.

Axis rules (tifffile's letters -> ours):
  * 'S' (samples): 3 or 4 samples are RGB(A) (alpha ignored) and become one plane: grey
    stored as RGB (equal channels) gives that grey, and a single-colour image (the channels
    with signal are equal, the others zero: a blue DAPI, a green GFP, a magenta LUT) gives
    its colour channel, both exactly; any other RGB image (a colour composite, a stain)
    gives its luminance (0.299 R + 0.587 G + 0.114 B) with a one-time warning. When the
    caller picks a channel (--channel=N, config.data.channel), the samples are channels 'C'
    instead (0 red, 1 green, 2 blue). 1 sample is dropped; any other count (2, 5+) is
    treated as channels 'C' when the file has no 'C' axis.
  * 'I' and 'Q' (image sequence / generic planes, e.g. a plain 3-D TIFF without metadata):
    exactly one such axis in a file without 'Z' becomes 'Z', since stacks are predicted
    plane by plane anyway.
  * Any other letter, or an 'I'/'Q' that the rule above cannot place, is dropped when its
    size is 1 and otherwise is an error asking for --axes=.
The user's --axes= flag replaces the file's axes entirely (letters from 'TZCYX', plus 'S'
for RGB samples) and must give one letter per dimension of tifffile's (squeezed) array.

Pixel size (micrometres per pixel along X), first rule that applies:
  1. OME-XML: Pixels@PhysicalSizeX in PhysicalSizeXUnit (default µm).
  2. ImageJ: XResolution (pixels per unit) with the 'unit' of the ImageJ description.
  3. Plain TIFF: XResolution with ResolutionUnit CENTIMETER or INCH (INCH is also the TIFF
     default when the unit tag is absent). Unknown are: ResolutionUnit NONE, no resolution,
     1 pixel per unit (a writer's placeholder) and 72, 96, 150, 300 or 600 dpi (screen and
     print defaults, never a microscope's calibration).
Anything unparseable, non-finite or non-positive gives None, never an exception.
"""

import dataclasses
import math
import os
import pathlib
import xml.etree.ElementTree as ElementTree

from absl import logging
import cv2
import numpy as np
import tifffile

from flmiseg.core.errors import UserError

TIFF_SUFFIXES = ('.tif', '.tiff')
IMAGE_SUFFIXES = TIFF_SUFFIXES + ('.png', '.jpg', '.jpeg', '.bmp')
AXES = 'TZCYX'

# Micrometres per unit; keys are lowercase after _unit_key.
_UM_PER_UNIT = {
    'm': 1e6, 'meter': 1e6, 'metre': 1e6, 'cm': 1e4, 'centimeter': 1e4, 'mm': 1e3,
    'millimeter': 1e3, 'µm': 1.0, 'um': 1.0, 'micron': 1.0, 'microns': 1.0,
    'micrometer': 1.0, 'micrometre': 1.0, 'nm': 1e-3, 'nanometer': 1e-3, 'nanometre': 1e-3,
    'å': 1e-4, 'angstrom': 1e-4, 'pm': 1e-6, 'inch': 25400.0, 'in': 25400.0,
}
_DEFAULT_DPI = (72, 96, 150, 300, 600)

_warned_rgb = False


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class ImageFile:
  """An image with named axes.

  Attributes:
    data: the pixels in their native dtype (bool becomes uint8), one dimension per letter
      of `axes`.
    axes: uppercase letters from 'TZCYX', no repeats, always containing Y and X (not
      necessarily last when the user's --axes= put them elsewhere).
    pixel_size: micrometres per pixel along X; None when unknown.
    channel_names: one name per entry of the C axis (OME's; red, green, blue for RGB
      samples read as channels); () when absent.
    ome: whether the file was an OME-TIFF.
  """
  data: np.ndarray
  axes: str
  pixel_size: float | None = None
  channel_names: tuple[str, ...] = ()
  ome: bool = False


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


def rgb_single_channel(channels: np.ndarray) -> np.ndarray | None:
  """The one channel that RGB `channels` (3, ...) hold, or None: grey stored as RGB (all
  equal) and single-colour images (the channels with signal equal, the others zero) hold
  one; colour composites and stains do not."""
  lit = [c for c in channels if c.any()]  # the channels that carry signal
  if not lit:
    return channels[0]
  return lit[0] if all(np.array_equal(c, lit[0]) for c in lit[1:]) else None


def _rgb_to_one_channel(array: np.ndarray, axis: int, path: pathlib.Path) -> np.ndarray:
  """RGB(A) samples along `axis` (3 or 4 long) -> one plane (module doc); the axis is removed.

  Grey stored as RGB and single-colour images give their one channel unchanged; other RGB
  images give their luminance, with a one-time warning.
  """
  global _warned_rgb
  single = rgb_single_channel(np.moveaxis(array, axis, 0)[:3])
  if single is not None:
    return np.ascontiguousarray(single)
  if not _warned_rgb:
    logging.warning('%s: RGB image converted to one channel (luminance); later RGB images '
                    'are converted silently. To use one colour instead: --channel=N (predict) '
                    'or --config.data.channel=N (training), 0 red, 1 green, 2 blue.', path)
    _warned_rgb = True
  rgb = np.moveaxis(array, axis, -1)[..., :3].astype(np.float32)
  gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
  if np.issubdtype(array.dtype, np.integer):
    gray = np.round(gray).astype(array.dtype)
  return gray


def output_stem(path: pathlib.Path) -> tuple[str, bool]:
  """'x.ome.tif' -> ('x', True), 'x.tif' -> ('x', False), 'x.png' -> ('x', False).

  The flag says whether the name marks an OME-TIFF (a '.ome' before a TIFF suffix,
  any case); only then is '.ome' removed from the stem.
  """
  path = pathlib.Path(path)
  stem = path.stem
  ome = path.suffix.lower() in TIFF_SUFFIXES and stem.lower().endswith('.ome')
  return (stem[:-len('.ome')] if ome else stem), ome


def check_axes_flag(axes: str, shape: tuple[int, ...] | None = None,
                    path: os.PathLike | str | None = None) -> str:
  """Validates the user's --axes= value; returns it in uppercase.

  Args:
    axes: one letter per dimension from 'TZCYX' (or 'S' for RGB samples), any case.
    shape: the file's array shape; when given, len(axes) must equal len(shape).
    path: the file, for the message.
  Raises:
    UserError: one line naming --axes= (and the file and its shape when given).
  """
  upper = axes.upper()
  reason = None
  if not upper:
    reason = 'empty'
  elif any(a not in AXES + 'S' for a in upper):
    reason = f'unknown letter {next(a for a in upper if a not in AXES + "S")!r}'
  elif len(set(upper)) != len(upper):
    reason = f'{next(a for a in upper if upper.count(a) > 1)} repeated'
  elif 'Y' not in upper or 'X' not in upper:
    reason = 'needs both Y and X'
  if shape is not None and reason is None and len(upper) != len(shape):
    reason = ''
  if reason is None:
    return upper
  where = (f'{path} has {len(shape)} dimensions {tuple(shape)}; ' if shape is not None
           else '')
  reason = f'{reason}; ' if reason else ''
  raise UserError(f'--axes={axes}: {reason}{where}give one letter per dimension from '
                  'T, Z, C, Y, X')


def _map_axes(data: np.ndarray, axes: str, path: pathlib.Path,
              rgb_as_channels: bool = False) -> tuple[np.ndarray, str]:
  """Turns tifffile's (or the user's) axis letters into letters from 'TZCYX' (module doc);
  with `rgb_as_channels` RGB(A) samples become channels 'C' (red, green, blue; alpha
  dropped) when the file has no 'C' axis."""
  if 'S' in axes:
    i, samples = axes.index('S'), data.shape[axes.index('S')]
    if samples in (3, 4) and rgb_as_channels and 'C' not in axes:
      data, axes = np.take(data, [0, 1, 2], axis=i), axes.replace('S', 'C')
    elif samples in (3, 4):
      data, axes = _rgb_to_one_channel(data, i, path), axes[:i] + axes[i + 1:]
    elif samples == 1:
      data, axes = np.squeeze(data, i), axes[:i] + axes[i + 1:]
    elif 'C' not in axes:
      axes = axes.replace('S', 'C')
  generic = [a for a in axes if a in 'IQ']
  if len(generic) == 1 and 'Z' not in axes:
    axes = axes.replace(generic[0], 'Z')
  keep = [i for i, a in enumerate(axes) if a in AXES or data.shape[i] != 1]
  data = data.reshape([data.shape[i] for i in keep])
  axes = ''.join(axes[i] for i in keep)
  unknown = [a for a in axes if a not in AXES]
  if unknown or len(set(axes)) != len(axes) or 'Y' not in axes or 'X' not in axes:
    what = f'axis {unknown[0]!r}' if unknown else 'the axes'
    raise UserError(f'{path}: cannot interpret {what} of {axes} (shape {data.shape}); '
                    'give one letter per dimension with --axes= (from T, Z, C, Y, X)')
  return data, axes


def _unit_key(unit: str) -> str:
  # ImageJ may store the micro sign escaped; OME may use the Greek mu or the Angstrom sign.
  unit = unit.strip().replace('\\u00B5', 'µ').replace('\\u00b5', 'µ')
  return unit.replace('\u03bc', 'µ').replace('\u212b', 'Å').lower()


def _positive(value: float) -> float | None:
  return float(value) if math.isfinite(value) and value > 0 else None


def _ome_metadata(xml: str) -> tuple[float | None, tuple[str, ...]]:
  """(pixel size in µm, channel names) of the first Image's Pixels in OME-XML."""
  pixels = next((e for e in ElementTree.fromstring(xml).iter()
                 if e.tag.rsplit('}', 1)[-1] == 'Pixels'), None)
  if pixels is None:
    return None, ()
  names = tuple(c.get('Name', '') for c in pixels
                if c.tag.rsplit('}', 1)[-1] == 'Channel')
  names = names if any(names) else ()
  size = None
  if pixels.get('PhysicalSizeX') is not None:
    scale = _UM_PER_UNIT.get(_unit_key(pixels.get('PhysicalSizeXUnit', 'µm')))
    if scale is not None:
      size = _positive(float(pixels.get('PhysicalSizeX')) * scale)
  return size, names


def _resolution(page) -> float | None:
  """XResolution of a TIFF page in pixels per (resolution) unit, None when absent."""
  tag = page.tags.get('XResolution')
  if tag is None:
    return None
  value = tag.value
  value = value[0] / value[1] if isinstance(value, tuple) else float(value)
  return _positive(value)


def _tag_pixel_size(page) -> float | None:
  """Pixel size from plain TIFF resolution tags (rule 3 of the module doc)."""
  per_unit = _resolution(page)
  unit_tag = page.tags.get('ResolutionUnit')
  unit = int(unit_tag.value) if unit_tag is not None else 2  # the TIFF default is INCH
  if per_unit is None or per_unit == 1 or unit not in (2, 3):
    return None
  dpi = per_unit * (2.54 if unit == 3 else 1.0)
  if any(abs(dpi - d) <= 0.005 * d for d in _DEFAULT_DPI):
    return None
  return _positive((25400.0 if unit == 2 else 1e4) / per_unit)


def _tiff_metadata(tif: tifffile.TiffFile) -> tuple[float | None, tuple[str, ...]]:
  """(pixel size in µm or None, OME channel names or ()); never raises."""
  names = ()
  try:
    if tif.is_ome and tif.ome_metadata:
      size, names = _ome_metadata(tif.ome_metadata)
      if size is not None:
        return size, names
    page = tif.pages.first
    unit = (tif.imagej_metadata or {}).get('unit') if tif.is_imagej else None
    scale = _UM_PER_UNIT.get(_unit_key(unit)) if isinstance(unit, str) else None
    if scale is not None:
      per_unit = _resolution(page)
      return (_positive(scale / per_unit) if per_unit else None), names
    return _tag_pixel_size(page), names
  except Exception:  # pylint: disable=broad-except  # metadata is optional; pixels matter.
    return None, names


def _read_tiff(path: pathlib.Path) -> tuple[np.ndarray, str, float | None, tuple, bool]:
  """(data, tifffile axes, pixel size, channel names, is OME) of the first series."""
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      data, axes = series.asarray(), series.axes
      pixel_size, names = _tiff_metadata(tif)
      ome = bool(tif.is_ome)
  except Exception as e:  # tifffile raises many types for corrupt files.
    raise UserError(f'{path}: cannot read image ({type(e).__name__}: {_one_line(e)})') from e
  return np.asarray(data), axes.upper(), pixel_size, names, ome


def _read_opencv(path: pathlib.Path) -> tuple[np.ndarray, str]:
  """(data, axes) of a PNG/JPEG/BMP: 'YX', or 'YXS' with the samples in RGB order."""
  try:
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path}: cannot read image ({type(e).__name__}: {_one_line(e)})') from e
  if array is None:
    raise UserError(f'{path}: cannot read image (corrupt, truncated or not an image)')
  if array.ndim == 3 and array.shape[-1] >= 3:
    # OpenCV gives BGR(A); make it RGB so the luminance weights apply (alpha dropped).
    array = array[..., ::-1][..., -3:]
  return np.ascontiguousarray(array), 'YXS' if array.ndim == 3 else 'YX'


def read_image_file(path: str | os.PathLike, axes: str | None = None,
                    rgb_as_channels: bool = False, missing_ok: bool = False) -> ImageFile:
  """Reads an image with its axes, pixel size and channel names (rules in the module doc).

  Args:
    path: a TIFF (tifffile's first series) or a PNG/JPEG/BMP file.
    axes: the user's --axes= value, replacing the file's axes; None keeps the file's.
    rgb_as_channels: RGB(A) samples become channels named red, green and blue (when the
      caller will pick one), not one plane.
    missing_ok: keep NaN/inf pixels (prediction reads them as no data), else refuse them.
  Returns:
    An ImageFile; data keeps its native dtype except bool, which becomes uint8.
  Raises:
    UserError: one line naming the file when it is missing, empty, unreadable, of zero
      size, holds NaN/inf (unless missing_ok), or has axes that cannot be interpreted (or
      --axes= mismatches).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f'{path}: file not found')
  if path.stat().st_size == 0:
    raise UserError(f'{path}: file is empty (0 bytes)')
  pixel_size, names, ome = None, (), False
  if path.suffix.lower() in TIFF_SUFFIXES:
    data, file_axes, pixel_size, names, ome = _read_tiff(path)
  else:
    data, file_axes = _read_opencv(path)
  if data.size == 0:
    raise UserError(f'{path}: image has zero size {data.shape}')
  if axes is not None:
    file_axes = check_axes_flag(axes, data.shape, path)
  elif len(file_axes) != data.ndim:  # tifffile never does this; guard the reshape below.
    raise UserError(f'{path}: cannot interpret the axes {file_axes} of shape {data.shape}; '
                    'give one letter per dimension with --axes= (from T, Z, C, Y, X)')
  rgb = 'S' in file_axes and 'C' not in file_axes and rgb_as_channels
  data, file_axes = _map_axes(data, file_axes, path, rgb_as_channels)
  if not missing_ok and np.issubdtype(data.dtype, np.floating) and not np.all(
      np.isfinite(data)):
    raise UserError(f'{path}: image contains NaN or inf values')
  if data.dtype == np.bool_:
    data = data.astype(np.uint8)
  channels = data.shape[file_axes.index('C')] if 'C' in file_axes else 0
  if rgb and channels == 3:
    names = ('red', 'green', 'blue')
  names = tuple(names) if len(names) == channels else ()
  return ImageFile(data, file_axes, pixel_size, names, ome)


def from_array(data: np.ndarray, axes: str, name: str = 'image',
               pixel_size: float | None = None, missing_ok: bool = False) -> ImageFile:
  """An image held in memory (a napari layer, a notebook's array) as `read_image_file` reads
  a file: `axes` one letter per dimension from 'TZCYX', or 'S' for RGB(A) samples (made one
  luminance plane); `name` stands for the file in messages. Raises UserError as
  read_image_file does for bad axes, zero size or NaN/inf values (unless missing_ok)."""
  data = np.asarray(data)
  if data.size == 0:
    raise UserError(f'{name}: image has zero size {data.shape}')
  data, axes = _map_axes(data, check_axes_flag(axes, data.shape, name), pathlib.Path(name))
  if not missing_ok and np.issubdtype(data.dtype, np.floating) and not np.all(
      np.isfinite(data)):
    raise UserError(f'{name}: image contains NaN or inf values')
  return ImageFile(data.astype(np.uint8) if data.dtype == np.bool_ else data, axes,
                   pixel_size)


def _channel_list(image: ImageFile, count: int) -> str:
  if image.channel_names:
    return ', '.join(f'{i}: {n}' for i, n in enumerate(image.channel_names))
  return ', '.join(map(str, range(count))) if count <= 8 else f'0 to {count - 1}'


def select_planes(image: ImageFile, channel: int | None,
                  path: str | os.PathLike) -> tuple[np.ndarray, str, tuple[int, ...]]:
  """Picks one channel and flattens the other non-YX axes into planes.

  Args:
    image: the image (axes from 'TZCYX').
    channel: the --channel= index into the C axis; None is fine without a C axis or with
      a C axis of size 1, and 0 is fine without a C axis.
    path: the file, for messages.
  Returns:
    (planes, out_axes, out_shape): planes of shape (N, Y, X) in the native dtype, N the
    product of the non-C, non-YX axes in C order; out_axes and out_shape are the image's
    axes and shape without C (same order), for `restore_axes`.
  Raises:
    UserError: one line naming the file and --channel= for a missing or invalid channel.
  """
  data, axes = image.data, image.axes
  if 'C' in axes:
    c_axis = axes.index('C')
    count = data.shape[c_axis]
    if channel is None and count > 1:
      raise UserError(f'{path}: {count} channels ({_channel_list(image, count)}); choose '
                      'one with --channel=N')
    if channel is not None and not 0 <= channel < count:
      raise UserError(f'--channel={channel}: {path} has {count} channel(s); use '
                      f'--channel=0 to --channel={count - 1}')
    data, axes = np.take(data, channel or 0, axis=c_axis), axes.replace('C', '')
  elif channel not in (None, 0):
    raise UserError(f'--channel={channel}: {path} has no channel axis (axes {axes}, shape '
                    f'{data.shape}); only --channel=0 fits')
  order = [i for i, a in enumerate(axes) if a not in 'YX'] + [axes.index('Y'),
                                                              axes.index('X')]
  planes = np.transpose(data, order).reshape(-1, data.shape[order[-2]], data.shape[order[-1]])
  return planes, axes, tuple(data.shape)


def restore_axes(planes_out: np.ndarray, out_axes: str,
                 out_shape: tuple[int, ...]) -> np.ndarray:
  """The inverse of `select_planes`' flattening: (N, Y, X) -> out_shape in out_axes order.

  Args:
    planes_out: per-plane outputs of shape (N, Y, X), any dtype, N, Y, X as select_planes
      returned them.
    out_axes, out_shape: as returned by select_planes.
  Returns:
    An array of shape out_shape whose axes are out_axes.
  """
  order = [i for i, a in enumerate(out_axes) if a not in 'YX'] + [out_axes.index('Y'),
                                                                  out_axes.index('X')]
  moved_shape = tuple(out_shape[i] for i in order)
  if planes_out.shape != (math.prod(moved_shape[:-2]),) + moved_shape[-2:]:
    raise ValueError(f'planes of shape {planes_out.shape} do not fit {out_axes} '
                     f'{tuple(out_shape)}')
  return np.transpose(planes_out.reshape(moved_shape), np.argsort(order))
