"""The object-mask source (config.data.source='object_masks'): <id>/images/<id>.png and
<id>/masks/*.png become label images; overlaps go to the smallest object; bad layouts are
one-line errors naming the file."""

import cv2
import numpy as np
import pytest
import tifffile

from flmiseg.core.errors import UserError
from flmiseg.data import dataset
from flmiseg.data import io
from flmiseg.data import loader
from flmiseg.data import objectmasks
from tests import helpers


def write_sample(root, name, image, objects, rgba=True):
  """DIR/<name>/images/<name>.png (grey stored as RGBA, as the DSB's) and one 0/255 PNG per
  object in DIR/<name>/masks/ (named m0.png, m1.png, ... in the order given)."""
  (root / name / 'images').mkdir(parents=True)
  (root / name / 'masks').mkdir()
  pixels = cv2.merge([image, image, image, np.full_like(image, 255)]) if rgba else image
  cv2.imwrite(str(root / name / 'images' / f'{name}.png'), pixels)
  for i, obj in enumerate(objects):
    cv2.imwrite(str(root / name / 'masks' / f'm{i}.png'), obj.astype(np.uint8) * 255)
  return root / name


def _disc(shape, centre, radius):
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_masks_become_one_label_image_in_file_order(tmp_path):
  image = np.arange(24 * 32, dtype=np.uint16).reshape(24, 32).astype(np.uint8)
  a, b = np.zeros((24, 32), bool), np.zeros((24, 32), bool)
  a[2:6, 3:9] = True
  b[10:20, 15:30] = True
  sample = objectmasks.read_sample(write_sample(tmp_path, 'x', image, [a, b]))
  assert sample.image.name == 'x.png' and [m.name for m in sample.masks] == ['m0.png', 'm1.png']
  labels = objectmasks.label_image(sample)
  assert labels.dtype == np.uint16
  np.testing.assert_array_equal(labels, a * 1 + b * 2)
  # The RGBA image reads as its grey.
  np.testing.assert_array_equal(io.read_image(sample.image), image)


def _merge(*masks):
  return objectmasks.merge(masks[0].shape, [np.flatnonzero(m) for m in masks])


def test_a_contested_pixel_goes_to_the_smallest_object():
  shape = (40, 40)
  big, small = _disc(shape, (20, 20), 12), _disc(shape, (20, 29), 5)
  labels = _merge(big, small)
  assert (labels[small] == 2).all()  # the small disc stays whole, over the big one
  np.testing.assert_array_equal(labels == 1, big & ~small)
  np.testing.assert_array_equal(labels > 0, big | small)  # foreground: the union
  # The order of the files does not matter, only the sizes; labels follow file order.
  labels = _merge(small, big)
  assert (labels[small] == 1).all() and (labels[big & ~small] == 2).all()
  # Equal sizes: the earlier file keeps the shared pixels.
  left, right = np.zeros(shape, bool), np.zeros(shape, bool)
  left[5:10, 5:15], right[5:10, 10:20] = True, True
  labels = _merge(left, right)
  assert (labels[5:10, 10:15] == 1).all() and (labels[5:10, 15:20] == 2).all()


def test_an_object_covered_entirely_by_smaller_ones_gets_no_label():
  shape = (10, 10)
  whole, top, bottom = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
  whole[2:8, 2:8] = True
  top[2:5, 2:8], bottom[5:8, 2:8] = True, True
  labels = _merge(top, whole, bottom)
  assert set(np.unique(labels)) == {0, 1, 2}  # renumbered without the gap
  assert (labels[2:5, 2:8] == 1).all() and (labels[5:8, 2:8] == 2).all()


def test_label_dtype_holds_every_object():
  assert objectmasks.label_dtype(65535) == np.uint16
  assert objectmasks.label_dtype(65536) == np.uint32
  # 65536 one-pixel objects: the last one's label survives the cast.
  labels = objectmasks.merge((256, 256), [np.array([i]) for i in range(65536)])
  assert labels.dtype == np.uint32 and labels[255, 255] == 65536 and labels[0, 0] == 1


@pytest.mark.parametrize('case, message', [
    ('no_masks_folder', r'x/images/x.png: no masks/ folder'),
    ('empty_masks', r'x/masks: empty mask folder \(no mask file for x.png\)'),
    ('other_shape', r'x/masks/m0.png: mask shape \(8, 9\) differs from the image\'s \(8, 8\)'),
    ('blank_mask', r'x/masks/m0.png: the mask has no nonzero pixel'),
    ('no_images', r'x: no images/ folder'),
    ('two_images', r'x/images: expected one image file, found 2'),
])
def test_bad_layouts_are_one_line_errors_naming_the_file(tmp_path, case, message):
  image = np.full((8, 8), 9, np.uint8)
  obj = np.zeros((8, 8), bool)
  obj[2:4, 2:4] = True
  folder = write_sample(tmp_path, 'x', image, [obj])
  mask = folder / 'masks' / 'm0.png'
  if case == 'no_masks_folder':
    mask.unlink()
    (folder / 'masks').rmdir()
  elif case == 'empty_masks':
    mask.unlink()
  elif case == 'other_shape':
    cv2.imwrite(str(mask), np.full((8, 9), 255, np.uint8))
  elif case == 'blank_mask':
    cv2.imwrite(str(mask), np.zeros((8, 8), np.uint8))
  elif case == 'no_images':
    (folder / 'images' / 'x.png').unlink()
    (folder / 'images').rmdir()
  elif case == 'two_images':
    cv2.imwrite(str(folder / 'images' / 'y.png'), image)
  with pytest.raises(UserError, match=message) as raised:
    objectmasks.load_pairs(tmp_path, tmp_path / 'cache')
  assert '\n' not in str(raised.value)


def test_an_empty_dataset_folder_is_an_error(tmp_path):
  with pytest.raises(UserError, match='no sample folders'):
    objectmasks.read_samples(tmp_path)
  with pytest.raises(UserError, match='not a folder'):
    objectmasks.read_samples(tmp_path / 'missing')


def test_label_images_are_merged_once_and_again_when_a_mask_changes(tmp_path):
  image = np.full((16, 16), 50, np.uint8)
  obj = np.zeros((16, 16), bool)
  obj[4:8, 4:8] = True
  folder = write_sample(tmp_path / 'data', 'x', image, [obj, np.roll(obj, 6, axis=1)])
  cache = tmp_path / 'cache'
  (pair,) = objectmasks.load_pairs(tmp_path / 'data', cache)
  assert pair.mask.parent == cache and pair.origin == str(folder)
  np.testing.assert_array_equal(tifffile.imread(pair.mask), obj * 1 + np.roll(obj, 6, 1) * 2)
  stamp = pair.mask.stat().st_mtime_ns
  assert objectmasks.load_pairs(tmp_path / 'data', cache)[0].mask.stat().st_mtime_ns == stamp
  cv2.imwrite(str(folder / 'masks' / 'm1.png'), np.roll(obj, 8, axis=0).astype(np.uint8) * 255)
  (again,) = objectmasks.load_pairs(tmp_path / 'data', cache)
  assert again.mask != pair.mask
  np.testing.assert_array_equal(tifffile.imread(again.mask), obj * 1 + np.roll(obj, 8, 0) * 2)


def _object_dataset(root, count, seed=0):
  rng = np.random.default_rng(seed)
  for i in range(count):
    image = rng.integers(0, 40, (32, 32), dtype=np.uint8)
    objects = [_disc((32, 32), (8 + 16 * (k // 2), 8 + 16 * (k % 2)), 5) for k in range(4)]
    for o in objects:
      image[o] = 200
    write_sample(root, f'img{i}', image, objects)
  return root


def test_the_source_trains_validates_and_tests_on_label_images(tmp_path):
  data = tmp_path / 'data'
  _object_dataset(data / 'train', 4)
  _object_dataset(data / 'val', 2, seed=1)
  _object_dataset(data / 'test', 2, seed=2)
  config = helpers.tiny_config(data, **{'data.source': 'object_masks', 'data.kind': 'nucleus',
                                        'data.train_list': str(data / 'train'),
                                        'data.val_list': str(data / 'val'),
                                        'data.test_list': str(data / 'test')})
  config.model.instance_head = 'distance'
  sets = loader.load(config, tmp_path / 'cache')
  assert (len(sets.train), len(sets.val), len(sets.test)) == (4, 2, 2)  # val_list: no carving
  assert set(sets.val.names) == set(sets.test.names) == {'img0', 'img1'}
  for source in (sets.train, sets.val, sets.test):
    assert source.has_labels
    assert set(np.unique(source.label_image(0))) == {0, 1, 2, 3, 4}
  assert sets.train.distance and not sets.val.distance  # instance targets: training only
  # Without val_list, validation is carved out of the training folder as for lists.
  config.data.val_list = ''
  sets = loader.load(config, tmp_path / 'cache')
  assert (len(sets.train), len(sets.val)) == (3, 1)


def test_object_masks_source_needs_its_train_folder(tmp_path):
  config = helpers.tiny_config(tmp_path, **{'data.source': 'object_masks',
                                            'data.train_list': ''})
  with pytest.raises(UserError, match='source=object_masks needs config.data.train_list '
                     r'\(a folder of <id>/images/'):
    loader.load(config, tmp_path / 'cache')


def test_prepare_keeps_the_merged_labels(tmp_path):
  _object_dataset(tmp_path / 'd', 1)
  pairs = objectmasks.load_pairs(tmp_path / 'd', tmp_path / 'cache')
  source = dataset.prepare(pairs, 'percentile', 'nucleus', tmp_path / 'cache')
  np.testing.assert_array_equal(source.label_image(0), tifffile.imread(pairs[0].mask))
  assert source[0]['mask'].sum() == sum(_disc((32, 32), (8, 8), 5).sum() for _ in range(4))
