"""Normalisation is bit-depth and exposure invariant; the reference's is kept by name."""

import cv2
import numpy as np
import pytest
from skimage import filters

from flmiseg.data import preprocess

INVARIANT = ('clahe_zscore', 'clahe_unit', 'percentile', 'zscore')


def _cells(size=96, peak=235, seed=0) -> np.ndarray:
  """uint8 image of two bright blobs and a dim one on a noisy background, max `peak`."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  image = (20 + 150 * (((yy - 30) ** 2 + (xx - 40) ** 2) < 200)
           + 60 * (((yy - 70) ** 2 + (xx - 60) ** 2) < 300) + rng.normal(0, 8, (size, size)))
  return np.clip(np.round(image), 0, peak).astype(np.uint8)


def _containers(u8: np.ndarray) -> dict:
  """The same intensities as cameras and converters store them."""
  return {
      'uint16': u8.astype(np.uint16),  # 8-bit data in a 16-bit file
      'uint16_x16': u8.astype(np.uint16) * 16,  # the 12-bit range in 16 bits
      'float_unit': u8.astype(np.float32) / 255,  # float in [0, 1]
      'float_counts': u8.astype(np.float32) * 12.5 + 100,  # float camera counts
  }


@pytest.mark.parametrize('method', INVARIANT)
def test_same_intensities_give_the_same_input_in_every_container(method):
  u8 = _cells()
  expected = preprocess.normalize(u8, method)
  for name, image in _containers(u8).items():
    got = preprocess.normalize(image, method)
    assert got.dtype == np.float32 and got.shape == u8.shape
    # CLAHE sees identical 8-bit images (exact); the others differ by float rounding only.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('method', INVARIANT)
def test_a_darker_exposure_gives_nearly_the_same_input(method):
  u8 = _cells()
  dark = np.round(u8 * 0.3).astype(np.uint8)  # 0.3x the light, same dtype: 71 levels left
  a, b = preprocess.normalize(u8, method), preprocess.normalize(dark, method)
  assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
  # Otsu's threshold finds the blobs in both.
  yy, xx = np.mgrid[:96, :96]
  blobs = (((yy - 30) ** 2 + (xx - 40) ** 2) < 200) | (((yy - 70) ** 2 + (xx - 60) ** 2) < 300)
  for x in (a, b):
    found = x > filters.threshold_otsu(x)
    assert (found & blobs).sum() / (found | blobs).sum() >= 0.88


def test_robust_stretch_maps_percentiles_and_saturates():
  ramp = np.arange(1001, dtype=np.float64).reshape(7, 143)
  lo, hi = preprocess.robust_range(ramp)
  assert (lo, hi) == (10.0, 998.0)  # the 1st and 99.8th percentiles of 0..1000
  stretched = preprocess.stretch_to_uint8(ramp).ravel()
  assert stretched[0] == 0 and stretched[10] == 0 and stretched[998] == 255
  assert stretched[1000] == 255 and stretched[504] == 128  # (504 - 10) / 988 * 255 = 127.5


def test_constant_and_nearly_constant_images():
  constant = np.full((32, 32), 700, np.uint16)
  for method in INVARIANT + ('reference_clahe_zscore',):
    np.testing.assert_array_equal(preprocess.normalize(constant, method), 0.0,
                                  err_msg=method)
  reference = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(constant)
  np.testing.assert_array_equal(preprocess.normalize(constant, 'reference_clahe_unit'),
                                reference.astype(np.float32) / 65535)
  nearly = constant.copy()
  nearly[5, 7] = 701  # both percentiles are 700: the range falls back to min..max
  assert preprocess.robust_range(nearly) == (700.0, 701.0)
  stretched = preprocess.stretch_to_uint8(nearly)
  assert stretched[5, 7] == 255 and stretched.sum() == 255
  # One pixel of 1024 stands out: the z-score is sqrt(1023) there, -1 / sqrt(1023) elsewhere
  # (whatever two levels CLAHE gives), and the percentile method maps 700..701 to 0..1.
  one = np.zeros((32, 32))
  one[5, 7] = 1
  z = np.where(one > 0, np.sqrt(1023), -1 / np.sqrt(1023))
  clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(1, 1))  # one 32-px tile
  expected = {'zscore': z, 'clahe_zscore': z, 'percentile': one,
              'clahe_unit': clahe.apply(np.uint8(255 * one)).astype(np.float32) / 255}
  for method in INVARIANT:
    np.testing.assert_allclose(preprocess.normalize(nearly, method), expected[method],
                               rtol=1e-6, atol=1e-7, err_msg=method)


def test_clahe_methods_are_clahe_of_the_stretched_8_bit_image():
  u16 = _cells().astype(np.uint16) * 100 + 1000  # 96x96: a 3x3 grid of 32-pixel tiles
  assert preprocess.clahe_grid((96, 96)) == (3, 3)
  assert preprocess.clahe_grid((256, 256)) == (8, 8)  # the reference's grid on its images
  assert preprocess.clahe_grid((128, 2048)) == (64, 4) and preprocess.clahe_grid((8, 8)) == (1, 1)
  op = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(3, 3))
  expected = op.apply(preprocess.stretch_to_uint8(u16)).astype(np.float32) / 255
  np.testing.assert_array_equal(preprocess.normalize(u16, 'clahe_unit'), expected)
  z = preprocess.normalize(u16, 'clahe_zscore')
  np.testing.assert_allclose(z, (expected - expected.mean()) / expected.std(), atol=1e-5)
  assert preprocess.resolve('auto', 'nucleus') == 'clahe_unit'
  assert preprocess.resolve('auto', 'er') == preprocess.resolve('auto', 'mito') == (
      'clahe_zscore')


def test_reference_methods_divide_by_the_container_maximum():
  """The reference's exact behaviour stays available: CLAHE at the container's bit depth,
  divided by its maximum. The same 8-bit content in a 16-bit file then reaches the network
  with a maximum of about 0.4 instead of 1, which is why it is not the default."""
  u8 = _cells()
  op = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
  np.testing.assert_array_equal(preprocess.normalize(u8, 'reference_clahe_unit'),
                                op.apply(u8).astype(np.float32) / 255)
  u16 = u8.astype(np.uint16)
  np.testing.assert_array_equal(preprocess.normalize(u16, 'reference_clahe_unit'),
                                op.apply(u16).astype(np.float32) / 65535)
  assert preprocess.normalize(u8, 'reference_clahe_unit').max() == 1.0
  assert preprocess.normalize(u16, 'reference_clahe_unit').max() < 0.45


def test_image_stats_of_a_known_image():
  x = np.arange(101, dtype=np.float32)
  stats = preprocess.image_stats(x)
  assert stats == {'p1': 1.0, 'p50': 50.0, 'p99': 99.0, 'mean': 50.0,
                   'std': pytest.approx(np.sqrt(850.0))}


def test_training_prepares_the_same_input_from_any_container(tmp_path):
  """The cached, normalised training images (what the network trains on) are equal too."""
  import tifffile  # pylint: disable=g-import-not-at-top
  from flmiseg.data import dataset, lists  # pylint: disable=g-import-not-at-top
  u8 = _cells()
  mask = (u8 > 100).astype(np.uint8) * 255
  lines = []
  for name, image in {'u8': u8, **_containers(u8)}.items():
    tifffile.imwrite(tmp_path / f'{name}.tif', image)
    tifffile.imwrite(tmp_path / f'{name}_mask.tif', mask)
    lines.append(f'{name}.tif {name}_mask.tif')
  (tmp_path / 'list.txt').write_text('\n'.join(lines) + '\n')
  for kind in ('er', 'nucleus'):
    source = dataset.prepare(lists.load_pairs(tmp_path / 'list.txt'), 'auto', kind,
                             tmp_path / f'cache_{kind}')
    images = [source[i]['image'] for i in range(len(source))]
    for name, image in zip(source.names[1:], images[1:]):
      np.testing.assert_allclose(image, images[0], atol=1e-5, err_msg=f'{kind} {name}')


def test_a_sparse_fields_brightest_structures_map_to_at_most_the_bound():
  rng = np.random.default_rng(0)
  background = rng.normal(100.0, 5.0, (200, 200)).astype(np.float32)
  plain = lambda x: ((x.astype(np.float64) - preprocess.robust_range(x)[0]) /  # noqa: E731
                     np.subtract(*preprocess.robust_range(x)[::-1])).astype(np.float32)
  # A dense image (structures over ~10 % of it) and one hot pixel: the plain stretch.
  dense = background.copy()
  dense[::20, :] += 60.0
  dense[::20, ::20] += 20.0
  dense[7, 9] = 1e5  # a hot pixel, which the 3x3 median does not see
  np.testing.assert_array_equal(preprocess.normalize(dense, 'percentile'), plain(dense))
  # Bright debris over the dense structure: its 99.8th percentile lies far above the noise,
  # so the debris does not compress the structure either.
  dense[100:106, 100:106] = 1000.0
  assert preprocess.noise_sigma(dense) == pytest.approx(5.0, rel=0.05)
  np.testing.assert_array_equal(preprocess.normalize(dense, 'percentile'), plain(dense))
  # One 6x6 object in 40,000 pixels (0.09 %): the 99.8th percentile lies in the noise, so the
  # object (the 99.99th percentile of the median) maps to the bound, the noise far below 1.
  sparse = background.copy()
  sparse[50:56, 70:76] = 1000.0
  out = preprocess.normalize(sparse, 'percentile')
  lo = preprocess.robust_range(sparse)[0]
  np.testing.assert_allclose(out[50:56, 70:76], preprocess.SPARSE_TOP_RATIO, rtol=1e-6)
  np.testing.assert_allclose(out[0, :5], (sparse[0, :5] - lo) / ((1000.0 - lo) / 2.5),
                             rtol=1e-5)
  assert np.percentile(out, 99.8) < 0.1 < np.percentile(plain(sparse), 99.8)


def test_bright_debris_over_a_dense_structure_is_capped():
  # Lines over 5 % of the image, then a 14x14 block of debris (0.49 %): the 99.8th percentile
  # lies in the debris, 10x the lines, so the stretch is 3x the 99th percentile's instead.
  rng = np.random.default_rng(0)
  image = rng.normal(100.0, 5.0, (200, 200)).astype(np.float32)
  image[::20, :] += 60.0
  image[100:114, 100:114] = 1000.0
  lo, p99, p998 = np.percentile(image.astype(np.float64), (1.0, 99.0, 99.8))
  assert p998 == 1000.0 and 150 < p99 < 180
  out = preprocess.normalize(image, 'percentile')
  np.testing.assert_allclose(out, (image - lo) / (preprocess.DEBRIS_RATIO * (p99 - lo)),
                             rtol=1e-5, atol=1e-6)


def _nuclei_with_debris(seed=0, size=256):
  """uint16 (size, size): 12 dim nuclei (+20 over a background of 100, noise 3), 3 bright
  ones (+200, 10x) and 2 debris discs of radius 8 at +2000 (0.6 % of the image, 10x the
  bright nuclei); and the labels (1..12 dim, 13..15 bright, 0 elsewhere)."""
  rng = np.random.default_rng(seed)
  image = np.full((size, size), 100.0)
  labels = np.zeros((size, size), np.int32)
  for k in range(17):
    disc = np.zeros((size, size), np.uint8)
    cv2.circle(disc, (24 + 52 * (k % 5), 24 + 52 * (k // 5)), 14 if k < 15 else 8, 1, -1)
    if k < 15:
      labels[disc > 0] = k + 1
    image[disc > 0] += 20.0 if k < 12 else 200.0 if k < 15 else 2000.0
  image = cv2.GaussianBlur(image, (0, 0), 1.5) + rng.normal(0, 3, image.shape)
  return np.clip(np.round(image), 0, 65535).astype(np.uint16), labels


def _above_background(x, labels):
  """Per nucleus, its median minus the median of the background away from every disc."""
  away = cv2.dilate((labels > 0).astype(np.uint8), np.ones((9, 9))) == 0
  away &= np.asarray(x) < np.percentile(x, 99)  # not the debris
  background = np.median(x[away])
  return np.array([np.median(x[labels == k]) - background for k in range(1, 16)])


def test_dim_nuclei_beside_bright_ones_and_debris_keep_their_contrast():
  """Debris over 0.2 % of the image at 10x the brightest nuclei took the CLAHE methods'
  8-bit stretch: nuclei at a tenth of the brightest kept 0.024 (6 grey levels) above the
  background in 'auto' for nuclei (clahe_unit), the bright ones 0.21. The stretch's top is
  now bounded as the percentile method's is (DEBRIS_RATIO x the 99th percentile's)."""
  image, labels = _nuclei_with_debris()
  unit = _above_background(preprocess.normalize(image, 'auto', 'nucleus'), labels)
  dim, bright = unit[:12], unit[12:]
  assert dim.min() > 0.07 and bright.mean() > 0.38  # before: 0.024 and 0.21
  # The stretch the bound gives: the debris saturates, the nuclei keep their place under it.
  lo, hi = preprocess.clahe_range(image)
  _, p99 = np.percentile(image.astype(np.float64), (50.0, 99.0))
  assert hi == pytest.approx(lo + preprocess.DEBRIS_RATIO * (p99 - lo))
  assert hi < preprocess.robust_range(image)[1] / 2.5  # 726 against 2067
  # The percentile method is linear and float: the dim nuclei keep their ratio to the
  # bright ones (0.1 in the image), however low the debris puts both.
  linear = _above_background(preprocess.normalize(image, 'percentile', 'nucleus'), labels)
  assert linear[:12].mean() / linear[12:].mean() == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize('method', ('clahe_unit', 'clahe_zscore'))
def test_the_debris_bound_is_the_same_in_every_container(method):
  image, _ = _nuclei_with_debris()
  expected = preprocess.normalize(image, method)
  assert preprocess.clahe_range(image)[1] < preprocess.robust_range(image)[1]  # it applies
  for name, other in {'float_unit': image.astype(np.float32) / 65535,
                      'float_counts': image.astype(np.float32) * 12.5 + 100,
                      'uint16_x2': image * np.uint16(2)}.items():
    np.testing.assert_allclose(preprocess.normalize(other, method), expected, rtol=0,
                               atol=1e-5, err_msg=name)


def test_the_debris_bound_leaves_images_without_debris_alone():
  u16 = _cells().astype(np.uint16) * 100 + 1000
  assert preprocess.clahe_range(u16) == preprocess.robust_range(u16)
  image, _ = _nuclei_with_debris()
  image[image > 1000] = 300  # the debris gone: the plain stretch
  assert preprocess.clahe_range(image) == preprocess.robust_range(image)
