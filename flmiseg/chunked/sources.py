"""Lazy inputs: an image on disk, read one region at a time, never whole.

  OME-Zarr   NGFF 0.4 (zarr v2) and 0.5 (zarr v3), and the bioformats2raw layout (the image
             in its series 0): levels, axes and pixel size from the multiscales metadata;
  zarr       a plain zarr array (no NGFF metadata): its axes from --axes;
  TIFF       tiled or pyramidal (OME-)TIFF through tifffile's zarr store: axes and pixel
             size as flmiseg/data/imagefile.py reads them, one level per SubIFD.

`open_source` checks everything a run needs before anything is written (the level exists, a
channel is chosen where there are several, the axes are known) and raises one-line UserErrors
naming the file or the setting. A `Source` pickles as its description and opens its array
again in each worker process (flmiseg/chunked/engine.py).
"""

import dataclasses
import itertools
import math
import pathlib

import numpy as np
import tifffile
import zarr

from flmiseg.core.errors import UserError
from flmiseg.data import imagefile

# NGFF space units, in micrometres.
UNITS_UM = {'angstrom': 1e-4, 'nanometer': 1e-3, 'micrometer': 1.0, 'micron': 1.0,
            'millimeter': 1e3, 'centimeter': 1e4, 'meter': 1e6}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where an image's levels live and what their axes are (picklable)."""
  path: str  # the .zarr folder or the TIFF file
  kind: str  # 'ome-zarr', 'zarr' or 'tiff'
  arrays: tuple[str, ...]  # each level's array path inside the zarr ('' for a lone array)
  axes: str  # one letter per dimension of every level's array, from 'TZCYX' ('-': index 0)
  scales: tuple[tuple[float, ...], ...] = ()  # NGFF: each level's scale, per axis
  units: tuple[str | None, ...] = ()  # NGFF: each axis' unit (None: not given)
  version: str | None = None  # NGFF version ('0.4', '0.5'); None for others


@dataclasses.dataclass
class Source:
  """One level of an image, read by plane and region.

  Attributes:
    layout: where the levels are (`Layout`).
    level: the level read (0: full resolution).
    channel: the channel read when the image has a C axis (0 for one channel).
    name: the stem outputs are named after (X for X.ome.zarr, X.zarr, X.ome.tif).
    pixel_size: micrometres per pixel along X at this level; None when unknown.
  """
  layout: Layout
  level: int
  channel: int | None
  name: str
  pixel_size: float | None
  _array: object = dataclasses.field(default=None, repr=False, compare=False)

  def __getstate__(self):
    return {**self.__dict__, '_array': None}  # zarr and TIFF handles stay in their process

  @property
  def array(self):
    """The level's zarr array, opened on first use in this process."""
    if self._array is None:
      self._array = _open_level(self.layout, self.level)
    return self._array

  @property
  def shape(self) -> tuple[int, int]:
    """(H, W) of a plane at this level."""
    shape = self.array.shape
    return shape[self.layout.axes.index('Y')], shape[self.layout.axes.index('X')]

  @property
  def plane_axes(self) -> str:
    """The axes of the outputs: the image's T and Z (in its order), then Y and X."""
    return ''.join(a for a in self.layout.axes if a in 'TZ') + 'YX'

  @property
  def plane_shape(self) -> tuple[int, ...]:
    """The sizes of `plane_axes` but Y and X."""
    return tuple(self.array.shape[self.layout.axes.index(a)] for a in self.plane_axes[:-2])

  def planes(self) -> list[tuple[int, ...]]:
    """Each plane's index along `plane_axes` but Y and X, in C order."""
    return list(itertools.product(*(range(n) for n in self.plane_shape)))

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.array.dtype)

  @property
  def chunks(self) -> tuple[int, int]:
    """The array's chunk (or TIFF tile) size along (Y, X)."""
    chunks = self.array.chunks
    return chunks[self.layout.axes.index('Y')], chunks[self.layout.axes.index('X')]

  def read(self, plane: tuple[int, ...], rows: tuple[int, int],
           cols: tuple[int, int]) -> np.ndarray:
    """The pixels [rows) x [cols) of one plane (of the chosen channel), native dtype."""
    where = dict(zip(self.plane_axes[:-2], plane))
    index = []
    for axis in self.layout.axes:
      index.append(slice(*rows) if axis == 'Y' else slice(*cols) if axis == 'X' else
                   (self.channel or 0) if axis == 'C' else where.get(axis, 0))
    data = np.asarray(self.array[tuple(index)])
    y, x = self.layout.axes.index('Y'), self.layout.axes.index('X')
    return data.T if x < y else data


def _open_level(layout: Layout, level: int):
  if layout.kind == 'tiff':
    node = zarr.open(tifffile.imread(layout.path, aszarr=True), mode='r')
  else:
    node = zarr.open(layout.path, mode='r')
  path = layout.arrays[level]
  return node[path] if path else node


def output_stem(path: pathlib.Path) -> str:
  """X for X.ome.zarr, X.zarr, X.ome.tif and X.tif."""
  name = path.name.rstrip('/')
  for suffix in ('.ome.zarr', '.zarr', '.ome.tiff', '.ome.tif', '.tiff', '.tif'):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


# ----------------------------------------------------------------------------- NGFF

def _ngff_attrs(attrs: dict) -> tuple[dict | None, str | None]:
  """(the first multiscale's metadata, the NGFF version) of a group's attributes."""
  ome = attrs.get('ome')
  if isinstance(ome, dict) and ome.get('multiscales'):  # 0.5
    return ome['multiscales'][0], str(ome.get('version', '0.5'))
  if attrs.get('multiscales'):  # 0.4 and before
    multiscale = attrs['multiscales'][0]
    return multiscale, str(multiscale.get('version', '0.4'))
  return None, None


def _ngff_axes(multiscale: dict, ndim: int, path) -> tuple[str, tuple]:
  """(letters from 'TZCYX', units) of NGFF axes (0.4+: dicts; 0.3: names; 0.1-0.2: tczyx)."""
  axes = multiscale.get('axes') or list('tczyx'[5 - ndim:])
  letters, units = '', []
  for axis in axes:
    name = (axis.get('name', '') if isinstance(axis, dict) else str(axis)).lower()
    kind = axis.get('type', '') if isinstance(axis, dict) else ''
    letter = {'time': 'T', 'channel': 'C'}.get(kind) or {'t': 'T', 'c': 'C', 'z': 'Z',
                                                         'y': 'Y', 'x': 'X'}.get(name)
    if letter is None or letter in letters:
      raise UserError(f'{path}: cannot interpret the NGFF axis {name!r} of '
                      f'{[a.get("name") if isinstance(a, dict) else a for a in axes]}')
    letters += letter
    units.append(axis.get('unit') if isinstance(axis, dict) else None)
  if len(letters) != ndim or 'Y' not in letters or 'X' not in letters:
    raise UserError(f'{path}: its NGFF axes {letters} do not fit its arrays of {ndim} '
                    'dimensions with Y and X')
  return letters, tuple(units)


def _scale(transforms: list | None, ndim: int) -> np.ndarray:
  scale = np.ones(ndim)
  for t in transforms or []:
    if t.get('type') == 'scale' and 'scale' in t:
      scale = scale * np.asarray(t['scale'], float)
  return scale


def _ngff_layout(path: pathlib.Path, group, multiscale: dict, version: str,
                 axes: str | None) -> Layout:
  datasets = multiscale.get('datasets') or []
  arrays = tuple(str(d['path']) for d in datasets if 'path' in d)
  if not arrays:
    raise UserError(f'{path}: its NGFF multiscales metadata lists no datasets')
  ndim = len(group[arrays[0]].shape)
  letters, units = _ngff_axes(multiscale, ndim, path)
  if axes and imagefile.check_axes_flag(axes) != letters:
    raise UserError(f'--axes={axes}: {path} is an OME-Zarr whose axes are {letters}; leave '
                    '--axes out (it is for plain zarr arrays)')
  common = _scale(multiscale.get('coordinateTransformations'), ndim)
  scales = tuple(tuple(_scale(d.get('coordinateTransformations'), ndim) * common)
                 for d in datasets)
  return Layout(str(path), 'ome-zarr', arrays, letters, scales, units, version)


def _zarr_layout(path: pathlib.Path, axes: str | None) -> Layout:
  try:
    node = zarr.open(str(path), mode='r')
  except Exception as e:  # pylint: disable=broad-except  # zarr raises many types
    raise UserError(f'{path}: cannot open as zarr ({type(e).__name__}: '
                    f'{" ".join(str(e).split())})') from e
  if isinstance(node, zarr.Array):
    if not axes:
      raise UserError(f'{path}: a zarr array without NGFF (OME-Zarr) metadata: give its axes '
                      f'with --axes (one letter per dimension of {node.shape}, e.g. '
                      f'{"YX" if node.ndim == 2 else "CYX" if node.ndim == 3 else "TCZYX"})')
    letters = imagefile.check_axes_flag(axes, node.shape, path).replace('S', 'C')
    return Layout(str(path), 'zarr', ('',), letters)
  attrs = dict(node.attrs)
  if 'bioformats2raw.layout' in attrs and '0' in node:  # the image is series 0
    return _zarr_layout(path / '0', axes)
  multiscale, version = _ngff_attrs(attrs)
  if multiscale is None:
    raise UserError(f'{path}: a zarr group without NGFF (OME-Zarr) multiscales metadata; '
                    'give an OME-Zarr image, or the path of a zarr array inside it with '
                    '--axes')
  return _ngff_layout(path, node, multiscale, version, axes)


def _ngff_pixel_size(layout: Layout, level: int) -> float | None:
  x = layout.axes.index('X')
  factor = UNITS_UM.get((layout.units[x] or '').lower())
  if factor is None or not layout.scales:
    return None  # no unit: the scale may be anything (and is often 1)
  size = layout.scales[level][x] * factor
  return size if math.isfinite(size) and size > 0 else None


# ----------------------------------------------------------------------------- TIFF

def _tiff_axes(series_axes: str, shape: tuple[int, ...], axes: str | None,
               path: pathlib.Path) -> str:
  """Letters from 'TZCYX' (or '-' for a dimension read at index 0) for tifffile's axes of a
  series, by imagefile's rules: RGB samples are channels here, one I or Q axis is Z."""
  if axes:
    return imagefile.check_axes_flag(axes, shape, path).replace('S', 'C')
  letters = series_axes.upper()
  if 'S' in letters and 'C' not in letters:
    letters = letters.replace('S', 'C')
  generic = [a for a in letters if a in 'IQ']
  if len(generic) == 1 and 'Z' not in letters:
    letters = letters.replace(generic[0], 'Z')
  out = ''
  for letter, size in zip(letters, shape):
    if letter in 'TZCYX' and letter not in out:
      out += letter
    elif size == 1:
      out += '-'
    else:
      raise UserError(f'{path}: cannot interpret axis {letter!r} of {series_axes} (shape '
                      f'{shape}); give one letter per dimension with --axes= (from T, Z, C, '
                      'Y, X)')
  if 'Y' not in out or 'X' not in out:
    raise UserError(f'{path}: no Y and X axes in {series_axes}; give them with --axes=')
  return out


def _tiff_layout(path: pathlib.Path, axes: str | None) -> tuple[Layout, list, float | None]:
  """(layout, each level's shape, the full resolution's pixel size)."""
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      shapes = [tuple(level.shape) for level in series.levels]
      letters = _tiff_axes(series.axes, shapes[0], axes, path)
      pixel_size, _ = imagefile._tiff_metadata(tif)  # pylint: disable=protected-access
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # tifffile raises many types
    raise UserError(f'{path}: cannot read image ({type(e).__name__}: '
                    f'{" ".join(str(e).split())})') from e
  arrays = tuple(str(i) for i in range(len(shapes))) if len(shapes) > 1 else ('',)
  return Layout(str(path), 'tiff', arrays, letters), shapes, pixel_size


# ----------------------------------------------------------------------------- opening

def _check_channel(layout: Layout, shape: tuple[int, ...], channel: int | None, path) -> None:
  if 'C' in layout.axes:
    count = shape[layout.axes.index('C')]
    if channel is None and count > 1:
      raise UserError(f'{path}: {count} channels; choose one with --channel=N')
    if channel is not None and not 0 <= channel < count:
      raise UserError(f'--channel={channel}: {path} has {count} channel(s); use --channel=0 '
                      f'to --channel={count - 1}')
  elif channel not in (None, 0):
    raise UserError(f'--channel={channel}: {path} has no channel axis (axes '
                    f'{layout.axes.replace("-", "")}); only --channel=0 fits')


def open_source(spec: str, axes: str | None = None, level: int = 0,
                channel: int | None = None) -> Source:
  """The `Source` of --input=`spec` (an OME-Zarr, a zarr array, a TIFF) at `level`.

  Raises UserError (one line, naming the file or the setting) for a missing input, a zarr
  without NGFF metadata and no `axes`, axes that do not fit, a level that does not exist,
  a channel that is missing or out of range, an image without pixels.
  """
  path = pathlib.Path(spec)
  if not path.exists():
    raise UserError(f'--input={spec}: no such file or folder')
  if path.is_dir():
    layout = _zarr_layout(path, axes)
    root = zarr.open(layout.path, mode='r')
    shapes = [tuple((root[a] if a else root).shape) for a in layout.arrays]
    base_size = None
  elif path.suffix.lower() in imagefile.TIFF_SUFFIXES:
    layout, shapes, base_size = _tiff_layout(path, axes)
  else:
    raise UserError(f'--input={spec}: not an OME-Zarr, zarr or TIFF image')
  if not 0 <= level < len(shapes):
    raise UserError(f'--level={level}: {path} has level(s) 0 to {len(shapes) - 1}')
  shape = shapes[level]
  if len(shape) != len(layout.axes) or 0 in shape:
    raise UserError(f'{path}: level {level} has shape {shape}, which does not fit its axes '
                    f'{layout.axes.replace("-", "")}')
  _check_channel(layout, shape, channel, path)
  if layout.kind == 'ome-zarr':
    pixel_size = _ngff_pixel_size(layout, level)
  else:  # each level of a TIFF pyramid shrinks the full resolution's X by its own factor
    x = layout.axes.index('X')
    pixel_size = base_size * shapes[0][x] / shape[x] if base_size else None
  return Source(layout, level, channel, output_stem(path), pixel_size)
