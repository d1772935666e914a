"""Prepared datasets: images read, checked and normalised once, cached as .npy files.

`prepare(pairs, ...)` validates every pair (readable, same shape, masks binarised), normalises
each image once (preprocessing is deterministic) and caches image/mask arrays in `cache_dir`,
keyed by file path, size, modification time and method, so later runs and epochs skip the
work. The result is a `PreparedSource`, a grain random-access source that reads one cached
pair per index: it pickles cheaply (a list of paths) for grain worker processes.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib

import numpy as np

from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import preprocess
from flmiseg.errors import UserError

CACHE_VERSION = 2  # 2: bit-depth invariant CLAHE methods


@dataclasses.dataclass(frozen=True)
class PreparedSource:
  """A grain RandomAccessDataSource over cached (image, mask) arrays.

  Element i is {'image': float32 (H, W), 'mask': uint8 (H, W) in {0, 1}, 'index': int}.
  """
  files: tuple[tuple[str, str], ...]
  shapes: tuple[tuple[int, int], ...]
  names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    image_file, mask_file = self.files[index]
    return {'image': np.load(image_file), 'mask': np.load(mask_file), 'index': index}

  def subset(self, indices) -> 'PreparedSource':
    return PreparedSource(tuple(self.files[i] for i in indices),
                          tuple(self.shapes[i] for i in indices),
                          tuple(self.names[i] for i in indices))


def _cache_key(pair: lists.Pair, method: str) -> str:
  parts = [str(CACHE_VERSION), method]
  for path in (pair.image, pair.mask):
    stat = path.stat()
    parts += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
  return hashlib.sha1('\0'.join(parts).encode()).hexdigest()[:20]


def _cache_files(pair: lists.Pair, method: str,
                 cache_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """The cache files of a pair: named by a hash, always directly in cache_dir."""
  key = _cache_key(pair, method)
  return cache_dir / f'{key}_image.npy', cache_dir / f'{key}_mask.npy'


def cache_bytes(pixels: int) -> int:
  """Bytes the cache takes for an image of `pixels` pixels: float32 image + uint8 mask."""
  return pixels * (4 + 1) + 2 * 128  # two .npy headers


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> None:
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    with open(tmp, 'wb') as f:
      np.save(f, array)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise UserError(f'{path.parent}: cannot write the preprocessing cache ({e.strerror}); '
                    'free some space or use another --workdir') from e


def _prepare_one(pair: lists.Pair, method: str, kind: str,
                 cache_dir: pathlib.Path) -> tuple[str, str, tuple[int, int], int]:
  """Reads, checks, normalises and caches one pair; returns files, shape, foreground count."""
  image_file, mask_file = _cache_files(pair, method, cache_dir)
  if image_file.exists() and mask_file.exists():
    mask = np.load(mask_file, mmap_mode='r')
    return str(image_file), str(mask_file), mask.shape, int(mask.sum())
  try:
    image = io.read_image(pair.image)
    mask = io.read_mask(pair.mask)
  except UserError as e:
    raise UserError(f'{pair.origin}: {e}') from e
  if image.shape != mask.shape:
    raise UserError(f'{pair.origin}: image {pair.image.name} has shape {image.shape} but '
                    f'mask {pair.mask.name} has shape {mask.shape}')
  _save_atomic(image_file, preprocess.normalize(image, method, kind))
  _save_atomic(mask_file, mask)
  return str(image_file), str(mask_file), mask.shape, int(mask.sum())


def prepare(pairs: list[lists.Pair], normalization: str, kind: str,
            cache_dir, require_foreground: bool = True) -> PreparedSource:
  """Validates, normalises and caches `pairs`; returns a PreparedSource over them."""
  method = preprocess.resolve(normalization, kind)
  cache_dir = pathlib.Path(cache_dir)
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'{cache_dir}: cannot create the preprocessing cache ({e.strerror})') from e
  missing = [p for p in pairs if not all(f.exists() for f in _cache_files(p, method, cache_dir))]
  io.check_free_space(cache_dir, sum(cache_bytes(io.pixel_count(p.image)) for p in missing),
                      f'the preprocessing cache of {len(missing)} images')
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(lambda p: _prepare_one(p, method, kind, cache_dir), pairs))
  if require_foreground and sum(r[3] for r in results) == 0:
    origin = pairs[0].origin.rsplit(' line ', 1)[0]
    raise UserError(f'{origin}: no mask in the set has any foreground pixel (are the masks '
                    'inverted or all black?)')
  return PreparedSource(files=tuple((r[0], r[1]) for r in results),
                        shapes=tuple(tuple(r[2]) for r in results),
                        names=tuple(p.image.stem for p in pairs))


def split_validation(source: PreparedSource, val_fraction: float,
                     seed: int) -> tuple[PreparedSource, PreparedSource | None]:
  """Carves a seeded validation subset out of a training source.

  Returns (train, val); val is None when val_fraction is 0. At least one image stays in each.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f'config.data.val_fraction={val_fraction} must be in [0, 1)')
  n = len(source)
  num_val = int(round(n * val_fraction))
  if val_fraction > 0:
    num_val = min(max(num_val, 1), n - 1)
  if num_val == 0:
    return source, None
  order = np.random.default_rng(seed).permutation(n)
  return source.subset(sorted(order[num_val:])), source.subset(sorted(order[:num_val]))

