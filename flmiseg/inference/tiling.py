"""Probabilities of an image of any size: a jitted forward pass run over blended tiles.

`prob_fn` jits the forward pass of loaded weights (flmiseg/store/weights.py; optionally averaged
over the 8 flips/rotations) over a mesh; `sliding_window` runs any such function over an image
in overlapping tiles blended with Gaussian weights; `network_tile` decides the tiles' size.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from flmiseg.core import sharding
from flmiseg.data import pipeline


def round_up_batch(batch_size: int, num_devices: int) -> int:
  """The smallest multiple of num_devices that is >= batch_size (and >= num_devices)."""
  return max(num_devices, math.ceil(batch_size / num_devices) * num_devices)


# ----------------------------------------------------------------------------- probabilities

def dihedral(x, k: int, inverse: bool = False, xp=jnp):
  """One of the 8 symmetries of the square on NHWC arrays (k // 4: flip, k % 4: rot90);
  `xp` is the array module (jax.numpy, or numpy for host arrays)."""
  rot, flip = k % 4, k // 4
  if not inverse:
    x = xp.flip(x, axis=2) if flip else x
    return xp.rot90(x, rot, axes=(1, 2))
  x = xp.rot90(x, -rot, axes=(1, 2))
  return xp.flip(x, axis=2) if flip else x


def prob_fn(state, mesh, tta: bool):
  """A jitted function of the loaded weights `state` (weights.InferenceState): tiles
  (B, h, w, 1) float32 (B a multiple of the mesh size) ->
  outputs (B, h, w, C) as numpy (channel 0 the foreground probability, 1 the instance head's
  distance); with `tta` the mean over the 8 flips/rotations (both maps are equivariant).)"""
  variables = sharding.replicate({'params': state.params, 'batch_stats': state.batch_stats},
                                 mesh)

  def probs(variables, x):
    def once(x):
      logits, _ = state.apply_fn(variables, x, train=False)
      return jax.nn.sigmoid(logits.astype(jnp.float32))
    if not tta:
      return once(x)
    return sum(dihedral(once(dihedral(x, k)), k, inverse=True) for k in range(8)) / 8

  data = sharding.data_sharding(mesh)
  fn = jax.jit(probs, in_shardings=(sharding.replicated(mesh), data), out_shardings=data)
  return lambda tiles: jax.device_get(fn(variables, jax.device_put(tiles, data)))


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
  """Start offsets of tiles covering [0, size): evenly spread, first 0, last size - tile."""
  if size <= tile:
    return [0]
  step = max(1, int(round(tile * (1.0 - overlap))))
  n = math.ceil((size - tile) / step) + 1
  return [int(round(i * (size - tile) / (n - 1))) for i in range(n)]


def gaussian_weight(tile: int) -> np.ndarray:
  """(tile, tile) float32 blending weights: a Gaussian of sigma tile/8, 1 at the centre."""
  x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
  g = np.exp(-0.5 * (x / (tile / 8)) ** 2)
  return np.outer(g, g).astype(np.float32)


def network_tile(tile: int, config) -> int:
  """The side of the tiles the network sees: `tile` (--tile; 0: the training crop size)
  rounded up to a multiple of pipeline.SIZE_MULTIPLE, the stock networks' stride. A network
  pads any other size itself, with zeros: a black border inside every tile, which took the
  shipped mito model from IoU 0.928 to 0.606 on 100x100 crops at --tile=100
  (docs/inference.md)."""
  tile = tile or config.data.crop_size
  return -(-tile // pipeline.SIZE_MULTIPLE) * pipeline.SIZE_MULTIPLE


def tile_note(tile: int, config) -> str | None:
  """The warning line for a --tile that `network_tile` rounds up, else None."""
  rounded = network_tile(tile, config)
  if tile and rounded != tile:
    return (f'--tile={tile} rounded up to {rounded}, a multiple of '
            f'{pipeline.SIZE_MULTIPLE}: the networks pad other sizes with zeros, which costs '
            'accuracy')
  return None


def tile_corners(h: int, w: int, tile: int, overlap: float) -> list[tuple[int, int]]:
  """(y, x) of the tiles `sliding_window` cuts from an (h, w) image (padded to at least a tile
  per side), in the order it predicts them: rows, then columns."""
  return [(y, x) for y in tile_starts(max(h, tile), tile, overlap)
          for x in tile_starts(max(w, tile), tile, overlap)]


def sliding_window(probs_of, image: np.ndarray, tile: int, overlap: float, batch_size: int,
                   progress: bool = False,
                   on_batch: Callable[[int, int], None] | None = None,
                   batch_multiple: int = 0) -> np.ndarray:
  """Outputs (H, W, C) of a normalised (H, W) image by blended overlapping tiles.

  probs_of maps a (batch_size, tile, tile, 1) float32 array to outputs (batch_size, tile,
  tile, C) (C = 1: the foreground probability; 2 with an instance head). An image smaller
  than a tile is padded to it by reflection (mirror images of its border): zeros there cost
  the shipped models 0.09-0.35 mean IoU on 100x100 crops, by reflection they keep within
  0.013 of the IoU the same pixels get inside a larger image (docs/inference.md).
  `progress` shows a console bar of the tiles; `on_batch(tiles done, tiles in all)` is
  called after each batch (a GUI's progress bar).
  With `batch_multiple` (the devices' count), a last batch that padding to batch_size would
  leave more than a quarter of the image's computation empty (a 256x256 image: 9 tiles of
  128 in batches of 8) holds only its tiles, rounded up to a multiple of it: probs_of then
  sees that smaller batch too (a jitted one compiles it once).
  """
  h, w = image.shape
  ph, pw = max(h, tile), max(w, tile)
  padded = np.pad(np.asarray(image, np.float32), ((0, ph - h), (0, pw - w)), mode='reflect')
  total, norm = blend(probs_of, padded, tile_corners(h, w, tile, overlap), tile, batch_size,
                      progress, on_batch, batch_multiple)
  return (total / norm[..., None])[:h, :w]


def blend(probs_of, image: np.ndarray, corners: list[tuple[int, int]], tile: int,
          batch_size: int, progress: bool = False,
          on_batch: Callable[[int, int], None] | None = None,
          batch_multiple: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(sum of the tiles' outputs weighted by `gaussian_weight` (H, W, C), sum of the weights
  (H, W)) of the tiles at `corners` (y, x) of a normalised float32 (H, W) image, predicted in
  that order in batches (`sliding_window`'s arguments). A pixel's outputs are the first over
  the second; every pixel that the same tiles cover gets the same sums, bit for bit, in a
  block of a plane as in the whole plane (flmiseg/chunked/)."""
  weight = gaussian_weight(tile)
  total = None  # (H, W, C) once the first outputs tell C
  norm = np.zeros(image.shape, np.float32)
  bar = tqdm.tqdm(total=len(corners), desc='tiles', unit='tile', leave=False,
                  disable=not progress or len(corners) <= batch_size)
  computed = math.ceil(len(corners) / batch_size) * batch_size
  for start in range(0, len(corners), batch_size):
    chunk = corners[start:start + batch_size]
    size = batch_size
    if batch_multiple and len(chunk) < batch_size:
      trimmed = math.ceil(len(chunk) / batch_multiple) * batch_multiple
      size = trimmed if 4 * (batch_size - trimmed) > computed else batch_size
    tiles = np.zeros((size, tile, tile, 1), np.float32)
    for j, (y, x) in enumerate(chunk):
      tiles[j, ..., 0] = image[y:y + tile, x:x + tile]
    probs = np.asarray(probs_of(tiles))
    if total is None:
      total = np.zeros(image.shape + (probs.shape[-1],), np.float32)
    for j, (y, x) in enumerate(chunk):
      total[y:y + tile, x:x + tile] += probs[j] * weight[..., None]
      norm[y:y + tile, x:x + tile] += weight
    bar.update(len(chunk))
    if on_batch is not None:
      on_batch(start + len(chunk), len(corners))
  bar.close()
  return total, norm
