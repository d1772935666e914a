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

A grid whose blocks are resized for the model (`factor` != 1: the image's pixel size or
objects differ from the model's) has no whole-plane tiles to share: the resized plane's pixels
depend on how it is cut. Each block then predicts its extended region alone, as the in-memory
path predicts a whole plane (resized, tiled, resized back: flmiseg/chunked/blocks.py), and its
halo, there even without instances, gives the core's pixels the context the whole plane would
(flmiseg/chunked/run.py: `default_halo`).
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
  # The tiles' union (past the plane only when it is < a tile); resized: the extended region.
  region: tuple[Span, Span]
  corners: tuple[tuple[int, int], ...]  # the tiles, relative to region's start; resized: ()

  @property
  def name(self) -> str:
    """A file-name-safe key: p<plane>_<row>_<column>."""
    return f'p{self.plane}_{self.index[0]}_{self.index[1]}'


@dataclasses.dataclass(frozen=True)
class Grid:
  """Blocks of `size` over a plane of `shape`, with `halo` pixels of extended region, for a
  network tile of `tile` pixels overlapping by `overlap`, each block resized by `factor` for
  the network (1.0: not resized). Spans are in the plane's own pixels, whatever the factor."""
  shape: tuple[int, int]
  size: int
  halo: int
  tile: int
  overlap: float
  factor: float = 1.0

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
    if self.factor != 1.0:  # tiled alone, after resizing (the module docstring)
      return Block(plane, (row, col), core, extended, extended, ())
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
