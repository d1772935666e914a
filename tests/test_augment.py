"""Robustness augmentation of the training pipeline (config.data.augment): '' reproduces the
crop + D4 pipeline bit for bit, augmentation is seeded per position, image, mask and maps stay
aligned under scale jitter, masks stay binary, and resuming gives the same batches."""

import dataclasses
import math

import cv2
import grain
import numpy as np
import pytest

from flmiseg.data import pipeline
from flmiseg.data import preprocess


@dataclasses.dataclass(frozen=True)
class _LegacyAugment(grain.transforms.RandomMap):
  """pipeline.Augment as it was before `groups` existed (crop + D4), verbatim."""
  crop_size: int
  flips: bool = True

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image, mask = element['image'], element['mask']
    h, w = image.shape
    top = int(rng.integers(0, max(h - self.crop_size, 0) + 1))
    left = int(rng.integers(0, max(w - self.crop_size, 0) + 1))
    valid = np.ones((h, w), np.float32)
    image, mask, valid = pipeline.crop_or_pad([image, mask, valid], self.crop_size, top, left)
    k = int(rng.integers(pipeline.DIHEDRAL_ORDER)) if self.flips else 0
    return {
        'image': np.ascontiguousarray(pipeline.dihedral(image, k))[..., None].astype(np.float32),
        'mask': np.ascontiguousarray(pipeline.dihedral(mask, k))[..., None].astype(np.float32),
        'valid': np.ascontiguousarray(pipeline.dihedral(valid, k))[..., None],
    }


class _Blobs:
  """Images of different sizes with a few large discs; image = intensity * mask + noise, or
  exactly mask * 1.0 with `image_is_mask`; an optional 'ignored' band."""

  def __init__(self, n, sizes=((48, 56), (40, 40), (20, 30)), image_is_mask=False,
               ignored=False):
    self.n, self.image_is_mask, self.ignored = n, image_is_mask, ignored
    self.shapes = tuple(sizes[i % len(sizes)] for i in range(n))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    h, w = self.shapes[i]
    rng = np.random.default_rng(100 + i)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint8)
    for _ in range(3):
      cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 10)
      mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    if self.image_is_mask:
      image = mask * 1.0
    else:
      image = 0.2 + 1.5 * mask + rng.normal(0, 0.2, (h, w))
    element = {'image': image.astype(np.float32), 'mask': mask, 'index': i}
    if self.ignored:
      element['ignored'] = (np.abs(yy - xx) < 6).astype(np.uint8)  # a diagonal band
      element['mask'] = np.where(element['ignored'], 0, mask).astype(np.uint8)
    return element


def _batches(source, n, **kw):
  kw = {'crop_size': 32, 'global_batch': 4, 'num_steps': n, 'seed': 0, **kw}
  it = iter(pipeline.train_dataset(source, **kw))
  return [next(it) for _ in range(n)]


def _legacy_batches(source, n, crop_size=32, global_batch=4, seed=0, flips=True):
  # The pipeline of train_dataset, with the legacy transform.
  epochs = math.ceil(n * global_batch / len(source)) + 1
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(epochs)
  ds = ds.random_map(_LegacyAugment(crop_size, flips), seed=seed + 1).batch(global_batch)
  return [ds[i] for i in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('flips', [True, False])
def test_no_augmentation_is_bit_identical_to_crop_and_d4(flips):
  source = _Blobs(7)
  got = _batches(source, 6, flips=flips, seed=3)
  want = _legacy_batches(source, 6, flips=flips, seed=3)
  for g, w in zip(got, want):
    _assert_same(g, w)
  # Augment's default (no groups) is the same transform.
  legacy = _LegacyAugment(32, flips).random_map(source[0], np.random.default_rng(5))
  _assert_same(pipeline.Augment(32, flips).random_map(source[0], np.random.default_rng(5)),
               legacy)


def test_photometric_groups_keep_the_crop_and_flip_of_no_augmentation():
  # The crop and D4 draws come first, so value-only augmentation moves no pixel.
  source = _Blobs(5)
  plain = _batches(source, 4)
  aug = _batches(source, 4, augment='intensity,noise,blur,illumination')
  for p, a in zip(plain, aug):
    np.testing.assert_array_equal(p['mask'], a['mask'])
    np.testing.assert_array_equal(p['valid'], a['valid'])
  assert any(not np.array_equal(p['image'], a['image']) for p, a in zip(plain, aug))


def test_deterministic_per_seed_and_position():
  source = _Blobs(7)
  first = _batches(source, 5, augment='all', seed=1)
  again = _batches(source, 5, augment='all', seed=1)
  for a, b in zip(first, again):
    _assert_same(a, b)
  other = _batches(source, 5, augment='all', seed=2)
  assert any(not np.array_equal(a['image'], b['image']) for a, b in zip(first, other))
  # One element's augmentation depends on its rng only.
  aug = pipeline.Augment(32, True, pipeline.AUGMENT_GROUPS)
  _assert_same(aug.random_map(source[2], np.random.default_rng(9)),
               aug.random_map(source[2], np.random.default_rng(9)))


def test_scale_keeps_image_mask_and_maps_aligned():
  source = _Blobs(6, sizes=((64, 72), (50, 50), (24, 30)), image_is_mask=True)
  plain = _batches(source, 12)
  scaled = _batches(source, 12, augment='scale')
  assert any(not np.array_equal(p['mask'], s['mask']) for p, s in zip(plain, scaled))
  boundary = 0
  for batch in scaled:
    image, mask, valid = batch['image'], batch['mask'], batch['valid']
    boundary += np.count_nonzero((image > 0.5) != (mask > 0.5))
    assert np.all(image[valid == 0] == 0) and np.all(mask[valid == 0] == 0)
  assert boundary <= 0.01 * sum(b['mask'].size for b in scaled), boundary


@pytest.mark.parametrize('factor', [0.5, 2.0])
def test_scale_range_sets_the_zoom(factor, monkeypatch):
  # Stripes 8 px wide: a zoom by exactly `factor` (scale_range (f, f)) makes them 8 * f wide,
  # in the mask (nearest neighbour) and in the image.
  monkeypatch.setattr(pipeline, 'SCALE_PROB', 1.0)  # every crop zoomed
  stripes = ((np.arange(128) // 8) % 2).astype(np.float32)
  image = np.tile(stripes, (128, 1))
  aug = pipeline.Augment(32, False, ('scale',), scale_range=(factor, factor))
  widths = set()
  for seed in range(20):
    out = aug.random_map({'image': image, 'mask': image.copy()}, np.random.default_rng(seed))
    row = out['mask'][5, :, 0]
    edges = np.flatnonzero(np.diff(row) != 0)
    widths.update(np.diff(edges).tolist())
    assert np.array_equal(out['image'] > 0.5, out['mask'] > 0.5)
  assert widths == {int(8 * factor)}, widths


def test_scale_range_is_checked():
  from flmiseg.train import config_checks  # pylint: disable=import-outside-toplevel
  assert config_checks.scale_range('data.scale_range', (0.5, 2.0)) == ''
  for bad in [(2.0, 0.5), (0.0, 1.0), (1.0,), 'big']:
    assert 'data.scale_range' in config_checks.scale_range('data.scale_range', bad)


def test_scale_moves_the_ignored_map_with_the_image():
  # image = 2 on ignored pixels (the band), so valid = 0 must match image > 1.5 exactly
  # wherever the image is real.
  class _Marked(_Blobs):
    def __getitem__(self, i):
      element = super().__getitem__(i)
      element['image'] = (element['mask'] + 2.0 * element['ignored']).astype(np.float32)
      return element

  source = _Marked(4, sizes=((80, 80),), ignored=True)
  batches = _batches(source, 10, augment='scale')
  for batch in batches:
    marked = batch['image'] > 1.5
    labelled = batch['valid'] > 0.5
    mismatch = np.count_nonzero(marked == labelled)  # ignored pixels must be exactly invalid
    assert mismatch <= 0.02 * marked.size, mismatch
    assert np.all(batch['mask'][~labelled] == 0)


def test_values_stay_binary_and_finite_with_every_augmentation():
  source = _Blobs(9, ignored=True)
  for batch in _batches(source, 20, augment='all', crop_size=36):
    for key in ('image', 'mask', 'valid'):
      assert batch[key].dtype == np.float32 and batch[key].shape == (4, 36, 36, 1), key
    assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
    assert set(np.unique(batch['valid'])) <= {0.0, 1.0}
    assert np.all(np.isfinite(batch['image']))
    assert np.all(batch['mask'][batch['valid'] == 0] == 0)


def test_padding_stays_zero_under_photometric_augmentation():
  source = _Blobs(3, sizes=((20, 30),))
  for batch in _batches(source, 6, augment='intensity,noise,illumination', crop_size=36):
    outside = (batch['valid'] == 0)
    assert outside.any() and np.all(batch['image'][outside] == 0)


def test_iterator_state_restores_the_same_augmented_batches():
  make = lambda: iter(pipeline.train_dataset(_Blobs(7), crop_size=32, global_batch=2,
                                             num_steps=12, seed=5, augment='all'))
  it = make()
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    _assert_same(next(resumed), want)


def test_augment_names():
  assert pipeline.parse_augment('') == ()
  assert pipeline.parse_augment('all') == pipeline.AUGMENT_GROUPS
  assert pipeline.parse_augment(' noise, scale ') == ('noise', 'scale')
  assert pipeline.parse_augment('invert,all') == pipeline.AUGMENT_GROUPS + ('invert',)
  for bad in ('noise,sharpen', 'Noise', 'flip'):
    with pytest.raises(ValueError) as e:
      pipeline.train_dataset(_Blobs(2), crop_size=16, global_batch=2, num_steps=1, seed=0,
                             augment=bad)
    message = str(e.value)
    assert '\n' not in message and 'config.data.augment' in message
    assert all(name in message for name in pipeline.AUGMENT_GROUPS + ('invert',))


def test_invert_mirrors_the_crop_about_its_range_and_keeps_the_mask():
  crop = np.array([[0., 1., 4.], [2., 4., 3.]], np.float32)
  inside = np.ones(crop.shape, bool)
  seen = set()
  for seed in range(40):  # INVERT_PROB of the draws invert, the others leave the crop alone
    out = pipeline.photometric(crop, inside, ('invert',), np.random.default_rng(seed))
    assert out.dtype == np.float32
    if np.array_equal(out, crop):
      seen.add('kept')
    else:
      np.testing.assert_array_equal(out, 4. - crop)  # min 0 <-> max 4
      seen.add('inverted')
  assert seen == {'kept', 'inverted'}
  # With the normalisation's mirror point (1 for percentile): 1 - crop, what the normalised
  # inverted image is.
  outs = [pipeline.photometric(crop, inside, ('invert',), np.random.default_rng(s), 1.0)
          for s in range(40)]
  assert any(np.array_equal(o, 1. - crop) for o in outs)
  assert all(np.array_equal(o, crop) or np.array_equal(o, 1. - crop) for o in outs)
  assert preprocess.mirror_point('percentile', 'nucleus') == 1.0
  assert preprocess.mirror_point('auto', 'er') == 0.0  # clahe_zscore
  assert preprocess.mirror_point('zscore', 'nucleus') == 0.0
  source = _Blobs(5)
  plain, inverted = _batches(source, 4), _batches(source, 4, augment='invert')
  for p, a in zip(plain, inverted):
    np.testing.assert_array_equal(p['mask'], a['mask'])
  assert any(not np.array_equal(p['image'], a['image']) for p, a in zip(plain, inverted))


def test_dim_scales_whole_objects_about_the_background_and_keeps_the_rest():
  crop = np.full((40, 40), 1.0, np.float32)
  mask = np.zeros((40, 40), np.float32)
  mask[5:13, 5:13] = mask[25:35, 24:34] = 1  # two objects, 12 px apart
  crop[mask > 0] = 5.0
  inside = np.ones(crop.shape, bool)
  inside[:, 38:] = False  # padding keeps its values
  crop[:, 38:] = 0.0
  low, high = pipeline.DIM_RANGE
  seen = set()
  for seed in range(60):
    out = pipeline.dim_objects(crop, mask, inside, np.random.default_rng(seed))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 38:], 0.0)
    far = np.ones(crop.shape, bool)  # past the edge: 2 * DIM_EDGE px
    far[:22, :22] = far[17:, 16:38] = False
    np.testing.assert_array_equal(out[far], crop[far])
    for box in ((slice(5, 13), slice(5, 13)), (slice(25, 35), slice(24, 34))):
      values = out[box]
      assert np.ptp(values) < 1e-5  # one factor per object, whole
      factor = (values[0, 0] - 1.0) / 4.0  # background 1: the median of unmasked pixels
      if factor == 1.0:
        seen.add('kept')
      else:
        assert low - 1e-6 <= factor <= high + 1e-6
        seen.add('dimmed')
  assert seen == {'kept', 'dimmed'}
  a = pipeline.dim_objects(crop, mask, inside, np.random.default_rng(7))
  np.testing.assert_array_equal(a, pipeline.dim_objects(crop, mask, inside,
                                                        np.random.default_rng(7)))


def test_dim_is_opt_in_and_changes_only_pixels_near_objects():
  assert 'dim' not in pipeline.parse_augment('all')
  assert pipeline.parse_augment('dim,all,invert') == pipeline.AUGMENT_GROUPS + ('invert', 'dim')
  source = _Blobs(5)
  plain, dimmed = _batches(source, 6), _batches(source, 6, augment='dim')
  changed = 0
  for p, d in zip(plain, dimmed):  # the same crops and flips: dim draws after them
    np.testing.assert_array_equal(p['mask'], d['mask'])
    np.testing.assert_array_equal(p['valid'], d['valid'])
    for image, want, mask in zip(d['image'][..., 0], p['image'][..., 0], p['mask'][..., 0]):
      near = cv2.dilate(mask.astype(np.uint8), np.ones((19, 19), np.uint8)) > 0
      np.testing.assert_array_equal(image[~near], want[~near])
      changed += int(not np.array_equal(image, want))
  assert changed > 0


def test_dim_range_sets_the_factor_and_is_checked():
  crop = np.full((24, 24), 2.0, np.float32)
  mask = np.zeros((24, 24), np.float32)
  mask[8:16, 8:16] = 1
  crop[mask > 0] = 12.0
  inside = np.ones(crop.shape, bool)
  aug = pipeline.Augment(24, False, ('dim',), dim_range=(0.3, 0.3))
  factors = set()
  for seed in range(30):
    out = aug.random_map({'image': crop, 'mask': mask}, np.random.default_rng(seed))['image']
    factors.add(round(float((out[12, 12, 0] - 2.0) / 10.0), 5))
  assert factors == {1.0, 0.3}  # kept, or dimmed by exactly the range's one factor
  from flmiseg.train import config_checks  # pylint: disable=import-outside-toplevel
  assert config_checks.dim_range('data.dim_range', (0.15, 0.7)) == ''
  for bad in ((0.0, 0.5), (0.5, 0.2), (0.5, 1.5), (0.5,), 'low'):
    assert 'data.dim_range' in config_checks.dim_range('data.dim_range', bad)
