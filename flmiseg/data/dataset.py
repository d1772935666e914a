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

Label images (masks with more than one distinct nonzero value: 0 background, 1..N objects) are
foreground wherever nonzero, as any mask; their labels go to '<key>_labels.npy' (int32, 0 on
ignored pixels), also written before the mask file, for instance metrics. With
`instance_targets`, each training pair also gets '<key>_distance.npy': the normalised distance
map an instance head regresses (flmiseg/objects/instances.py), from the labels, or from the connected
components of a binary mask.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import threading

from absl import logging
import numpy as np

from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import preprocess
from flmiseg.objects import instances
from flmiseg.objects import matching
from flmiseg.core.errors import UserError

# 6: 'percentile' bounds for sparse fields and debris, preprocess.repair; 5: label images;
# 4: CLAHE tiles of 32 px; 3: ignore_value; 2: bit-depth invariant CLAHE
CACHE_VERSION = 6
IGNORED = 255  # io.read_mask's value for pixels equal to the ignore value


# np.load parses each file's header with ast.literal_eval, and CPython 3.11 (up to at least
# 3.11.7, gh-106905) can fail with "SystemError: AST constructor recursion depth mismatch"
# when two threads parse at once, as grain's prefetch threads do: headers are read one at a
# time (memory-mapped, so only the header is read under the lock), the data outside it.
_HEADER_LOCK = threading.Lock()


def load_array(path: str) -> np.ndarray:
  """np.load of a cached .npy file, safe to call from several threads at once."""
  with _HEADER_LOCK:
    mapped = np.load(path, mmap_mode='r')
  return np.array(mapped)


@dataclasses.dataclass(frozen=True)
class PreparedSource:
  """A grain RandomAccessDataSource over cached (image, mask) arrays.

  Element i is {'image': float32 (H, W), 'mask': uint8 (H, W) in {0, 1}, 'index': int}, plus
  'ignored': uint8 (H, W) in {0, 1} (1 = unlabelled, mask 0 there) for images that have
  ignored pixels (config.data.ignore_value), and 'distance': float32 (H, W) (the instance
  head's target) when prepared with instance_targets.
  """
  files: tuple[tuple[str, str], ...]
  shapes: tuple[tuple[int, int], ...]
  names: tuple[str, ...]
  # Per image, its cached ignored-pixel map or '' (none); () when no image has one.
  ignored: tuple[str, ...] = ()
  # Per image, its cached label image or '' (a binary mask); () when no mask is a label image.
  labels: tuple[str, ...] = ()
  # Per image, its cached instance-head target; () when not prepared with instance_targets.
  distance: tuple[str, ...] = ()
  # Per image, its number of foreground pixels (ignored ones not counted); () when unknown.
  foreground: tuple[int, ...] = ()

  def __len__(self) -> int:
    return len(self.files)

  def ignored_file(self, index: int) -> str:
    return self.ignored[index] if self.ignored else ''

  def __getitem__(self, index: int) -> dict:
    image_file, mask_file = self.files[index]
    element = {'image': load_array(image_file), 'mask': load_array(mask_file), 'index': index}
    if self.ignored_file(index):
      element['ignored'] = load_array(self.ignored_file(index))
    if self.distance:
      element['distance'] = load_array(self.distance[index])
    return element

  @property
  def has_labels(self) -> bool:
    """Whether some mask of the set is a label image (instance metrics apply)."""
    return bool(self.labels)

  def label_image(self, index: int) -> np.ndarray:
    """int32 (H, W) instance labels of image `index`: its label image, or the 8-connected
    components of its binary mask; 0 on ignored pixels."""
    if self.labels and self.labels[index]:
      return load_array(self.labels[index])
    return instances.connected_components(load_array(self.files[index][1])).astype(np.int32)

  def valid_map(self, index: int) -> np.ndarray | None:
    """(H, W) bool, False on ignored pixels; None when image `index` has none."""
    path = self.ignored_file(index)
    return None if not path else load_array(path) == 0

  def subset(self, indices) -> 'PreparedSource':
    pick = lambda values: tuple(values[i] for i in indices) if values else ()
    return PreparedSource(pick(self.files), pick(self.shapes), pick(self.names),
                          pick(self.ignored), pick(self.labels), pick(self.distance),
                          pick(self.foreground))


def _cache_key(pair: lists.Pair, method: str, ignore_value: int, channel: int) -> str:
  parts = [str(CACHE_VERSION), method, str(ignore_value)] + (
      [f'channel {channel}'] if channel >= 0 else [])  # keys of older caches stay valid
  for path in (pair.image, pair.mask):
    stat = path.stat()
    parts += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
  return hashlib.sha1('\0'.join(parts).encode()).hexdigest()[:20]


def _cache_files(pair: lists.Pair, method: str, cache_dir: pathlib.Path,
                 ignore_value: int, channel: int = -1) -> tuple[pathlib.Path, ...]:
  """The cache files (image, mask, ignored map, labels, distance target) of a pair: named by
  a hash, always directly in cache_dir. The ignored map exists only for masks with ignored
  pixels, the labels only for label images, the distance only once asked for."""
  key = _cache_key(pair, method, ignore_value, channel)
  return tuple(cache_dir / f'{key}_{part}.npy'
               for part in ('image', 'mask', 'ignored', 'labels', 'distance'))


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
  """Raises ValueError unless `ignore_value` is -1 (none) or a positive integer mask value."""
  if (isinstance(ignore_value, bool) or not isinstance(ignore_value, (int, np.integer))
      or ignore_value == 0 or ignore_value < -1):
    # 0 is background: ignoring it would leave no background label to learn from.
    raise ValueError(f'config.data.ignore_value={ignore_value!r}: must be -1 (none) or a '
                     'positive integer mask value (e.g. 2) marking unlabelled pixels')
  return int(ignore_value)


def _present(path: pathlib.Path) -> str:
  return str(path) if path.exists() else ''


def _prepare_one(pair: lists.Pair, method: str, kind: str, cache_dir: pathlib.Path,
                 ignore_value: int, instance_targets: bool, channel: int) -> tuple:
  """Reads, checks, normalises and caches one pair.

  Returns (image file, mask file, shape, foreground pixel count, ignored-map file or '',
  labels file or '', distance file or '').
  """
  image_file, mask_file, ignored_file, labels_file, distance_file = _cache_files(
      pair, method, cache_dir, ignore_value, channel)
  if image_file.exists() and mask_file.exists():
    with _HEADER_LOCK:
      mask = np.load(mask_file, mmap_mode='r')
    shape, count = mask.shape, int(mask.sum())
  else:
    try:
      image = io.read_image(pair.image, channel=channel if channel >= 0 else None)
      raw = io.read_mask_values(pair.mask)
      mask = io.binarize_mask(raw, ignore_value)
    except UserError as e:
      raise UserError(f'{pair.origin}: {e}') from e
    if image.shape != mask.shape:
      raise UserError(f'{pair.origin}: image {pair.image.name} has shape {image.shape} but '
                      f'mask {pair.mask.name} has shape {mask.shape}')
    # Camera defects are repaired as predict repairs them; a stitching border is left out of
    # the loss and the metrics, as unlabelled pixels are.
    planes, no_data, _ = preprocess.repair(image[None], pair.image)
    image = planes[0]
    ignored = mask == IGNORED
    if no_data is not None:
      ignored |= no_data[0]
    _save_atomic(image_file, preprocess.normalize(image, method, kind))
    # The ignored map and the labels go before the mask file, which marks the entry complete.
    if ignored.any():
      _save_atomic(ignored_file, ignored.astype(np.uint8))
    if matching.is_label_image(np.where(ignored, 0, raw)):
      _save_atomic(labels_file, np.where(ignored, 0, raw).astype(np.int32))
    mask = np.where(ignored, 0, mask).astype(np.uint8)
    _save_atomic(mask_file, mask)
    shape, count = mask.shape, int(mask.sum())
  if instance_targets and not distance_file.exists():
    labels = load_array(labels_file) if labels_file.exists() else None
    _save_atomic(distance_file, instances.targets_from_mask(load_array(mask_file), labels))
  return (str(image_file), str(mask_file), shape, count, _present(ignored_file),
          _present(labels_file), _present(distance_file))


def prepare(pairs: list[lists.Pair], normalization: str, kind: str,
            cache_dir, require_foreground: bool = True,
            ignore_value: int = -1, instance_targets: bool = False,
            channel: int = -1) -> PreparedSource:
  """Validates, normalises and caches `pairs`; returns a PreparedSource over them.

  ignore_value: a mask value whose pixels are unlabelled (excluded from losses and metrics;
  see the module docstring); -1: none, every nonzero pixel is foreground.
  instance_targets: also cache the instance head's distance targets (training sets of a
  model with config.model.instance_head).
  channel: the channel of multi-channel images to read (config.data.channel); -1: images
  must have one.
  """
  method = preprocess.resolve(normalization, kind)
  ignore_value = check_ignore_value(ignore_value)
  cache_dir = io.make_cache_dir(cache_dir)
  missing = [p for p in pairs if not all(
      f.exists() for f in _cache_files(p, method, cache_dir, ignore_value, channel)[:2])]
  # With an ignore value, a mask may add a uint8 ignored map: one more byte per pixel.
  # Instance targets add a float32 distance map, and most likely int32 labels.
  per_pixel_extra = (1 if ignore_value >= 0 else 0) + (8 if instance_targets else 0)
  needed = sum(cache_bytes(n) + per_pixel_extra * (n + 128)
               for n in (io.pixel_count(p.image) for p in missing))
  io.check_free_space(cache_dir, needed, f'the preprocessing cache of {len(missing)} images')
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    results = list(pool.map(lambda p: _prepare_one(p, method, kind, cache_dir, ignore_value,
                                                   instance_targets, channel), pairs))
  # The cached masks are 0 on ignored pixels: only real foreground counts.
  if require_foreground and sum(r[3] for r in results) == 0:
    origin = pairs[0].origin.rsplit(' line ', 1)[0]
    raise UserError(f'{origin}: no mask in the set has any foreground pixel (are the masks '
                    'inverted or all black?)')
  optional = lambda column: (tuple(r[column] for r in results)
                             if any(r[column] for r in results) else ())
  return PreparedSource(files=tuple((r[0], r[1]) for r in results),
                        shapes=tuple(tuple(r[2]) for r in results),
                        names=tuple(p.image.stem for p in pairs),
                        ignored=optional(4), labels=optional(5), distance=optional(6),
                        foreground=tuple(int(r[3]) for r in results))


def split_validation(source: PreparedSource, val_fraction: float,
                     seed: int) -> tuple[PreparedSource, PreparedSource | None]:
  """Carves a seeded validation subset out of a training source.

  Returns (train, val); val is None when val_fraction is 0. At least one image stays in each.
  A validation subset without a foreground pixel measures nothing (its IoU is 1 for a model
  that finds nothing there, 0 for any other): the user is warned in one line. (Exchanging an
  image with foreground into it was tried: on 5 real ER crops, 2 with foreground, training
  lost half its foreground and the test IoU fell from 0.73 to 0.64.)
  """
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'config.data.val_fraction={val_fraction} must be in [0, 1)')
  n = len(source)
  num_val = int(round(n * val_fraction))
  if val_fraction > 0:
    num_val = min(max(num_val, 1), n - 1)
  if num_val == 0:
    return source, None
  order = np.random.default_rng(seed).permutation(n)
  if source.foreground and not any(source.foreground[i] for i in order[:num_val]):
    logging.warning('config.data.val_fraction: the %d validation image(s) drawn (%s) have no '
                    'foreground pixel, so validation only rewards finding nothing there; '
                    'annotate objects in more images, or draw another split (config.seed)',
                    num_val, ', '.join(source.names[i] for i in sorted(order[:num_val])))
  return source.subset(sorted(order[num_val:])), source.subset(sorted(order[:num_val]))

