"""grain input pipelines: training (seeded shuffle, augmentation, batching) and evaluation
(in order, padded last batch with a mask so every image counts exactly once).

Batches are host numpy dicts, NHWC:
  'image' float32 (B, H, W, 1), 'mask' float32 (B, H, W, 1) in {0, 1},
  'valid' float32 (B, H, W, 1): 1 on real pixels, 0 on padding;
eval batches also carry 'present' float32 (B,) (0 for padding entries) and 'index' int32 (B,).
Each process builds the batches of its own shard (process_index of process_count); one
boundary function (`flmiseg.sharding.global_batch`) turns them into global arrays.

Augmentation runs on the host (grain workers): a random crop to `crop_size` (images smaller
than the crop are zero-padded, with valid=0 there) and one of the 8 symmetries of the square
(the reference's flips and 90/180/270 rotations), the same for image and mask.
"""

import dataclasses
import math

import grain
import numpy as np

DIHEDRAL_ORDER = 8


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
  """Element k (0..7) of the dihedral group D4 on the first two axes of x.

  k % 4 quarter-turns counter-clockwise, then (k >= 4) a left-right flip.
  """
  x = np.rot90(x, k % 4, axes=(0, 1))
  return x[:, ::-1] if k >= 4 else x


def crop_or_pad(arrays: list[np.ndarray], size: int, top: int, left: int) -> list[np.ndarray]:
  """Crops each (H, W) array to (size, size) at (top, left), zero-padding what is outside."""
  out = []
  for a in arrays:
    h, w = a.shape
    window = np.zeros((size, size), a.dtype)
    ch, cw = min(size, h - top), min(size, w - left)
    window[:ch, :cw] = a[top:top + ch, left:left + cw]
    out.append(window)
  return out


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """Random crop (or pad) to crop_size, then a random element of D4."""
  crop_size: int
  flips: bool = True

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image, mask = element['image'], element['mask']
    h, w = image.shape
    top = int(rng.integers(0, max(h - self.crop_size, 0) + 1))
    left = int(rng.integers(0, max(w - self.crop_size, 0) + 1))
    valid = np.ones((h, w), np.float32)
    image, mask, valid = crop_or_pad([image, mask, valid], self.crop_size, top, left)
    k = int(rng.integers(DIHEDRAL_ORDER)) if self.flips else 0
    return {
        'image': np.ascontiguousarray(dihedral(image, k))[..., None].astype(np.float32),
        'mask': np.ascontiguousarray(dihedral(mask, k))[..., None].astype(np.float32),
        'valid': np.ascontiguousarray(dihedral(valid, k))[..., None],
    }


def train_dataset(source, *, crop_size: int, global_batch: int, num_steps: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                  flips: bool = True) -> grain.IterDataset:
  """Training batches for `num_steps` steps: seeded shuffle, reshuffled every epoch.

  The element order, and each element's augmentation, depend only on the seed and the
  position in the global stream, not on the number of processes: process p of P takes the
  contiguous block [p * B / P, (p + 1) * B / P) of each global batch of B, which is the block
  `make_array_from_process_local_data` places on its devices, so P processes train on exactly
  the global batches of one. Its iterator state can be saved and restored.
  """
  local_batch = global_batch // process_count
  epochs = math.ceil(num_steps * global_batch / len(source)) + 1
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(epochs)
  ds = ds.random_map(Augment(crop_size, flips), seed=seed + 1)
  # Local batch k of the stream is block k % P of global batch k // P (batching is lazy, so
  # each process only loads and augments its own elements).
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  it = ds.to_iter_dataset()
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


@dataclasses.dataclass(frozen=True)
class _PadTo(grain.transforms.Map):
  """Pads an element to (H, W) and adds its valid-pixel map."""
  hw: tuple[int, int]

  # A grain Map subclass (not a plain callable): grain then names it without inspecting its
  # source, whose ast parsing races with other threads on CPython 3.11.7 (gh-106905).
  def map(self, element: dict) -> dict:
    image, mask = element['image'], element['mask']
    valid = np.ones(image.shape, np.float32)
    image, mask, valid = crop_or_pad([image, mask, valid], max(self.hw), 0, 0)
    h, w = self.hw
    return {'image': image[:h, :w, None].astype(np.float32),
            'mask': mask[:h, :w, None].astype(np.float32),
            'valid': valid[:h, :w, None], 'index': element['index']}


def eval_shape(source) -> tuple[int, int]:
  """The (H, W) every eval image is padded to: the largest in the set."""
  return (max(s[0] for s in source.shapes), max(s[1] for s in source.shapes))


def eval_batches(source, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1, hw: tuple[int, int] | None = None):
  """Yields eval batches in order; the last global batch is padded (present=0)."""
  hw = hw or eval_shape(source)
  pad = _PadTo(tuple(hw))
  ds = grain.MapDataset.source(source).map(pad)
  local_batch = global_batch // process_count
  num_batches = math.ceil(len(source) / global_batch)
  for b in range(num_batches):
    start = b * global_batch + process_index * local_batch
    indices = range(start, start + local_batch)
    elements = [ds[i] if i < len(source) else None for i in indices]
    template = next(e for e in [ds[0]] + elements if e is not None)
    filled = [e if e is not None else _blank(template) for e in elements]
    batch = {k: np.stack([e[k] for e in filled]) for k in ('image', 'mask', 'valid')}
    batch['present'] = np.array([e is not None for e in elements], np.float32)
    batch['index'] = np.array([e['index'] if e is not None else -1 for e in elements],
                              np.int32)
    yield batch


def _blank(template: dict) -> dict:
  return {k: np.zeros_like(v) for k, v in template.items()}
