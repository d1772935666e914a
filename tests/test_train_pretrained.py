"""The shipped models' experiments (experiments/common.py, experiments/shipped/): the recipes,
the inverted test set, the recipe variants' names, the test sets at another object scale, real
images resized."""

from absl import app
import numpy as np
import pytest
from scipy import ndimage
import tifffile

from experiments import common
from experiments.shipped import pretrained_recipe
from experiments.shipped import pretrained_scale
from experiments.shipped import train_pretrained
from flmiseg.data import lists
from flmiseg.data import simulate
from flmiseg.data import synthetic


def test_recipes_learn_both_contrasts_for_nuclei_only():
  augment = {kind: common.pretrained_config(kind, 10).data.augment
             for kind in ('er', 'mito', 'nucleus')}
  assert augment == {'er': 'all', 'mito': 'all', 'nucleus': 'all,invert'}


def test_recipes_draw_thin_structures_as_annotators_do_unless_told_otherwise():
  masks = {kind: common.pretrained_config(kind, 10).data.synthetic_masks
           for kind in ('er', 'mito', 'nucleus')}
  assert masks == {'er': 'visible', 'mito': 'visible', 'nucleus': 'geometry'}
  first_cycle = common.pretrained_config('er', 6000, masks='geometry')
  assert first_cycle.data.synthetic_masks == 'geometry'


def test_a_further_cycle_starts_from_the_source_at_its_own_learning_rate():
  fresh = common.pretrained_config('er', 3000)
  cycle = common.pretrained_config('er', 3000, 'runs/pretrained/er', 5e-4)
  assert (fresh.train.init_from, fresh.optim.lr) == ('', 2e-3)
  assert (cycle.train.init_from, cycle.optim.lr) == ('runs/pretrained/er', 5e-4)
  cycle.train.init_from, cycle.optim.lr = '', 2e-3
  assert cycle.to_dict() == fresh.to_dict()  # nothing else differs


def test_inverted_pairs_mirror_each_dtype_and_keep_the_masks(tmp_path):
  images = {'a.tif': np.array([[0, 10], [65535, 7]], np.uint16),
            'b.tif': np.array([[0, 255], [3, 9]], np.uint8),
            'c.tif': np.array([[-1.5, 2.0], [0.5, 1.0]], np.float32)}
  pairs = []
  for name, image in images.items():
    tifffile.imwrite(tmp_path / name, image)
    pairs.append(lists.Pair(tmp_path / name, tmp_path / f'mask_{name}', 'test'))
  out = train_pretrained.inverted_pairs(pairs, tmp_path / 'inverted')
  assert [p.mask for p in out] == [p.mask for p in pairs]
  got = {p.image.name: tifffile.imread(p.image) for p in out}
  np.testing.assert_array_equal(got['a.tif'], [[65535, 65525], [0, 65528]])
  np.testing.assert_array_equal(got['b.tif'], [[255, 0], [252, 246]])
  np.testing.assert_array_equal(got['c.tif'], [[2.0, -1.5], [0.0, -0.5]])
  assert got['a.tif'].dtype == np.uint16 and got['c.tif'].dtype == np.float32


def test_recipe_variants_parse_and_a_malformed_one_is_a_usage_error():
  assert pretrained_recipe.parse_variant('w16_lr0.002_s1500') == (16, 0.002, 1500)
  assert pretrained_recipe.parse_variant('w8_lr1e-2_s3000') == (8, 0.01, 3000)
  with pytest.raises(app.UsageError, match="'w16_lr0.002' is not w<width>_lr<rate>_s<steps>"):
    pretrained_recipe.parse_variant('w16_lr0.002')


def test_scale_pairs_are_the_simulators_images_at_that_object_scale(tmp_path):
  area = {}
  for scale in (1.0, 2.0):
    pairs = pretrained_scale.scale_pairs('nucleus', scale, 2, tmp_path / str(scale))
    assert len(pairs) == 2
    for i, pair in enumerate(pairs):
      image, mask = simulate.simulate('nucleus', 256, synthetic.image_rng(
          common.TEST_SEED, 'test', i), simulate.Params(scale=scale))
      np.testing.assert_array_equal(tifffile.imread(pair.image), image)
      np.testing.assert_array_equal(tifffile.imread(pair.mask), mask)
    masks = [tifffile.imread(p.mask) > 0 for p in pairs]
    area[scale] = sum(m.sum() for m in masks) / sum(ndimage.label(m)[1] for m in masks)
  assert area[2.0] > 2 * area[1.0]  # twice the radii: about 4x the area per nucleus


def test_rescaled_real_images_keep_their_type_and_label_values():
  from experiments.shipped import real_image  # pylint: disable=g-import-not-at-top
  image = np.arange(12 * 8, dtype=np.uint16).reshape(12, 8) * 700
  labels = np.zeros((12, 8), np.int32)
  labels[2:6, 2:4] = 7
  labels[8:12, 4:8] = 300
  half, half_labels = real_image.rescaled(image, labels, 0.5)
  assert half.dtype == np.uint16 and half.shape == half_labels.shape == (6, 4)
  # Area averaging: each 2x2 block's mean, rounded (a linear ramp: exact).
  assert half[0, 0] == np.rint(image[:2, :2].mean())
  # Nearest neighbour at the pixel centres: rows 1, 3, 5, ..., the labels kept as they are.
  np.testing.assert_array_equal(half_labels, labels[1::2, 1::2])
  triple, triple_labels = real_image.rescaled(image, labels, 3.0)
  assert triple.shape == triple_labels.shape == (36, 24)
  assert set(np.unique(triple_labels)) == {0, 7, 300}
  np.testing.assert_array_equal(triple_labels[::3, ::3], labels)
  assert (triple_labels == 7).sum() == 9 * (labels == 7).sum()


def test_the_nucleus_recipe_records_the_simulators_nucleus_diameter():
  from flmiseg.inference import segment  # pylint: disable=g-import-not-at-top
  label_images = [simulate.simulate('nucleus', 256, synthetic.image_rng(5, 'test', index),
                                    labels=True)[1] for index in range(12)]
  # Over 40 images 31.0 px; 12 images land within 2 px of it.
  assert abs(segment.object_diameter(label_images) - common.NUCLEUS_DIAMETER) < 2.0
  recorded = {kind: common.pretrained_config(kind, 10).data.object_diameter
              for kind in ('er', 'mito', 'nucleus')}
  assert recorded == {'er': 0.0, 'mito': 0.0, 'nucleus': common.NUCLEUS_DIAMETER}


def test_a_packed_config_names_the_real_lists_as_built_and_the_recipes_inference(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  real = tmp_path / 'somewhere' / 'dsb'
  config = common.pretrained_config('nucleus', 10, real=str(real)).to_dict()
  config['eval']['measure_diameter'] = False  # as a run made before the field was set
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(config))
  train_pretrained.portable_config(path, 'nucleus', real)
  saved = json.loads(path.read_text())
  assert [saved['data'][f'{s}_list'] for s in ('train', 'val', 'test')] == [
      'data/dsb/train', 'data/dsb/val', 'data/dsb/test']
  assert saved['eval']['measure_diameter'] is True
  train_pretrained.portable_config(path, 'er', None)
  assert json.loads(path.read_text())['eval']['measure_diameter'] is False
