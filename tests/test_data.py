"""Data layer: list parsing, image reading, mask rules, preprocessing, augmentation,
eval padding and iterator checkpointing."""

import itertools

import cv2
import numpy as np
import pytest
import tifffile

from flmiseg.data import dataset
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import loader
from flmiseg.data import pipeline
from flmiseg.data import preprocess
from flmiseg.core.errors import UserError
from tests import helpers


def _write_pair(folder, name, image, mask, suffix='.tif'):
  (folder / 'images').mkdir(parents=True, exist_ok=True)
  (folder / 'masks').mkdir(parents=True, exist_ok=True)
  paths = folder / 'images' / f'{name}{suffix}', folder / 'masks' / f'{name}{suffix}'
  for path, array in zip(paths, (image, mask)):
    if suffix == '.png':
      cv2.imwrite(str(path), array)
    else:
      tifffile.imwrite(path, array)
  return paths


@pytest.fixture
def pair_dir(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(3):
    image = rng.integers(0, 65535, (32, 40), dtype=np.uint16)
    mask = np.zeros((32, 40), np.uint8)
    mask[5:15, 5 + i:20] = 255
    _write_pair(tmp_path / 'data', f'img{i}', image, mask)
  return tmp_path / 'data'


def test_list_relative_absolute_comments(pair_dir, tmp_path):
  absolute = (pair_dir / 'images' / 'img1.tif').resolve()
  text = ('# a comment\n\nimages/img0.tif masks/img0.tif\n'
          f'{absolute} {(pair_dir / "masks" / "img1.tif").resolve()}\n'
          '  images/img2.tif\tmasks/img2.tif  \n')
  (pair_dir / 'list.txt').write_text(text)
  pairs = lists.read_list(pair_dir / 'list.txt')
  assert [p.image.name for p in pairs] == ['img0.tif', 'img1.tif', 'img2.tif']
  assert pairs[0].image == (pair_dir / 'images' / 'img0.tif').resolve()
  assert pairs[0].origin.endswith('list.txt line 3')


def test_list_paths_with_spaces(tmp_path):
  folder = tmp_path / 'my data'
  _write_pair(folder, 'a b', np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8))
  (folder / 'q.txt').write_text('"images/a b.tif" "masks/a b.tif"\n')
  (folder / 't.txt').write_text('images/a b.tif\tmasks/a b.tif\n')
  for name in ('q.txt', 't.txt'):
    assert lists.read_list(folder / name)[0].image.name == 'a b.tif'


@pytest.mark.parametrize('text, message', [
    ('images/img0.tif masks/img0.tif\nimages/img0.tif masks/img0.tif\n', 'duplicate entry'),
    ('images/img0.tif\n', 'expected two paths'),
    ('# nothing\n\n', 'list is empty'),
    ('images/nope.tif masks/img0.tif\n', 'image file not found'),
])
def test_list_errors_name_file_and_line(pair_dir, text, message):
  (pair_dir / 'bad.txt').write_text(text)
  with pytest.raises(UserError, match=message) as e:
    lists.read_list(pair_dir / 'bad.txt')
  assert 'bad.txt' in str(e.value)


def test_folder_format(pair_dir):
  pairs = lists.load_pairs(pair_dir)
  assert [p.mask.name for p in pairs] == ['img0.tif', 'img1.tif', 'img2.tif']


def test_read_8_16_bit_tiff_and_png(tmp_path):
  a8 = np.arange(64, dtype=np.uint8).reshape(8, 8)
  a16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
  tifffile.imwrite(tmp_path / 'a8.tif', a8)
  tifffile.imwrite(tmp_path / 'a16.tif', a16)
  cv2.imwrite(str(tmp_path / 'a8.png'), a8)
  cv2.imwrite(str(tmp_path / 'a16.png'), a16)
  for name, expected in (('a8.tif', a8), ('a16.tif', a16), ('a8.png', a8), ('a16.png', a16)):
    got = io.read_image(tmp_path / name)
    assert got.dtype == expected.dtype and np.array_equal(got, expected), name


def test_rgb_becomes_one_channel(tmp_path):
  rgb = np.zeros((8, 8, 3), np.uint8)
  rgb[..., 1] = 100  # pure green in RGB order: its green channel, unscaled
  rgb[..., 0] = 7  # ... and with red: the luminance
  rgb[0, 0, 0] = 0
  cv2.imwrite(str(tmp_path / 'rgb.png'), rgb[..., ::-1])  # OpenCV writes BGR
  got = io.read_image(tmp_path / 'rgb.png')
  assert got.shape == (8, 8) and got[0, 0] == round(0.587 * 100)
  assert np.all(got.ravel()[1:] == round(0.299 * 7 + 0.587 * 100))
  rgb[..., 0] = 0
  cv2.imwrite(str(tmp_path / 'green.png'), rgb[..., ::-1])
  assert np.all(io.read_image(tmp_path / 'green.png') == 100)


def test_a_colour_coded_mask_keeps_every_object_apart(tmp_path):
  rgb = np.zeros((12, 12, 3), np.uint8)
  rgb[1:4, 1:4] = (255, 0, 0)
  rgb[1:4, 6:9] = (0, 255, 0)
  rgb[6:9, 1:4] = (0, 0, 2)  # nearly black: its luminance rounds to 0
  rgb[6:9, 6:9] = (76, 0, 0)  # dark red
  cv2.imwrite(str(tmp_path / 'colours.png'), rgb[..., ::-1])  # OpenCV writes BGR
  values = io.read_mask_values(tmp_path / 'colours.png')
  assert values.dtype == np.uint16 and sorted(np.unique(values)) == [0, 1, 2, 3, 4]
  for box in ((1, 1), (1, 6), (6, 1), (6, 6)):  # one label per object, one object per label
    label = values[box]
    assert label > 0 and np.array_equal(values == label, np.all(rgb == rgb[box], axis=-1))
  np.testing.assert_array_equal(io.read_mask(tmp_path / 'colours.png'), rgb.any(axis=-1))
  # Grey and single-colour masks keep their values (an ignore value among them).
  values = np.array([[0, 255, 2], [2, 0, 255]], np.uint8)
  for name, colours in (('grey', [values] * 3), ('red', [values, 0 * values, 0 * values])):
    cv2.imwrite(str(tmp_path / f'{name}.png'), np.stack(colours[::-1], -1))
    np.testing.assert_array_equal(io.read_mask_values(tmp_path / f'{name}.png'), values)
    np.testing.assert_array_equal(io.read_mask(tmp_path / f'{name}.png', ignore_value=2),
                                  [[0, 1, 255], [255, 0, 1]])


def test_mask_rules(tmp_path):
  labels = np.array([[0, 255, 1], [7, 0, 65535]], np.uint16)
  tifffile.imwrite(tmp_path / 'm.tif', labels)
  assert np.array_equal(io.read_mask(tmp_path / 'm.tif'), [[0, 1, 1], [1, 0, 1]])


@pytest.mark.parametrize('content, message', [
    (b'', 'file is empty'),
    (b'II*\x00garbage-not-a-tiff', 'cannot read image'),
])
def test_bad_image_files(tmp_path, content, message):
  (tmp_path / 'bad.tif').write_bytes(content)
  with pytest.raises(UserError, match=message) as e:
    io.read_image(tmp_path / 'bad.tif')
  assert 'bad.tif' in str(e.value)


def test_truncated_tiff(tmp_path):
  tifffile.imwrite(tmp_path / 'full.tif', np.ones((64, 64), np.uint16))
  data = (tmp_path / 'full.tif').read_bytes()
  (tmp_path / 'cut.tif').write_bytes(data[:len(data) // 2])
  with pytest.raises(UserError, match='cut.tif'):
    io.read_image(tmp_path / 'cut.tif')


def test_nan_and_3d_rejected(tmp_path):
  bad = np.ones((8, 8), np.float32)
  bad[2, 2] = np.nan
  tifffile.imwrite(tmp_path / 'nan.tif', bad)
  tifffile.imwrite(tmp_path / 'stack.tif', np.ones((3, 8, 8), np.uint16),
                   photometric='minisblack')
  with pytest.raises(UserError, match='NaN'):
    io.read_image(tmp_path / 'nan.tif')
  with pytest.raises(UserError, match='expected a 2-D image'):
    io.read_image(tmp_path / 'stack.tif')
  assert io.read_image(tmp_path / 'stack.tif', allow_stack=True).shape == (3, 8, 8)


def test_preprocessing_values():
  image = np.array([[0, 100], [200, 300]], np.uint16)
  z = preprocess.zscore(image)
  expected = (image - 150.0) / np.std([0, 100, 200, 300])
  np.testing.assert_allclose(z, expected, rtol=1e-6)
  p = preprocess.percentile_normalize(np.arange(1001, dtype=np.float32))
  np.testing.assert_allclose(p[[10, 998]], [0.0, 1.0], atol=1e-6)
  # A constant image must not divide by zero: it maps to zeros.
  for method in ('clahe_zscore', 'clahe_unit', 'percentile', 'zscore'):
    out = preprocess.normalize(np.full((16, 16), 7, np.uint16), method)
    assert out.dtype == np.float32, method
    np.testing.assert_array_equal(out, np.zeros((16, 16)), err_msg=method)
  # CLAHE at 16 bits keeps a ramp increasing overall; unit scaling is OpenCV's CLAHE (2x2
  # tiles of 32 px) of the stretched 8-bit image, divided by 255.
  ramp = np.tile(np.linspace(1000, 50000, 64).astype(np.uint16), (64, 1))
  unit = preprocess.normalize(ramp, 'clahe_unit')
  clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(2, 2))
  expected = clahe.apply(preprocess.stretch_to_uint8(ramp)).astype(np.float32) / 255
  assert unit.dtype == np.float32 and unit.max() == 1.0
  np.testing.assert_array_equal(unit, expected)
  assert unit[:, :16].mean() < unit[:, 24:40].mean() < unit[:, 48:].mean()
  zs = preprocess.normalize(ramp, 'auto', kind='er')
  np.testing.assert_allclose([zs.mean(), zs.std()], [0.0, 1.0], atol=1e-4)


def test_auto_normalization_per_kind():
  assert preprocess.resolve('auto', 'er') == 'clahe_zscore'
  assert preprocess.resolve('auto', 'nucleus') == 'clahe_unit'
  with pytest.raises(ValueError, match='config.data.normalization'):
    preprocess.resolve('magic', 'er')


def test_prepare_caches_and_checks(pair_dir, tmp_path):
  pairs = lists.load_pairs(pair_dir)
  source = dataset.prepare(pairs, 'auto', 'er', tmp_path / 'cache')
  assert len(source) == 3 and source.shapes[0] == (32, 40)
  element = source[1]
  assert element['image'].dtype == np.float32 and set(np.unique(element['mask'])) == {0, 1}
  cached = sorted((tmp_path / 'cache').iterdir())
  again = dataset.prepare(pairs, 'auto', 'er', tmp_path / 'cache')
  assert again.files == source.files and sorted((tmp_path / 'cache').iterdir()) == cached


def test_training_images_are_repaired_as_predict_repairs_them(tmp_path):
  # A camera image (offset 100, noisy haze) with a hot pixel and a stitching border of zeros:
  # the cached image is the repaired one, and the border is left out of loss and metrics.
  rng = np.random.default_rng(0)
  image = (rng.poisson(1500, (32, 40)) + 100).astype(np.uint16)
  image[8:14, 20:30] += 3000  # an object
  image[20, 30] = 65535
  image[:, :8] = 0
  mask = np.zeros((32, 40), np.uint8)
  mask[8:14, 20:30] = 255
  folder = tmp_path / 'd'
  _write_pair(folder, 'x', image, mask)
  (folder / 'l.txt').write_text('images/x.tif masks/x.tif\n')
  source = dataset.prepare(lists.read_list(folder / 'l.txt'), 'percentile', 'er',
                           tmp_path / 'c')
  planes, no_data, _ = preprocess.repair(image[None], 'x.tif')
  assert planes[0, 20, 30] < 2000 and no_data[0, :, :8].all() and not no_data[0, :, 8:].any()
  element = source[0]
  np.testing.assert_array_equal(element['image'], preprocess.normalize(planes[0], 'percentile'))
  np.testing.assert_array_equal(element['ignored'], no_data[0].astype(np.uint8))


def test_prepare_reads_the_configured_channel_and_caches_each_apart(tmp_path):
  rng = np.random.default_rng(0)
  two = rng.integers(0, 4000, (2, 16, 16)).astype(np.uint16)  # CYX: two different stains
  mask = (two[1] > 2000).astype(np.uint8) * 255
  folder = tmp_path / 'd'
  image_path, _ = _write_pair(folder, 'x', two[0], mask)
  io.write_tiff(image_path, two, axes='CYX')
  (folder / 'l.txt').write_text('images/x.tif masks/x.tif\n')
  pairs = lists.read_list(folder / 'l.txt')
  with pytest.raises(UserError, match=r'x.tif: 2 channels .*--config.data.channel=N'):
    dataset.prepare(pairs, 'percentile', 'er', tmp_path / 'c')
  for channel in (1, 0):
    source = dataset.prepare(pairs, 'percentile', 'er', tmp_path / 'c', channel=channel)
    np.testing.assert_array_equal(source[0]['image'],
                                  preprocess.normalize(two[channel], 'percentile', 'er'))
  assert len({p.name.split('_')[0] for p in (tmp_path / 'c').iterdir()}) == 2
  # Through the config: training, validation and test sets read config.data.channel.
  image_path, _ = _write_pair(folder, 'y', two[0], mask)
  io.write_tiff(image_path, two, axes='CYX')
  for name in ('train', 'test'):
    (folder / f'{name}.txt').write_text('images/x.tif masks/x.tif\nimages/y.tif masks/y.tif\n')
  config = helpers.tiny_config(folder, **{'data.channel': 0, 'data.crop_size': 16,
                                          'data.normalization': 'percentile'})
  data = loader.load(config, tmp_path / 'c')
  for source in (data.train, data.val, data.test):
    np.testing.assert_array_equal(source[0]['image'], preprocess.normalize(two[0],
                                                                           'percentile', 'er'))


def test_prepare_shape_mismatch_and_empty_foreground(tmp_path):
  folder = tmp_path / 'd'
  _write_pair(folder, 'x', np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
  (folder / 'l.txt').write_text('images/x.tif masks/x.tif\n')
  with pytest.raises(UserError, match=r'l.txt line 1: image x.tif has shape \(8, 8\)'):
    dataset.prepare(lists.read_list(folder / 'l.txt'), 'auto', 'er', tmp_path / 'c')
  _write_pair(folder, 'x', np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8))
  with pytest.raises(UserError, match='no mask in the set has any foreground'):
    dataset.prepare(lists.read_list(folder / 'l.txt'), 'auto', 'er', tmp_path / 'c')


def test_validation_split_is_seeded_and_disjoint(pair_dir, tmp_path):
  source = dataset.prepare(lists.load_pairs(pair_dir), 'auto', 'er', tmp_path / 'c')
  train, val = dataset.split_validation(source, 0.34, seed=3)
  train2, val2 = dataset.split_validation(source, 0.34, seed=3)
  assert train.files == train2.files and val.files == val2.files
  assert len(val) == 1 and not set(train.files) & set(val.files)
  assert dataset.split_validation(source, 0.0, seed=3)[1] is None


def _source(foreground):
  """A PreparedSource of len(foreground) images (split_validation reads no file)."""
  n = len(foreground)
  return dataset.PreparedSource(
      files=tuple((f'i{k}.npy', f'm{k}.npy') for k in range(n)), shapes=((8, 8),) * n,
      names=tuple(f'crop{k}' for k in range(n)), foreground=tuple(foreground))


def test_a_validation_draw_without_foreground_is_one_warning(caplog):
  order = list(np.random.default_rng(0).permutation(5))
  with caplog.at_level('WARNING'):
    _, val = dataset.split_validation(_source([3] * 5), 0.25, seed=0)
  assert val.names == (f'crop{order[0]}',) and not caplog.records
  # The same draw where that image is empty: the same split, and the user is told why its
  # validation IoU means little.
  foreground = [0 if k == order[0] else 9 for k in range(5)]
  with caplog.at_level('WARNING'):
    _, empty = dataset.split_validation(_source(foreground), 0.25, seed=0)
  assert empty.names == val.names and empty.foreground == (0,)
  assert [r.getMessage() for r in caplog.records] == [
      f'config.data.val_fraction: the 1 validation image(s) drawn (crop{order[0]}) have no '
      'foreground pixel, so validation only rewards finding nothing there; annotate objects '
      'in more images, or draw another split (config.seed)']


def test_dihedral_is_the_group_d4():
  x = np.arange(9).reshape(3, 3)
  images = [pipeline.dihedral(x, k) for k in range(8)]
  assert len({im.tobytes() for im in images}) == 8  # 8 distinct elements
  expected = {np.rot90(f, r).tobytes() for f in (x, x.T) for r in range(4)}
  assert {im.tobytes() for im in images} == expected  # exactly the symmetries of the square
  # closed under composition
  for a, b in itertools.product(range(8), repeat=2):
    composed = pipeline.dihedral(pipeline.dihedral(x, a), b)
    assert any(np.array_equal(composed, im) for im in images)


class _Source:
  """Elements whose image encodes the index, mask a deterministic pattern."""
  def __init__(self, n, hw=(8, 8)):
    self.n, self.shapes = n, ((hw),) * n
  def __len__(self):
    return self.n
  def __getitem__(self, i):
    h, w = self.shapes[i]
    image = (np.arange(h * w).reshape(h, w) + 1000 * i).astype(np.float32)
    return {'image': image, 'mask': (image % 3 == 0).astype(np.uint8), 'index': i}


def test_augmentation_applies_the_same_transform_to_image_and_mask():
  it = iter(pipeline.train_dataset(_Source(5), crop_size=6, global_batch=4, num_steps=4,
                                   seed=0))
  for _ in range(4):
    batch = next(it)
    assert batch['image'].shape == (4, 6, 6, 1) and np.all(batch['valid'] == 1)
    np.testing.assert_array_equal(batch['mask'], (batch['image'] % 3 == 0))


def test_processes_take_contiguous_blocks_of_the_global_batch():
  kw = dict(crop_size=6, global_batch=4, num_steps=5, seed=3)
  whole = list(pipeline.train_dataset(_Source(7), **kw))
  parts = [list(pipeline.train_dataset(_Source(7), process_index=p, process_count=2, **kw))
           for p in range(2)]
  assert len(whole) == len(parts[0]) == len(parts[1]) >= 5
  for step, batch in enumerate(whole):
    for key in ('image', 'mask', 'valid'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])


def test_small_images_are_padded_with_invalid_pixels():
  it = iter(pipeline.train_dataset(_Source(2, (4, 5)), crop_size=6, global_batch=2,
                                   num_steps=1, seed=0, flips=False))
  batch = next(it)
  assert batch['valid'].sum() == 2 * 20
  assert np.all(batch['valid'][:, :4, :5] == 1)


def test_eval_padding_counts_each_image_once():
  source = _Source(5)
  seen = []
  for batch in pipeline.eval_batches(source, global_batch=4):
    # 8x8 images padded to 32x32 (SIZE_MULTIPLE): the image by reflection, the rest 0.
    assert batch['image'].shape == (4, 32, 32, 1)
    for k, index in enumerate(batch['index']):
      if batch['present'][k]:
        image = source[int(index)]['image']
        np.testing.assert_array_equal(batch['image'][k, ..., 0],
                                      np.pad(image, ((0, 24), (0, 24)), mode='reflect'))
        np.testing.assert_array_equal(batch['image'][k, 8:10, 0, 0], image[6:4:-1, 0])
        assert batch['valid'][k, :8, :8].all() and batch['valid'][k].sum() == 64
        assert not batch['mask'][k, 8:].any() and not batch['mask'][k, :, 8:].any()
    seen += [int(i) for i, p in zip(batch['index'], batch['present']) if p]
    assert np.all(batch['image'][batch['present'] == 0] == 0)
  assert seen == [0, 1, 2, 3, 4]
  assert pipeline.eval_shape(_Source(2, (64, 33))) == (64, 64)


def test_iterator_state_restores_the_same_batches():
  make = lambda: iter(pipeline.train_dataset(_Source(7), crop_size=6, global_batch=2,
                                             num_steps=12, seed=5))
  it = make()
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
