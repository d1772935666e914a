"""What makes a block's pixels the whole plane's (no network here): OpenCV's CLAHE of a whole
plane computed for a window of it (flmiseg/data/clahe.py), each normalisation applied to a
window with the whole plane's statistics, those statistics counted block by block
(flmiseg/chunked/statistics.py), and skimage's h-maxima object by object
(flmiseg/objects/instances.py); all to the bit."""

import cv2
import numpy as np
import pytest
from scipy import ndimage
from skimage import morphology

from flmiseg.chunked import statistics
from flmiseg.data import clahe
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.objects import instances


def _blobs(rng, shape) -> np.ndarray:
  x = cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.uint8), (0, 0), 3)
  return np.clip((x.astype(int) - 100) * 4 + rng.integers(0, 30, shape), 0, 255).astype(
      np.uint8)


def test_clahe_window_is_opencv_on_the_whole_plane():
  rng = np.random.default_rng(0)
  # Sizes that divide the grid, that do not (OpenCV pads), and that divide on one side only
  # (then OpenCV pads that side by a whole tile too).
  for h, w in [(256, 256), (250, 470), (96, 301), (33, 64), (20, 500), (640, 96)]:
    plane = _blobs(rng, (h, w))
    grid = preprocess.clahe_grid((h, w))
    whole = cv2.createCLAHE(preprocess.CLAHE_CLIP_LIMIT, grid).apply(plane)
    tiling = clahe.Tiling((h, w), grid)
    for _ in range(6):
      rows = tuple(sorted(rng.choice(h + 1, 2, replace=False)))
      cols = tuple(sorted(rng.choice(w + 1, 2, replace=False)))
      ys, xs = tiling.rows_needed(*rows), tiling.cols_needed(*cols)
      region = plane[ys[0]:ys[1], xs[0]:xs[1]]
      window = clahe.window(region, (ys[0], xs[0]), tiling, rows, cols,
                            preprocess.CLAHE_CLIP_LIMIT)
      np.testing.assert_array_equal(window, whole[rows[0]:rows[1], cols[0]:cols[1]],
                                    err_msg=f'{(h, w)} {rows} {cols}')


def _planes():
  rng = np.random.default_rng(1)
  out = [simulate.simulate(kind, 200, synthetic.image_rng(2, 'test', 0))[0]
         for kind in ('nucleus', 'er', 'mito')]
  out.append((rng.random((130, 171)) * 4000).astype(np.uint16))
  sparse = rng.normal(1000, 20, (160, 160))
  sparse[80:84, 80:84] = 30000  # a sparse field: the 99.8th percentile in the noise
  debris = rng.normal(1000, 20, (160, 160))
  debris[::6] += 3000  # a dense structure under bright debris
  debris[40:60, 40:60] = 60000
  out += [sparse.astype(np.uint16), debris.astype(np.uint16), np.full((40, 40), 7, np.uint16)]
  return out


def _counted(plane, method) -> statistics.HistogramStatistics:
  """The plane's statistics counted over four blocks, as a chunked run counts them."""
  h, w = plane.shape
  read = lambda rows, cols: plane[rows[0]:rows[1], cols[0]:cols[1]]  # noqa: E731
  spans = [((0, h // 2), (0, w // 3)), ((0, h // 2), (w // 3, w)),
           ((h // 2, h), (0, w // 3)), ((h // 2, h), (w // 3, w))]
  median = statistics.merge([statistics.pass_median(read, (h, w), *s) for s in spans])
  hot = tuple(statistics.percentiles(median, preprocess.HOT_PIXEL_PERCENTILES))
  blurred = method == 'percentile'
  parts = [statistics.pass_repaired(read, (h, w), *s, hot, blurred) for s in spans]
  return hot, statistics.HistogramStatistics(
      statistics.merge([p[0] for p in parts]), statistics.merge([p[1] for p in parts]),
      statistics.merge([p[2] for p in parts]) if blurred else None, w)


@pytest.mark.parametrize('method', preprocess.BLOCKWISE_METHODS)
def test_blocks_counted_and_normalised_alone_give_the_whole_plane(method):
  rng = np.random.default_rng(2)
  for plane in _planes():
    repaired, _, _ = preprocess.repair(plane[None], 'plane')
    repaired = repaired[0]
    whole = preprocess.normalize(repaired, method)
    hot, counted = _counted(plane, method)
    median = cv2.medianBlur(plane.astype(np.float32), 3)
    assert hot == tuple(np.percentile(median, preprocess.HOT_PIXEL_PERCENTILES))

    def clahe_moments(norm, repaired=repaired):
      values = preprocess.clahe(repaired).astype(np.float32)
      return values.mean(dtype=np.float64), values.std(dtype=np.float64)

    norm = preprocess.normalization(counted, method, 'er', plane.shape, clahe_moments)
    in_memory = preprocess.normalization(preprocess.ArrayStatistics(repaired), method, 'er',
                                         plane.shape, clahe_moments)
    if method != 'zscore':  # the z-score's sums: exact here, pairwise in numpy
      assert norm == in_memory
    h, w = plane.shape
    for _ in range(4):
      rows = tuple(sorted(rng.choice(h + 1, 2, replace=False)))
      cols = tuple(sorted(rng.choice(w + 1, 2, replace=False)))
      ctx = in_memory.context(rows, cols)
      region = repaired[ctx[0][0]:ctx[0][1], ctx[1][0]:ctx[1][1]]
      out = preprocess.apply_normalization(region, (ctx[0][0], ctx[1][0]), in_memory, rows,
                                           cols)
      assert out.dtype == np.float32
      np.testing.assert_array_equal(out, whole[rows[0]:rows[1], cols[0]:cols[1]])


def test_counted_percentiles_and_noise_are_numpys():
  rng = np.random.default_rng(3)
  for _ in range(200):
    values = rng.integers(0, int(rng.choice([3, 50, 4000, 65535])), int(rng.integers(1, 3000)))
    q = [0, 1, 50, 99, 99.8, 99.99, 100, float(rng.uniform(0, 100))]
    counts = statistics.count(values)
    assert statistics.percentiles(counts, q) == list(np.percentile(values.astype(float), q))
    assert statistics.median(counts) == np.median(values.astype(float))
    plane = rng.integers(0, 1000, (int(rng.integers(1, 30)), int(rng.integers(2, 30))))
    diffs = statistics.count(np.diff(plane, axis=1))
    assert statistics.noise_sigma(diffs) == preprocess.noise_sigma(plane.astype(float))


def test_h_maxima_object_by_object_is_skimages():
  rng = np.random.default_rng(4)
  for trial in range(120):
    h, w = rng.integers(5, 90, 2)
    x = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 4))
    x = (x - x.min()) / (np.ptp(x) + 1e-12)
    case = trial % 4
    if case == 0:  # objects on a background of zeros
      x = np.where(x > rng.uniform(0.2, 0.8), x, 0.0)
    elif case == 1:  # plateaus: ties everywhere
      x = np.round(np.where(x > 0.5, x, 0.0) * 8) / 8
    elif case == 2:  # no background at all
      x = x + 0.01
    else:  # a few tiny objects
      x = np.where(x > 0.99, x, 0.0)
    for dynamic in (0.02, 0.1, 0.3):
      expected = morphology.h_maxima(x, dynamic)
      got = instances.h_maxima(x, dynamic)
      assert got.dtype == expected.dtype
      np.testing.assert_array_equal(got, expected, err_msg=f'{trial} {dynamic}')
