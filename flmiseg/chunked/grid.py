"""The block grid of a plane: what each block writes, predicts and reads.

A plane of (H, W) pixels is cut into blocks of `size` x `size` (the last ones shorter). A
block *writes* its core and nothing else, so blocks never write the same chunk. It *labels*
its extended region, the core and `halo` pixels around it (0 without instances), so an
object that crosses the
core's border is seen whole by each block it crosses (flmiseg/chunked/link.py joins them). It
*predicts* the whole plane's tiles that cover its extended region: the tiles of
`tiling.tile_corners` for the whole plane, blended in the same order, so every pixel of the
extended region gets the sums the whole plane would give it, bit for bit, and the halo costs
the tiles it adds, not a blend of its own. A block *reads* those tiles' pixels plus what
normalising them reads (`preprocess.Normalization.context`: CLAHE's tiles).
"""

import dataclasses
import math

from flmiseg.inference import tiling

Span = tuple[int, int]  # [start, stop) along one axis


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of one plane (see the module docstring); spans are in plane pixels."""
  plane: int  # index into Source.planes()
  index: tuple[int, int]  # (row, column) in the grid
  core: tuple[Span, Span]
  extended: tuple[Span, Span]
  region: tuple[Span, Span]  # the tiles' union (past the plane only when it is < a tile)
  corners: tuple[tuple[int, int], ...]  # the tiles, relative to region's start

  @property
  def name(self) -> str:
    """A file-name-safe key: p<plane>_<row>_<column>."""
    return f'p{self.plane}_{self.index[0]}_{self.index[1]}'


@dataclasses.dataclass(frozen=True)
class Grid:
  """Blocks of `size` over a plane of `shape`, with `halo` pixels of extended region, for a
  network tile of `tile` pixels overlapping by `overlap`."""
  shape: tuple[int, int]
  size: int
  halo: int
  tile: int
  overlap: float

  @property
  def counts(self) -> tuple[int, int]:
    """(rows, columns) of blocks."""
    return math.ceil(self.shape[0] / self.size), math.ceil(self.shape[1] / self.size)

  def _starts(self, axis: int) -> list[int]:
    return tiling.tile_starts(max(self.shape[axis], self.tile), self.tile, self.overlap)

  def _span(self, axis: int, i: int, margin: int) -> Span:
    start = i * self.size
    return max(0, start - margin), min(self.shape[axis], start + self.size + margin)

  def block(self, plane: int, row: int, col: int) -> Block:
    core = (self._span(0, row, 0), self._span(1, col, 0))
    extended = (self._span(0, row, self.halo), self._span(1, col, self.halo))
    starts = []
    for axis, (lo, hi) in enumerate(extended):
      starts.append([s for s in self._starts(axis) if s < hi and s + self.tile > lo])
    region = tuple((s[0], s[-1] + self.tile) for s in starts)
    corners = tuple((y - region[0][0], x - region[1][0]) for y in starts[0] for x in starts[1])
    return Block(plane, (row, col), core, extended, region, corners)

  def blocks(self, planes: int) -> list[Block]:
    """Every block of `planes` planes, plane by plane, in raster order."""
    rows, cols = self.counts
    return [self.block(p, r, c) for p in range(planes) for r in range(rows)
            for c in range(cols)]

  def owner(self, y: int, x: int) -> tuple[int, int]:
    """(row, column) of the block whose core holds pixel (y, x)."""
    return y // self.size, x // self.size

  def neighbours(self, block: Block) -> list[tuple[int, int]]:
    """The blocks after `block` whose cores its extended region reaches (right, below and
    the two diagonals below), so that each pair of touching blocks is linked once."""
    rows, cols = self.counts
    row, col = block.index
    return [(row + dy, col + dx) for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1))
            if 0 <= row + dy < rows and 0 <= col + dx < cols]
