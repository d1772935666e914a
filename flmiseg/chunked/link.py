"""Instances without seams: the parts of an object in several blocks' cores become one label.

Each block labelled its extended region (flmiseg/chunked/blocks.py), so where two blocks'
extended regions overlap each saw the other's core. An object `o` of block b (its anchor id)
and an object `q` of a touching block c are the same object when each covers more than half
of the other's pixels where it looked: o's pixels in c's core are mostly q in c's labels, and
q's pixels in b's core are mostly o in b's (`block_links`, for each block and its neighbours
right and below, diagonals included, so objects over corners join too). An object that both
blocks segmented alike (every object smaller than the halo, since each block predicts the
whole plane's tiles) joins exactly; where the two disagree (a cluster larger than the halo)
the majorities keep them apart rather than chain unrelated objects together.

The links of all blocks (the objects that cross a border: a few per block, not a label per
pixel) go to the driver, which joins them (`join`: union-find) and maps every part to the
group's smallest anchor, the object's first pixel in the plane. Each block then gets only its
own entries of that map (`split`), rewrites its core (`relabel`), and no process ever holds
a table of the image's labels. The objects table is streamed from the blocks' sums in block
order (`write_table`): whole objects as they come, joined ones summed at the end.
"""

import csv
import os
import pathlib

import numpy as np

from flmiseg.chunked import blocks
from flmiseg.chunked import job as job_lib
from flmiseg.objects import instances


def majority(first: np.ndarray, second: np.ndarray) -> dict:
  """{a: b} for each non-zero a of `first` whose pixels are more than half a non-zero b in
  `second` (arrays of the same shape)."""
  keep = first != 0
  a, b = first[keep], second[keep]
  if not a.size:
    return {}
  pairs, counts = np.unique(np.stack([a, b]), axis=1, return_counts=True)
  ids, totals = np.unique(a, return_counts=True)
  total = dict(zip(ids.tolist(), totals.tolist()))
  return {int(x): int(y) for (x, y), n in zip(pairs.T.tolist(), counts.tolist())
          if y != 0 and 2 * n > total[x]}


def _overlap(outer, inner):
  """The intersection of two ((y0, y1), (x0, x1)) regions, or None."""
  (a0, a1), (b0, b1) = outer
  (c0, c1), (d0, d1) = inner
  ys, xs = (max(a0, c0), min(a1, c1)), (max(b0, d0), min(b1, d1))
  return (ys, xs) if ys[0] < ys[1] and xs[0] < xs[1] else None


def _seen(ring: np.ndarray, block, region) -> np.ndarray:
  """What `block`'s record saw (its ring) of a plane `region`."""
  (e0, _), (f0, _) = block.extended
  (y0, y1), (x0, x1) = region
  return ring[y0 - e0:y1 - e0, x0 - f0:x1 - f0]


def _labels(job: job_lib.Job, block, region) -> np.ndarray:
  (y0, y1), (x0, x1) = region
  index = (*job.source.planes()[block.plane], slice(y0, y1), slice(x0, x1))
  return np.asarray(blocks.array(f'{job.outputs.label("instances")}/0')[index])


def block_links(job: job_lib.Job, block) -> np.ndarray:
  """(k, 2) anchor ids of the objects of `block` joined to its neighbours' (module
  docstring), from the blocks' records and the labels written."""
  state = job_lib.State(job.outputs.state)
  ring = state.load('blocks', block.name)['ring']
  found = []
  for row, col in job.grid.neighbours(block):
    other = job.grid.block(block.plane, row, col)
    there = _overlap(block.extended, other.core)  # what block saw of other's core
    back = _overlap(other.extended, block.core)  # what other saw of block's core
    if there is None or back is None:
      continue
    other_ring = state.load('blocks', other.name)['ring']
    forward = majority(_seen(ring, block, there), _labels(job, other, there))
    backward = majority(_seen(other_ring, other, back), _labels(job, block, back))
    found += [(o, q) for o, q in forward.items() if backward.get(q) == o]
  return np.array(found, np.uint64).reshape(-1, 2)


def join(links: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(ids, roots): every id that a link joins, sorted, and its group's smallest id."""
  parent = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for a, b in np.concatenate(links or [np.zeros((0, 2), np.uint64)]).tolist():
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  ids = np.array(sorted(parent), np.uint64)
  return ids, np.array([find(x) for x in ids.tolist()], np.uint64)


def split(job: job_lib.Job, ids: np.ndarray, roots: np.ndarray, plane: int) -> dict:
  """{block name: (ids, roots)} of one plane's map, each entry given to the block whose core
  holds the id's anchor pixel; entries that map an id to itself are left out."""
  moved = ids != roots
  width = job.grid.shape[1]
  out = {}
  for key, root in zip(ids[moved].tolist(), roots[moved].tolist()):
    row, col = job.grid.owner((key - 1) // width, (key - 1) % width)
    name = job.grid.block(plane, row, col).name
    out.setdefault(name, ([], []))
    out[name][0].append(key)
    out[name][1].append(root)
  return {k: (np.array(a, np.uint64), np.array(b, np.uint64)) for k, (a, b) in out.items()}


def relabel(job: job_lib.Job, item) -> None:
  """Rewrites one block's core with its entries of the map (item: (block, ids, roots))."""
  block, ids, roots = item
  labels = _labels(job, block, block.core)
  where = np.searchsorted(ids, labels)
  hit = (where < ids.size) & (ids[np.minimum(where, ids.size - 1)] == labels)
  labels[hit] = roots[where[hit]]
  (y0, y1), (x0, x1) = block.core
  index = (*job.source.planes()[block.plane], slice(y0, y1), slice(x0, x1))
  blocks.array(f'{job.outputs.label("instances")}/0')[index] = labels
  job_lib.State(job.outputs.state).mark('relabel', block.name)


def write_table(job: job_lib.Job, all_blocks: list, maps: dict, path: pathlib.Path) -> int:
  """Writes the objects CSV (as --mode=predict's: plane, label, area, centroid, mean
  intensity) from the blocks' records, streamed; returns the number of objects. `maps`:
  {plane: (ids, roots)}."""
  state = job_lib.State(job.outputs.state)
  pixel_size = job.source.pixel_size
  header = ['plane'] + instances.object_header(pixel_size)
  joined = {}  # (plane, root) -> [area, sum_y, sum_x, sum_i]: objects in several blocks
  tmp = path.with_name(f'.{path.name}.tmp')
  written = 0
  with open(tmp, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for block in all_blocks:
      ids_map, roots_map = maps.get(block.plane, (np.zeros(0, np.uint64),) * 2)
      sums = state.load('blocks', block.name)
      where = np.searchsorted(ids_map, sums['ids'])
      part = (where < ids_map.size) & (ids_map[np.minimum(where, ids_map.size - 1)] ==
                                       sums['ids']) if ids_map.size else where < 0
      columns = [sums[k] for k in ('ids', 'area', 'sum_y', 'sum_x', 'sum_i')]
      writer.writerows([block.plane] + instances.object_row(*values, pixel_size)
                       for values in zip(*(c[~part].tolist() for c in columns)))
      written += int((~part).sum())
      for root, *values in zip(roots_map[where[part]].tolist(),
                               *(c[part].tolist() for c in columns[1:])):
        total = joined.setdefault((block.plane, root), [0, 0.0, 0.0, 0.0])
        for i, v in enumerate(values):
          total[i] += v
    for (plane, root), total in sorted(joined.items()):
      writer.writerow([plane] + instances.object_row(root, *total, pixel_size))
  os.replace(tmp, path)
  return written + len(joined)
