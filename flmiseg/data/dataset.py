"""Prepared datasets: images read, checked and normalised once, cached as .npy files.

`prepare(pairs, ...)` validates every pair (readable, same shape, masks binarised), normalises
each image once (preprocessing is deterministic) and caches image/mask arrays in `cache_dir`,
keyed by file path, size, modification time, method and ignore value, so later runs and epochs
skip the work. The result is a `PreparedSource`, a grain random-access source that reads one
cached pair per index: it pickles cheaply (a list of paths) for grain worker processes.

Sparse labels (config.data.ignore_value >= 0): mask pixels equal to the ignore value are
unlabelled. The cached mask stays uint8 {0, 1} (0 on ignored pixels), so every reader of mask
files keeps working; the ignored pixels go to a third file, '<key>_ignored.npy' (uint8, 1 =
ignored), written only for masks that have some, before the mask file (a cached mask file
therefore means its ignored map, if any, is complete).
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

CACHE_VERSION = 4  # 4: CLAHE tiles of 32 px; 3: ignore_value; 2: bit-depth invariant CLAHE
IGNORED = 255  # io.read_mask's value for pixels equal to the ignore value


@dataclasses.dataclass(frozen=True)
class PreparedSource:
  """A grain RandomAccessDataSource over cached (image, mask) arrays.

  Element i is {'image': float32 (H, W), 'mask': uint8 (H, W) in {0, 1}, 'index': int}, plus
  'ignored': uint8 (H, W) in {0, 1} (1 = unlabelled, mask 0 there) for images that have
  ignored pixels (config.data.ignore_value).
  """
  files: tuple[tuple[str, str], ...]
  shapes: tuple[tuple[int, int], ...]
  names: tuple[str, ...]
  # Per image, its cached ignored-pixel map or '' (none); () when no image has one.
  ignored: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.files)

  def ignored_file(self, index: int) -> str:
    return self.ignored[index] if self.ignored else ''

  def __getitem__(self, index: int) -> dict:
    image_file, mask_file = self.files[index]
    element = {'image': np.load(image_file), 'mask': np.load(mask_file), 'index': index}
    if self.ignored_file(index):
      element['ignored'] = np.load(self.ignored_file(index))
    return element

  def valid_map(self, index: int) -> np.ndarray | None:
    """(H, W) bool, False on ignored pixels; None when image `index` has none."""
    path = self.ignored_file(index)
    return None if not path else np.load(path) == 0

  def subset(self, indices) -> 'PreparedSource':
    return PreparedSource(tuple(self.files[i] for i in indices),
                          tuple(self.shapes[i] for i in indices),
                          tuple(self.names[i] for i in indices),
                          tuple(self.ignored[i] for i in indices) if self.ignored else ())


def _cache_key(pair: lists.Pair, method: str, ignore_value: int) -> str:
  parts = [str(CACHE_VERSION), method, str(ignore_value)]
  for path in (pair.image, pair.mask):
    stat = path.stat()
    parts += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
  return hashlib.sha1('\0'.join(parts).encode()).hexdigest()[:20]


def _cache_files(pair: lists.Pair, method: str, cache_dir: pathlib.Path,
                 ignore_value: int) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """The cache files (image, mask, ignored map) of a pair: named by a hash, always directly
  in cache_dir. The ignored map exists only for masks with ignored pixels."""
  key = _cache_key(pair, method, ignore_value)
  return (cache_dir / f'{key}_image.npy', cache_dir / f'{key}_mask.npy',
          cache_dir / f'{key}_ignored.npy')


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


def check_ignore_value(ignore_value) -> int:
  """Raises UserError unless `ignore_value` is -1 (none) or a positive integer mask value."""
  if (isinstance(ignore_value, bool) or not isinstance(ignore_value, (int, np.integer))
      or ignore_value == 0 or ignore_value < -1):
    # 0 is background: ignoring it would leave no background label to learn from.
    raise UserError(f'config.data.ignore_value={ignore_value!r}: must be -1 (none) or a '
                    'positive integer mask value (e.g. 2) marking unlabelled pixels')
  return int(ignore_value)


def _prepare_one(pair: lists.Pair, method: str, kind: str, cache_dir: pathlib.Path,
                 ignore_value: int) -> tuple[str, str, tuple[int, int], int, str]:
  """Reads, checks, normalises and caches one pair.

  Returns (image file, mask file, shape, foreground pixel count, ignored-map file or '').
  """
  image_file, mask_file, ignored_file = _cache_files(pair, method, cache_dir, ignore_value)
  if image_file.exists() and mask_file.exists():
    mask = np.load(mask_file, mmap_mode='r')
    ignored = str(ignored_file) if ignored_file.exists() else ''
    return str(image_file), str(mask_file), mask.shape, int(mask.sum()), ignored
  try:
    image = io.read_image(pair.image)
    mask = io.read_mask(pair.mask, ignore_value)
  except UserError as e:
    raise UserError(f'{pair.origin}: {e}') from e
  if image.shape != mask.shape:
    raise UserError(f'{pair.origin}: image {pair.image.name} has shape {image.shape} but '
                    f'mask {pair.mask.name} has shape {mask.shape}')
  ignored = mask == IGNORED
  _save_atomic(image_file, preprocess.normalize(image, method, kind))
  if ignored.any():  # before the mask file, which marks the entry complete
    _save_atomic(ignored_file, ignored.astype(np.uint8))
  mask = np.where(ignored, 0, mask).astype(np.uint8)
  _save_atomic(mask_file, mask)
  return (str(image_file), str(mask_file), mask.shape, int(mask.sum()),
          str(ignored_file) if ignored.any() else '')


def prepare(pairs: list[lists.Pair], normalization: str, kind: str,
            cache_dir, require_foreground: bool = True,
            ignore_value: int = -1) -> PreparedSource:
  """Validates, normalises and caches `pairs`; returns a PreparedSource over them.

  ignore_value: a mask value whose pixels are unlabelled (excluded from losses and metrics;
  see the module docstring); -1: none, every nonzero pixel is foreground.
  """
  method = preprocess.resolve(normalization, kind)
  ignore_value = check_ignore_value(ignore_value)
  cache_dir = pathlib.Path(cache_dir)
  try:
    cache_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'{cache_dir}: cannot create the preprocessing cache ({e.strerror})') from e
  missing = [p for p in pairs if not all(
      f.exists() for f in _cache_files(p, method, cache_dir, ignore_value)[:2])]
  # With an ignore value, a mask may add a uint8 ignored map: one more byte per pixel.
  per_pixel_extra = 1 if ignore_value >= 0 else 0
  needed = sum(cache_bytes(n) + per_pixel_extra * (n + 128)
               for n in (io.pixel_count(p.image) for p in missing))
  io.check_free_space(cache_dir, needed, f'the preprocessing cache of {len(missing)} images')
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(lambda p: _prepare_one(p, method, kind, cache_dir, ignore_value),
                            pairs))
  # The cached masks are 0 on ignored pixels: only real foreground counts.
  if require_foreground and sum(r[3] for r in results) == 0:
    origin = pairs[0].origin.rsplit(' line ', 1)[0]
    raise UserError(f'{origin}: no mask in the set has any foreground pixel (are the masks '
                    'inverted or all black?)')
  ignored = tuple(r[4] for r in results)
  return PreparedSource(files=tuple((r[0], r[1]) for r in results),
                        shapes=tuple(tuple(r[2]) for r in results),
                        names=tuple(p.image.stem for p in pairs),
                        ignored=ignored if any(ignored) else ())


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

