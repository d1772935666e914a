"""The outputs as OME-Zarr (NGFF 0.4 on zarr v2, 0.5 on zarr v3): arrays made by zarr,
metadata as the NGFF specification writes it.

A new OME-Zarr `<name>.ome.zarr` (the default):

  /                      an image: the foreground probability (float32 with --save_prob,
                         else uint8, 255 x the probability), a multiscale pyramid
  /labels/mask           label image (image-label metadata): uint8, 1 foreground
  /labels/instances      label image, with instances: uint32 ids (uint64 past 2**32 pixels)

or, as an explicit option, the two label images in the input image's own labels/ group. Each
level (until one chunk holds it) halves Y and X by taking every other pixel (labels keep
their values; the scale doubles, no translation), chunk by chunk, from the level before
(`downsample_chunk`). The metadata are written last (`write_metadata`), so a reader never
finds a half-written image complete. Written by hand (a few dictionaries): ome-zarr-py would
do it, but pulls in fsspec's S3 stack and pins a pydantic that the export extra cannot take
(docs/large_images.md).
"""

import dataclasses
import math

import numpy as np
import zarr

FORMATS = {'0.4': 2, '0.5': 3}  # NGFF version -> zarr format
LABELS = ('mask', 'instances')


@dataclasses.dataclass(frozen=True)
class Axes:
  """The outputs' axes (letters from 'TZYX') with their NGFF units and level-0 scale."""
  letters: str
  units: tuple[str | None, ...]
  scale: tuple[float, ...]

  def ngff(self) -> list[dict]:
    kinds = {'T': 'time', 'Z': 'space', 'Y': 'space', 'X': 'space'}
    out = []
    for letter, unit in zip(self.letters, self.units):
      axis = {'name': letter.lower(), 'type': kinds[letter]}
      if unit:
        axis['unit'] = unit
      out.append(axis)
    return out


def level_shapes(shape: tuple[int, ...], chunk: int) -> list[tuple[int, ...]]:
  """The shapes of a pyramid's levels (the last two axes halved, rounding up) until one
  chunk of `chunk` x `chunk` holds a whole level."""
  shapes = [tuple(shape)]
  while max(shapes[-1][-2:]) > chunk and min(shapes[-1][-2:]) > 1:
    *lead, h, w = shapes[-1]
    shapes.append((*lead, math.ceil(h / 2), math.ceil(w / 2)))
  return shapes


def create_multiscale(group, shape: tuple[int, ...], chunk: int, dtype, axes: str,
                      levels: int | None = None) -> list:
  """The arrays '0', '1', ... of a pyramid of `level_shapes(shape, chunk)` (its first
  `levels`) in `group`, chunked (1, ..., chunk, chunk), 0 where nothing was written; `axes`:
  their letters (zarr v3 arrays carry them as dimension_names, as NGFF 0.5 asks)."""
  arrays = []
  for level, level_shape in enumerate(level_shapes(shape, chunk)[:levels]):
    chunks = (1,) * (len(shape) - 2) + (min(chunk, level_shape[-2]), min(chunk, level_shape[-1]))
    if group.metadata.zarr_format == 2:  # NGFF 0.4 wants '/'-separated chunk keys
      kwargs = {'chunk_key_encoding': {'name': 'v2', 'separator': '/'}}
    else:
      kwargs = {'dimension_names': list(axes.lower())}
    arrays.append(group.create_array(str(level), shape=level_shape, chunks=chunks,
                                     dtype=dtype, fill_value=0, **kwargs))
  return arrays


def _multiscale(axes: Axes, levels: int, name: str, version: str) -> dict:
  datasets = []
  for level in range(levels):
    factor = [1.0] * (len(axes.letters) - 2) + [2.0 ** level] * 2
    scale = [s * f for s, f in zip(axes.scale, factor)]
    datasets.append({'path': str(level),
                     'coordinateTransformations': [{'type': 'scale', 'scale': scale}]})
  multiscale = {'name': name, 'axes': axes.ngff(), 'datasets': datasets, 'type': 'nearest',
                'metadata': {'description': 'every other pixel of the level before'}}
  if version == '0.4':
    multiscale['version'] = '0.4'
  return multiscale


def _attrs(version: str, entries: dict) -> dict:
  """`entries` at a group's top (0.4) or under 'ome' with the version (0.5)."""
  return entries if version == '0.4' else {'ome': {'version': version, **entries}}


def image_attrs(axes: Axes, levels: int, name: str, version: str) -> dict:
  """The attributes of an image group: its multiscales."""
  return _attrs(version, {'multiscales': [_multiscale(axes, levels, name, version)]})


def label_attrs(axes: Axes, levels: int, name: str, version: str) -> dict:
  """The attributes of a label image: its multiscales and image-label metadata pointing
  at the image two groups up."""
  label = {'source': {'image': '../../'}}
  if version == '0.4':
    label['version'] = '0.4'
  if name == 'mask':
    label['colors'] = [{'label-value': 1, 'rgba': [255, 255, 0, 255]}]
  return _attrs(version, {'multiscales': [_multiscale(axes, levels, name, version)],
                          'image-label': label})


def labels_attrs(existing: dict, names: list[str], version: str) -> dict:
  """The attributes of a labels/ group listing `names` after the labels it lists already."""
  current = existing.get('ome', existing) if version != '0.4' else existing
  listed = [n for n in current.get('labels', []) if n not in names] + list(names)
  return _attrs(version, {'labels': listed})


def downsample_chunk(source, target, index: tuple[slice, ...]) -> None:
  """Writes `target[index]` (one chunk of a level) from every other pixel of `source` (the
  level before) along the last two axes."""
  *lead, rows, cols = index
  from_index = (*lead, slice(rows.start * 2, rows.stop * 2, 2),
                slice(cols.start * 2, cols.stop * 2, 2))
  target[index] = np.asarray(source[from_index])


def chunk_indices(array) -> list[tuple[slice, ...]]:
  """Every chunk of `array` as a tuple of slices, in C order."""
  ranges = [range(0, n, c) for n, c in zip(array.shape, array.chunks)]
  grid = np.stack(np.meshgrid(*[np.arange(len(r)) for r in ranges], indexing='ij'), -1)
  out = []
  for cell in grid.reshape(-1, len(ranges)):
    out.append(tuple(slice(r[i], min(r[i] + c, n)) for r, i, c, n in
                     zip(ranges, cell, array.chunks, array.shape)))
  return out


def open_group(path, mode: str, version: str | None = None):
  """A zarr group (`mode` 'r', 'r+', 'w-' or 'a'; `version` picks the zarr format when
  creating)."""
  kwargs = {'zarr_format': FORMATS[version]} if version and mode in ('w-', 'w', 'a') else {}
  return zarr.open_group(str(path), mode=mode, **kwargs)
