"""--mode=predict: tiling arithmetic, blending, inputs/outputs, and refusals."""

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
import tifffile

from flmiseg.inference import tiling
from flmiseg.objects import instances
from flmiseg.cli import predict
from flmiseg.data import io
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.core.errors import UserError


@pytest.fixture
def trained(tiny_run):
  return tiny_run  # conftest.py: a tiny U-Net trained once per session


def test_tile_starts_cover_evenly():
  assert tiling.tile_starts(300, 128, 0.25) == [0, 86, 172]
  assert tiling.tile_starts(128, 128, 0.25) == [0]
  assert tiling.tile_starts(50, 128, 0.25) == [0]
  assert tiling.tile_starts(200, 100, 0.0) == [0, 100]
  starts = tiling.tile_starts(517, 64, 0.5)
  assert starts[0] == 0 and starts[-1] == 517 - 64
  assert max(np.diff(starts)) <= 32  # never less overlap than asked


def test_gaussian_weight_shape_and_falloff():
  w = tiling.gaussian_weight(64)
  assert w.shape == (64, 64) and w.dtype == np.float32
  np.testing.assert_array_equal(w, w.T)
  np.testing.assert_array_equal(w, w[::-1, ::-1])
  # Largest at the 4 centre pixels, smallest in the corners: exp(-(31.5 / 8)^2) > 0 of the peak.
  assert w[31, 31] == w[32, 32] == w.max() and w[0, 0] == w[63, 63] == w.min()
  np.testing.assert_allclose(w[0, 0] / w[31, 31],
                             np.exp(-(31.5 / 8) ** 2) / np.exp(-(0.5 / 8) ** 2), rtol=1e-5)
  # An edge pixel weighs exp(-8 ((t - 1) / t)^2) of the centre (sigma = t / 8).
  expected = np.exp(-0.5 * (31.5 / 8) ** 2) / np.exp(-0.5 * (0.5 / 8) ** 2)
  np.testing.assert_allclose(w[0, 31] / w[31, 31], expected, rtol=1e-5)


def _sigmoid(tiles):
  return 1 / (1 + np.exp(-tiles))


def test_sliding_window_equals_whole_image_for_pointwise_model():
  image = np.random.default_rng(0).normal(size=(300, 517)).astype(np.float32)
  tiled = tiling.sliding_window(_sigmoid, image, tile=64, overlap=0.25, batch_size=8)
  assert tiled.shape == (300, 517, 1)
  np.testing.assert_allclose(tiled[..., 0], _sigmoid(image), rtol=0, atol=1e-6)


def test_a_short_last_batch_holds_only_its_tiles_when_padding_would_waste_much():
  seen = []
  def probs_of(tiles):
    seen.append(len(tiles))
    return _sigmoid(tiles)
  rng = np.random.default_rng(2)
  for side, expected in ((256, [8, 2]), (1024, [8] * 16)):  # 9 tiles; 121 tiles
    image = rng.normal(size=(side, side)).astype(np.float32)
    padded = tiling.sliding_window(probs_of, image, tile=128, overlap=0.25, batch_size=8)
    seen.clear()
    trimmed = tiling.sliding_window(probs_of, image, tile=128, overlap=0.25, batch_size=8,
                                       batch_multiple=2)
    assert seen == expected, side
    np.testing.assert_array_equal(trimmed, padded)


def test_an_image_smaller_than_a_tile_is_padded_by_reflection():
  image = np.random.default_rng(1).normal(size=(20, 30)).astype(np.float32)
  seen = []
  def probs_of(tiles):
    seen.append(tiles.copy())
    return _sigmoid(tiles)
  out = tiling.sliding_window(probs_of, image, tile=32, overlap=0.25, batch_size=1)
  assert len(seen) == 1 and seen[0].shape == (1, 32, 32, 1)
  tile = seen[0][0, ..., 0]
  np.testing.assert_array_equal(tile[:20, :30], image)
  np.testing.assert_array_equal(tile[20:, :30], image[18:6:-1])  # mirrored, edge row once
  np.testing.assert_array_equal(tile[:20, 30:], image[:, 28:26:-1])
  np.testing.assert_allclose(out[..., 0], _sigmoid(image), rtol=0, atol=1e-6)


def test_sliding_window_exact_away_from_tile_seams():
  """A 3x3 mean filter (zero padding) tiled equals the whole-image filter except within one
  pixel of a tile's inner edge, and there it differs only by the blending's tiny weight."""
  image = np.random.default_rng(1).normal(size=(150, 203)).astype(np.float32)

  def box(tiles):
    return ndimage.uniform_filter(tiles, size=(1, 3, 3, 1), mode='constant')

  whole = box(image[None, ..., None])[0, ..., 0]
  tile = 48
  tiled = tiling.sliding_window(box, image, tile=tile, overlap=0.25, batch_size=4)[..., 0]
  seam = np.zeros(image.shape, bool)  # pixels within 1 px of an inner tile edge
  ys, xs = tiling.tile_starts(150, tile, 0.25), tiling.tile_starts(203, tile, 0.25)
  for y in ys:
    for x in xs:
      if y > 0: seam[y:y + 1, x:x + tile] = True
      if y + tile < 150: seam[y + tile - 1:y + tile, x:x + tile] = True
      if x > 0: seam[y:y + tile, x:x + 1] = True
      if x + tile < 203: seam[y:y + tile, x + tile - 1:x + tile] = True
  np.testing.assert_allclose(tiled[~seam], whole[~seam], rtol=0, atol=1e-5)
  assert seam.any() and np.abs(tiled - whole)[seam].max() < 2e-2
  assert np.abs(tiled - whole)[seam].mean() < 5e-3


def test_dihedral_inverse_and_group():
  x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  seen = set()
  for k in range(8):
    y = tiling.dihedral(x, k)
    np.testing.assert_array_equal(tiling.dihedral(y, k, inverse=True), x)
    seen.add(np.asarray(y).tobytes())
  assert len(seen) == 8


def test_connected_components_min_size():
  mask = np.zeros((20, 20), bool)
  mask[1:4, 1:4] = True  # 9 px
  mask[10:12, 10:11] = True  # 2 px: removed with min_size 3
  mask[15:19, 5:9] = True  # 16 px
  mask[4, 4] = True  # diagonal neighbour of the first: joins it (8-connected)
  labels = instances.connected_components(mask, min_size=3)
  assert labels.dtype == np.uint16 and labels.max() == 2
  assert labels[1, 1] == labels[4, 4] == 1 and labels[16, 6] == 2 and labels[10, 10] == 0


def _options(tmp_path, **kw):
  return predict.Options(input=str(kw.pop('input')), output=str(kw.pop('output')), **kw)


def test_a_model_trained_on_one_channel_predicts_that_channel_by_default(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.data.channel = 1  # as if trained with --config.data.channel=1
  rng = np.random.default_rng(3)
  two = rng.integers(0, 60, size=(2, 40, 50)).astype(np.uint8)
  two[1, 10:20, 10:30] = 220
  src = tmp_path / 'in'
  src.mkdir()
  io.write_tiff(src / 'two.tif', two, axes='CYX')
  tifffile.imwrite(src / 'plane.tif', two[1])  # one channel: predicted as it is
  predict.run(config, workdir, _options(tmp_path, input=src, output=tmp_path / 'out',
                                        save_prob=True))
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'out' / 'two_prob.tif'),
                                tifffile.imread(tmp_path / 'out' / 'plane_prob.tif'))
  predict.run(config, workdir, _options(tmp_path, input=src / 'two.tif', channel=0,
                                        output=tmp_path / 'out0', save_prob=True))
  assert not np.array_equal(tifffile.imread(tmp_path / 'out0' / 'two_prob.tif'),
                            tifffile.imread(tmp_path / 'out' / 'two_prob.tif'))
  config.data.channel = 2
  with pytest.raises(UserError, match=r'two.tif: 2 channel\(s\), but the model was trained on '
                     r'channel 2 \(config.data.channel\); choose one with --channel=N$'):
    predict.run(config, workdir, _options(tmp_path, input=src / 'two.tif',
                                          output=tmp_path / 'out2'))
  assert not (tmp_path / 'out2').exists()


def test_predict_any_size_and_stacks(trained, tmp_path):
  config, workdir = trained
  rng = np.random.default_rng(0)
  src = tmp_path / 'in'
  src.mkdir()
  big = rng.integers(0, 4000, size=(2048, 2048), dtype=np.uint16)
  big[500:900, 700:1000] += 30000
  tifffile.imwrite(src / 'big.tif', big)
  odd = rng.integers(0, 60, size=(300, 517), dtype=np.uint8)
  odd[100:150, 200:260] = 220
  cv2.imwrite(str(src / 'odd.png'), odd)
  stack = rng.integers(0, 4000, size=(5, 40, 70), dtype=np.uint16)
  tifffile.imwrite(src / 'stack.tif', stack)
  (src / 'notes.txt').write_text('not an image\n')
  out = tmp_path / 'out'
  result = predict.run(config, workdir, _options(
      tmp_path, input=src, output=out, tile=128, save_prob=True, instances=True))
  assert sorted(result['written']) == ['big', 'odd', 'stack']
  assert len(result['skipped']) == 1 and 'notes.txt' in result['skipped'][0]
  for name, raw in (('big', big), ('odd', odd), ('stack', stack)):
    mask = tifffile.imread(out / f'{name}_mask.tif')
    assert mask.shape == raw.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    prob = tifffile.imread(out / f'{name}_prob.tif')
    assert prob.shape == raw.shape and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))
    np.testing.assert_array_equal(mask == 255, prob > result['threshold'])
    labels = tifffile.imread(out / f'{name}_instances.tif')
    assert labels.shape == raw.shape and labels.dtype == np.uint16
    view = cv2.imread(str(out / f'{name}_overlay.png'), cv2.IMREAD_UNCHANGED)
    assert view.shape == raw.shape[-2:] + (3,)
  assert sorted(p.name for p in src.iterdir()) == ['big.tif', 'notes.txt', 'odd.png',
                                                   'stack.tif']


def test_predict_tta_is_the_mean_over_the_8_flips_and_rotations(trained, tmp_path):
  config, workdir = trained
  # One 32x32 tile (the crop size), so each view of the image is one whole tile too.
  image = np.random.default_rng(2).integers(0, 9000, (32, 32), np.uint16)
  views = [np.rot90(np.fliplr(image) if flip else image, turns)
           for flip in (False, True) for turns in range(4)]
  src = tmp_path / 'views'
  src.mkdir()
  for k, view in enumerate(views):
    tifffile.imwrite(src / f'view{k}.tif', np.ascontiguousarray(view))
  predict.run(config, workdir, _options(tmp_path, input=src, output=tmp_path / 'a',
                                        save_prob=True))
  tifffile.imwrite(tmp_path / 'one.tif', image)
  predict.run(config, workdir, _options(tmp_path, input=tmp_path / 'one.tif',
                                        output=tmp_path / 'b', save_prob=True, tta=True))
  undone = []  # each view's plain prediction, turned and flipped back
  for k in range(8):
    prob = np.rot90(tifffile.imread(tmp_path / 'a' / f'view{k}_prob.tif'), -(k % 4))
    undone.append(np.fliplr(prob) if k >= 4 else prob)
  tta = tifffile.imread(tmp_path / 'b' / 'one_prob.tif')
  assert tta.shape == image.shape and tta.dtype == np.float32
  np.testing.assert_allclose(tta, np.mean(undone, axis=0), rtol=0, atol=1e-6)
  assert not np.allclose(tta, undone[0], atol=1e-3)  # a random-ish net is not symmetric


def test_nan_and_inf_pixels_are_no_data_and_background_in_the_mask(trained, tmp_path,
                                                                    caplog):
  """A 32-bit image with NaN where it has no data (as ImageJ writes it): those pixels take
  the image mirrored at the nearest pixel with data for the network and are 0 in every
  output; the rest is exactly the prediction of the filled image."""
  config, workdir = trained
  image = np.random.default_rng(5).normal(1000, 300, (40, 52)).astype(np.float32)
  image[10:20, 10:30] += 20000  # an object
  holes = image.copy()
  holes[25:35, 5:45] = np.nan
  holes[0, 0], holes[1, :3] = np.inf, -np.inf
  missing = ~np.isfinite(holes)
  src = tmp_path / 'in'
  src.mkdir()
  tifffile.imwrite(src / 'holes.tif', holes)
  repaired, found, _ = preprocess.repair(holes[None], 'holes.tif')
  np.testing.assert_array_equal(found[0], missing)
  np.testing.assert_array_equal(repaired[0][~missing], image[~missing])
  # Row 25 lies next to row 24, row 34 next to row 35: mirrored, they take rows 23 and 36.
  np.testing.assert_array_equal(repaired[0, 25, 10:30], image[23, 10:30])
  np.testing.assert_array_equal(repaired[0, 34, 10:30], image[36, 10:30])
  tifffile.imwrite(src / 'filled.tif', repaired[0])
  out = tmp_path / 'out'
  predict.run(config, workdir, _options(tmp_path, input=src, output=out, save_prob=True,
                                        instances=True))
  assert '404 NaN or inf pixel(s) read as no data: background in the mask' in caplog.text
  prob = {n: tifffile.imread(out / f'{n}_prob.tif') for n in ('holes', 'filled')}
  np.testing.assert_array_equal(prob['holes'][~missing], prob['filled'][~missing])
  assert np.all(prob['holes'][missing] == 0) and prob['filled'][missing].max() > 0
  for kind in ('mask', 'instances'):
    assert not tifffile.imread(out / f'holes_{kind}.tif')[missing].any()
  tifffile.imwrite(tmp_path / 'void.tif', np.full((8, 9), np.nan, np.float32))
  with pytest.raises(UserError, match=r'void.tif: no pixel of the image \(or of one of its '
                     r'planes\) is a finite number \(all NaN or inf\)$'):
    predict.run(config, workdir, _options(tmp_path, input=tmp_path / 'void.tif',
                                          output=tmp_path / 'o2'))
  assert not (tmp_path / 'o2').exists()


def test_predict_refuses_to_overwrite_and_mix_with_inputs(trained, tmp_path):
  config, workdir = trained
  src = tmp_path / 'in'
  src.mkdir()
  tifffile.imwrite(src / 'a.tif', np.full((40, 40), 7, np.uint16))  # constant: still works
  with pytest.raises(UserError, match='folder of the input images'):
    predict.run(config, workdir, _options(tmp_path, input=src, output=src))
  out = tmp_path / 'out'
  predict.run(config, workdir, _options(tmp_path, input=src / 'a.tif', output=out))
  before = (out / 'a_mask.tif').read_bytes()
  (out / 'a_mask.tif').write_bytes(b'user data')
  with pytest.raises(UserError, match='a_mask.tif exists'):
    predict.run(config, workdir, _options(tmp_path, input=src / 'a.tif', output=out))
  assert (out / 'a_mask.tif').read_bytes() == b'user data'
  predict.run(config, workdir, _options(tmp_path, input=src / 'a.tif', output=out,
                                        overwrite=True))
  assert (out / 'a_mask.tif').read_bytes() == before


def test_predict_reports_unreadable_images_after_writing_the_rest(trained, tmp_path):
  config, workdir = trained
  src = tmp_path / 'in'
  src.mkdir()
  tifffile.imwrite(src / 'good.tif', np.random.default_rng(3).integers(0, 900, (33, 40),
                                                                       np.uint16))
  (src / 'broken.tif').write_bytes(b'II*\x00garbage')
  with pytest.raises(UserError, match=r'1 of 2 image\(s\) could not be predicted.*broken.tif'):
    predict.run(config, workdir, _options(tmp_path, input=src, output=tmp_path / 'out'))
  assert (tmp_path / 'out' / 'good_mask.tif').exists()


def test_predict_names_and_globs(tmp_path):
  for name in ('a.tif', 'a.png', 'b.tif'):
    (tmp_path / name).write_bytes(b'x')
  images, skipped = predict.find_inputs(str(tmp_path / '*.tif'))
  assert [p.name for p in images] == ['a.tif', 'b.tif'] and not skipped
  images, _ = predict.find_inputs(str(tmp_path))
  assert predict.output_names(images) == ['a_png', 'a_tif', 'b']
  with pytest.raises(UserError, match='no file matches'):
    predict.find_inputs(str(tmp_path / '*.jpg'))
  with pytest.raises(UserError, match='no such file'):
    predict.find_inputs(str(tmp_path / 'missing.tif'))


def _camera_image(seed: int = 0) -> np.ndarray:
  """A 16-bit camera image (offset 100, haze near 1,500) of blurred tubes, 96x120."""
  rng = np.random.default_rng(seed)
  signal = np.zeros((96, 120), np.float32)
  for y in range(8, 96, 16):
    signal[y:y + 2, 10:110] = 1.0
  signal = cv2.GaussianBlur(signal, (0, 0), 1.5) * 3000 + 1400
  return np.round(rng.poisson(signal) + 100.0).astype(np.uint16)


def test_hot_pixels_take_their_neighbourhoods_median_and_nothing_else_changes():
  image = _camera_image()
  hot = image.copy()
  spots = [(5, 7), (40, 61), (41, 61), (90, 3), (0, 119)]  # one pair: a cosmic-ray hit
  for y, x in spots:
    hot[y, x] = 65535
  planes, missing, notes = preprocess.repair(hot[None], 'hot.tif')
  assert missing is None and notes == [] and planes.dtype == np.uint16
  median = cv2.medianBlur(hot.astype(np.float32), 3)
  changed = np.argwhere(planes[0] != hot)
  assert sorted(map(tuple, changed)) == sorted(spots)
  for y, x in spots:
    assert planes[0, y, x] == median[y, x] < 6000
  # The clean image, bright structures included, is left as it is, bit for bit.
  np.testing.assert_array_equal(preprocess.repair(image[None], 'clean.tif')[0][0], image)


def test_a_fill_value_border_is_no_data_but_a_dark_background_is_not():
  image = _camera_image()
  border = image.copy()
  border[:, :30] = 0  # what stitching or registration leaves
  planes, missing, notes = preprocess.repair(border[None], 'b.tif')
  expected = np.zeros(border.shape, bool)
  expected[:, :30] = True
  np.testing.assert_array_equal(missing[0], expected)
  # Filled with the image mirrored at column 30: column 29 takes column 31, column 0 column 60.
  np.testing.assert_array_equal(planes[0, :, :30], image[:, 60:30:-1])
  np.testing.assert_array_equal(planes[0, :, 30:], image[:, 30:])
  assert notes == ['b.tif: 2,880 pixel(s) at the image\'s lowest value, far below its other '
                   'pixels, read as no data (a stitching or registration border?): background '
                   'in the mask']
  # Zeros that are the background (a confocal's clipped offset; a background-subtracted
  # image) have other pixels just above them: data.
  subtracted = np.clip(image.astype(np.int32) - 1550, 0, None).astype(np.uint16)
  assert (subtracted == 0).mean() > 0.3
  planes, missing, notes = preprocess.repair(subtracted[None], 's.tif')
  assert missing is None and notes == []
  np.testing.assert_array_equal(planes[0], subtracted)
  # Nor is the flat black background of an image without noise (sharp rendered discs): the
  # rule is for cameras, whose pixels other than the fill are noisy. (Read as no data, that
  # background took the other pixels' value and the shipped nucleus model found nothing.)
  discs = np.zeros((96, 120), np.uint8)
  for y, x in [(20, 20), (30, 80), (70, 50)]:
    cv2.circle(discs, (x, y), 12, 200, -1)
  planes, missing, notes = preprocess.repair(discs[None], 'r.tif')
  assert missing is None and notes == []
  np.testing.assert_array_equal(planes[0], discs)
  # Nor are dark objects on a bright background whose cores clip at 0 (a simulated nucleus
  # image, inverted; its brightest nuclei were saturated): the pixels around the clipped ones
  # are dark too. (A test of the whole plane, not of those neighbours, read 503 pixels here
  # as no data, and cost the shipped nucleus model 0.012 IoU on inverted images.)
  image, _ = simulate.simulate('nucleus', 256, synthetic.image_rng(1000, 'test', 0))
  dark = 255 - image
  assert (dark == 0).sum() == 503
  planes, missing, notes = preprocess.repair(dark[None], 'd.tif')
  assert missing is None and notes == []
