"""OpenCV's CLAHE of a whole 8-bit plane, computed for one window of it, bit for bit.

`cv2.createCLAHE(clip, (nx, ny)).apply(plane)` pads the plane (reflect-101: bottom and right)
to whole tiles unless both sides divide (and then, by its rule, by a whole tile on a side that
does divide), computes one look-up table per tile from the tile's clipped histogram, and maps
each pixel through the tables of the four nearest tile centres, bilinearly in float32. Cutting
the plane into blocks and running OpenCV on each changes the tiles, and cropping a block that
is aligned to the tiles still differs in the last bit of the interpolation weights (pixel
coordinates are counted from the block's corner), so about one pixel in 5,000 moved by a grey
level in a quick try. `window` redoes both steps in numpy with the plane's own tiles and
coordinates, reading only the tiles around the window, so a block of a plane that is never
held whole gets exactly the pixels that OpenCV gives the whole plane
(tests/test_chunked_normalize.py compares them on many sizes). It serves chunked prediction
(flmiseg/chunked/); whole planes keep OpenCV (flmiseg/data/preprocess.py: `clahe`).
"""

import dataclasses

import numpy as np

HIST_SIZE = 256  # 8-bit planes only (the invariant methods stretch to 8 bits first)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """The tiles OpenCV uses for a plane of `shape` (H, W) with a grid of (nx, ny) tiles."""
  shape: tuple[int, int]
  grid: tuple[int, int]

  @property
  def tile(self) -> tuple[int, int]:
    """(tile height, tile width), after OpenCV's padding rule."""
    (h, w), (nx, ny) = self.shape, self.grid
    if h % ny == 0 and w % nx == 0:
      return h // ny, w // nx
    return (h + ny - h % ny) // ny, (w + nx - w % nx) // nx

  def rows_needed(self, start: int, stop: int) -> tuple[int, int]:
    """The plane rows [a, b) whose tiles (and their reflected padding) the output rows
    [start, stop) read."""
    return _needed(start, stop, self.tile[0], self.grid[1], self.shape[0])

  def cols_needed(self, start: int, stop: int) -> tuple[int, int]:
    """As `rows_needed`, for columns."""
    return _needed(start, stop, self.tile[1], self.grid[0], self.shape[1])


def _first_tile(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(index of the tile before, weight of the tile after) for pixel coordinates, as OpenCV
  computes them (float32: coordinate * (1 / tile size) - 0.5)."""
  f = coords.astype(np.float32) * (np.float32(1.0) / np.float32(size)) - np.float32(0.5)
  first = np.floor(f).astype(np.int64)
  return first, (f - first.astype(np.float32)).astype(np.float32)


def _tile_span(start: int, stop: int, size: int, count: int) -> tuple[int, int]:
  """The tiles [a, b] the pixels [start, stop) interpolate between."""
  first, _ = _first_tile(np.array([start, stop - 1]), size)
  return max(int(first[0]), 0), min(int(first[1]) + 1, count - 1)


def _needed(start: int, stop: int, size: int, count: int, length: int) -> tuple[int, int]:
  a, b = _tile_span(start, stop, size, count)
  lo, hi = a * size, (b + 1) * size
  if hi > length:  # reflect-101 padding past the end mirrors the rows before the last
    lo = min(lo, max(0, 2 * length - 1 - hi))
  return lo, min(hi, length)


def _luts(tiles: np.ndarray, clip_limit: float) -> np.ndarray:
  """uint8 (n, 256) look-up tables of n tiles, uint8 (n, th * tw), as OpenCV's
  CLAHE_CalcLut_Body computes them: histogram, clip, redistribute, cumulate, scale."""
  n, total = tiles.shape
  index = (np.arange(n, dtype=np.int64)[:, None] * HIST_SIZE + tiles).ravel()
  hist = np.bincount(index, minlength=n * HIST_SIZE).reshape(n, HIST_SIZE)
  if clip_limit > 0:
    limit = max(int(clip_limit * total / HIST_SIZE), 1)
    clipped = np.maximum(hist - limit, 0).sum(axis=1)
    hist = np.minimum(hist, limit)
    batch = clipped // HIST_SIZE
    hist += batch[:, None]
    for k in np.flatnonzero(clipped - batch * HIST_SIZE):
      residual = int(clipped[k] - batch[k] * HIST_SIZE)
      step = max(HIST_SIZE // residual, 1)
      hist[k, np.arange(0, HIST_SIZE, step)[:residual]] += 1
  scale = np.float32((HIST_SIZE - 1) / np.float32(total))
  cumulated = np.cumsum(hist, axis=1).astype(np.float32) * scale
  return np.clip(np.rint(cumulated), 0, 255).astype(np.uint8)


def _padded(region: np.ndarray, origin: tuple[int, int], tiling: Tiling,
            rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
  """The padded plane's pixels [rows) x [cols) (tile-aligned, maybe past the plane's end,
  where OpenCV mirrors it: reflect-101) from `region`, the plane's pixels from `origin` on."""
  (h, w), (y0, x0) = tiling.shape, origin
  start_y = min(rows[0], max(0, 2 * h - 1 - rows[1])) if rows[1] > h else rows[0]
  start_x = min(cols[0], max(0, 2 * w - 1 - cols[1])) if cols[1] > w else cols[0]
  stop_y, stop_x = min(rows[1], h), min(cols[1], w)
  block = region[start_y - y0:stop_y - y0, start_x - x0:stop_x - x0]
  block = np.pad(block, ((0, rows[1] - stop_y), (0, cols[1] - stop_x)), mode='reflect')
  return block[rows[0] - start_y:, cols[0] - start_x:]


def window(region: np.ndarray, origin: tuple[int, int], tiling: Tiling,
           rows: tuple[int, int], cols: tuple[int, int], clip_limit: float) -> np.ndarray:
  """uint8: OpenCV's CLAHE of the whole plane, at its pixels [rows) x [cols).

  Args:
    region: uint8 pixels of the plane from `origin` (y, x) on, covering at least
      `tiling.rows_needed(*rows)` x `tiling.cols_needed(*cols)`.
    origin: the plane coordinates of region[0, 0].
    tiling: the plane's shape and CLAHE grid.
    rows, cols: the window, in plane coordinates.
    clip_limit: CLAHE's clip limit.
  """
  (th, tw), (nx, ny) = tiling.tile, tiling.grid
  ta, tb = _tile_span(*rows, th, ny)
  sa, sb = _tile_span(*cols, tw, nx)
  tiles = _padded(region, origin, tiling, (ta * th, (tb + 1) * th), (sa * tw, (sb + 1) * tw))
  my, mx = tb - ta + 1, sb - sa + 1
  tiles = tiles.reshape(my, th, mx, tw).transpose(0, 2, 1, 3).reshape(my * mx, th * tw)
  luts = _luts(tiles, clip_limit).reshape(my, mx, HIST_SIZE)
  ty, ya = _first_tile(np.arange(*rows), th)
  tx, xa = _first_tile(np.arange(*cols), tw)
  y1, y2 = np.maximum(ty, 0) - ta, np.minimum(ty + 1, ny - 1) - ta
  x1, x2 = np.maximum(tx, 0) - sa, np.minimum(tx + 1, nx - 1) - sa
  values = region[rows[0] - origin[0]:rows[1] - origin[0],
                  cols[0] - origin[1]:cols[1] - origin[1]]

  def lut(yi, xi):
    return luts[yi[:, None], xi[None, :], values].astype(np.float32)

  xa, xa1 = xa[None, :], np.float32(1.0) - xa[None, :]
  ya, ya1 = ya[:, None], np.float32(1.0) - ya[:, None]
  # OpenCV's order of operations, in float32, so every pixel rounds as it does there.
  res = ((lut(y1, x1) * xa1 + lut(y1, x2) * xa) * ya1 +
         (lut(y2, x1) * xa1 + lut(y2, x2) * xa) * ya)
  return np.clip(np.rint(res), 0, 255).astype(np.uint8)
