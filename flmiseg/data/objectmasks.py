"""Datasets with one mask file per object (config.data.source='object_masks').

Layout, as the 2018 Data Science Bowl and several annotation tools export it:

  DIR/<id>/images/<id>.png     the image (one image file per folder; any IMAGE_SUFFIXES)
  DIR/<id>/masks/*.png         one file per object: its nonzero pixels are the object

Each sample's mask files become one label image (0 background, 1..N objects, numbered in the
order of the mask files' names; uint16, uint32 beyond 65535 objects), written once into the
preprocessing cache (named by a hash of the files' paths, sizes and modification times, so a
changed mask is merged again) and then read like any label-image mask.

Overlaps: a pixel claimed by several masks goes to the smallest of them (fewest pixels; on a
tie, the mask whose file name sorts first). The smaller object is the one a larger mask
would hide: a small nucleus drawn over a large one, a bleb on a cell, stays whole; and the
pixel stays foreground, so the binary mask is exactly the union of the object masks (dropping
contested pixels would instead teach the network that nucleus pixels are background). An
object that smaller ones cover entirely has no pixel left and gets no label.

Bad input is a one-line UserError naming the file or folder: a sample without an images/
folder or with other than one image in it, an image without a masks/ folder, an empty masks/
folder, a mask whose shape differs from the image's, and a mask without a nonzero pixel.
Images are read as everywhere else (flmiseg/data/imagefile.py: grey stored as RGB(A), as the
DSB's fluorescence images are, gives that grey); masks as io.read_mask_values reads them.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib

import numpy as np
from skimage import segmentation

from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.core.errors import UserError

# Bump when the merging rule changes: cached label images of an older rule are made again.
MERGE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of an object-mask dataset and its mask files (sorted by name)."""
  folder: pathlib.Path
  image: pathlib.Path
  masks: tuple[pathlib.Path, ...]


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(f for f in folder.iterdir()
                if f.is_file() and f.suffix.lower() in io.IMAGE_SUFFIXES
                and not f.name.startswith('.'))


def read_sample(folder) -> Sample:
  """The Sample of DIR/<id> (see the module docstring); UserError naming what is missing."""
  folder = pathlib.Path(folder)
  image_dir, mask_dir = folder / 'images', folder / 'masks'
  if not image_dir.is_dir():
    raise UserError(f'{folder}: no images/ folder (expected {folder.name}/images/'
                    f'{folder.name}.png and {folder.name}/masks/*.png)')
  images = _image_files(image_dir)
  if len(images) != 1:
    raise UserError(f'{image_dir}: expected one image file, found {len(images)}')
  if not mask_dir.is_dir():
    raise UserError(f'{images[0]}: no masks/ folder beside its images/ folder (one mask file '
                    'per object expected in it)')
  masks = _image_files(mask_dir)
  if not masks:
    raise UserError(f'{mask_dir}: empty mask folder (no mask file for {images[0].name})')
  return Sample(folder, images[0], tuple(masks))


def read_samples(root) -> list[Sample]:
  """The Samples of every <id> folder of `root`, sorted by name (hidden folders skipped)."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise UserError(f'{root}: not a folder (expected <id>/images/ and <id>/masks/ folders '
                    'in it)')
  folders = sorted(f for f in root.iterdir() if f.is_dir() and not f.name.startswith('.'))
  if not folders:
    raise UserError(f'{root}: no sample folders (expected <id>/images/<id>.png and '
                    '<id>/masks/*.png)')
  return [read_sample(f) for f in folders]


def image_shape(path: pathlib.Path) -> tuple[int, int]:
  """(H, W) of an image file, whatever its other axes."""
  image = io.read_image_file(path)
  return (image.data.shape[image.axes.index('Y')], image.data.shape[image.axes.index('X')])


def label_dtype(count: int) -> type:
  """The dtype of a label image of `count` objects: uint16, or uint32 beyond 65535."""
  return np.uint16 if count <= np.iinfo(np.uint16).max else np.uint32


def merge(shape: tuple[int, int], objects: list[np.ndarray]) -> np.ndarray:
  """One label image (H, W) = `shape` from objects given as flat pixel indices (np.flatnonzero
  of each mask, in file order): 0 background, 1..N in file order of the objects that keep a
  pixel; a contested pixel goes to the smallest object (ties: the earliest). `label_dtype`."""
  labels = np.zeros(int(np.prod(shape)), np.int64)
  # Painted largest first, so smaller objects overwrite larger ones; among equal areas the
  # later file first, so the earliest is painted last and wins.
  for i in sorted(range(len(objects)), key=lambda i: (-len(objects[i]), -i)):
    labels[objects[i]] = i + 1
  labels = segmentation.relabel_sequential(labels)[0]  # file order kept, gaps closed
  return labels.reshape(shape).astype(label_dtype(int(labels.max())))


def label_image(sample: Sample) -> np.ndarray:
  """The label image of a Sample (module docstring); UserError naming a bad mask file."""
  shape = image_shape(sample.image)
  objects = []
  for path in sample.masks:
    values = io.read_mask_values(path)
    if values.shape != shape:
      raise UserError(f'{path}: mask shape {values.shape} differs from the image\'s '
                      f'{shape} ({sample.image.name})')
    pixels = np.flatnonzero(values)  # a few hundred indices, not a full-size mask, each
    if not pixels.size:
      raise UserError(f'{path}: the mask has no nonzero pixel (one object per mask file)')
    objects.append(pixels)
  return merge(shape, objects)


def _cache_key(sample: Sample) -> str:
  parts = [str(MERGE_VERSION)]
  for path in (sample.image,) + sample.masks:
    stat = path.stat()
    parts += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
  return hashlib.sha1('\0'.join(parts).encode()).hexdigest()[:20]


def _cached_labels(sample: Sample, cache_dir: pathlib.Path) -> lists.Pair:
  path = cache_dir / f'{_cache_key(sample)}_objects.tif'
  if not path.exists():
    io.write_tiff(path, label_image(sample))  # atomic: a reader never sees half a file
  return lists.Pair(sample.image.resolve(), path, str(sample.folder))


def load_pairs(root, cache_dir) -> list[lists.Pair]:
  """(image, label image) Pairs of the object-mask dataset `root`, the label images merged
  once into `cache_dir` (directly in it, named by hash)."""
  samples = read_samples(root)
  cache_dir = io.make_cache_dir(cache_dir)
  # Decoding thousands of small PNGs: OpenCV releases the GIL, so threads help.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(lambda s: _cached_labels(s, cache_dir), samples))
