"""The public dataset builders (python -m flmiseg.data.public) on small stand-ins in the
layouts of their repositories, never the real data."""

import csv
import json

import cv2
import numpy as np
import pytest
import tifffile

from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import public
from tests.test_objectmasks import write_sample


def _nuclei(shape, count, rng, background, level):
  """A grey uint8 image of `count` square nuclei on a noisy `background`, and their masks."""
  image = np.clip(rng.normal(background, 2, shape), 0, 255)
  objects = []
  for k in range(count):
    obj = np.zeros(shape, bool)
    top, left = 2 + 7 * (k // 2), 2 + 7 * (k % 2)
    obj[top:top + 5, left:left + 5] = True
    image[obj] = level
    objects.append(obj)
  return np.round(image).astype(np.uint8), objects


def _dsb_standin(src, rng):
  """SRC/stage1_train/ with 6 fluorescence images of 32x32, 5 of 24x40, 2 of 20x20, 3
  brightfield (dark nuclei on a bright background) and 2 colour (H&E-like) images."""
  root = src / 'stage1_train'
  plan = ([('fl', (32, 32))] * 6 + [('fl', (24, 40))] * 5 + [('fl', (20, 20))] * 2 +
          [('bf', (32, 32))] * 3 + [('he', (32, 32))] * 2)
  for i, (kind, shape) in enumerate(plan):
    name = f'{kind}{i:02d}'
    if kind == 'fl':
      write_sample(root, name, *_nuclei(shape, 3, rng, 10, 200))
    elif kind == 'bf':
      write_sample(root, name, *_nuclei(shape, 3, rng, 220, 60))
    else:
      grey, objects = _nuclei(shape, 3, rng, 230, 90)
      colour = np.stack([grey, grey // 2, grey], -1)  # purple nuclei on pale pink (BGR)
      (root / name / 'images').mkdir(parents=True)
      (root / name / 'masks').mkdir()
      cv2.imwrite(str(root / name / 'images' / f'{name}.png'), colour)
      for k, obj in enumerate(objects):
        cv2.imwrite(str(root / name / 'masks' / f'm{k}.png'), obj.astype(np.uint8) * 255)
  return root


def test_modality_is_read_from_the_pixels(tmp_path):
  rng = np.random.default_rng(0)
  root = _dsb_standin(tmp_path, rng)
  for name, want in (('fl00', 'fluorescence'), ('bf13', 'brightfield'), ('he16', 'histology')):
    assert public.describe(root / name / 'images' / f'{name}.png') == (want, (32, 32))
  # One small nucleus in a noisy field: its 1st-99th percentiles are all noise, but the
  # 0.1-99.9th reach the nucleus; still fluorescence.
  sparse = np.clip(np.round(rng.normal(3, 1, (256, 256))), 0, 255).astype(np.uint8)
  sparse[100:110, 200:210] = 96
  cv2.imwrite(str(tmp_path / 'sparse.png'), sparse)
  assert public.describe(tmp_path / 'sparse.png')[0] == 'fluorescence'


def test_split_is_stratified_and_fixed_by_the_ids_and_seed():
  strata = {f'id{i}': 'a' if i < 10 else 'b' for i in range(14)}
  parts = public.split(strata, 0.2, 0.1)
  counts = lambda s, p: sum(1 for k, v in parts.items() if strata[k] == s and v == p)  # noqa
  assert [counts('a', p) for p in public.SPLITS] == [7, 2, 1]  # 10: 2 val, 1 test
  assert [counts('b', p) for p in public.SPLITS] == [3, 1, 0]  # 4: round(0.8), round(0.4)
  assert public.split(dict(reversed(list(strata.items()))), 0.2, 0.1) == parts
  assert public.split(strata, 0.2, 0.1, seed=1) != parts
  with pytest.raises(UserError, match='--val_fraction=0.6 --test_fraction=0.5: each must'):
    public.split(strata, 0.6, 0.5)


def test_small_strata_are_pooled_per_modality():
  images = {f'a{i}': ('fluorescence', (32, 32)) for i in range(5)}
  images.update({'b': ('fluorescence', (20, 20)), 'c': ('fluorescence', (24, 24)),
                 'd': ('brightfield', (32, 32))})
  assert public.strata(images) == dict(
      {f'a{i}': 'fluorescence 32x32' for i in range(5)}, b='fluorescence other sizes',
      c='fluorescence other sizes', d='brightfield other sizes')


def test_dsb_build_writes_the_split_label_images_and_counts(tmp_path):
  src = tmp_path / 'fixes'
  root = _dsb_standin(src, np.random.default_rng(1))
  summary = public.build_dsb(src, tmp_path / 'dsb', val_fraction=0.2, test_fraction=0.2)
  assert summary['images'] == {'fluorescence': 13, 'brightfield': 3, 'histology': 2}
  assert summary['splits'] == {
      'train': {'fluorescence 32x32': 4, 'fluorescence 24x40': 3, 'fluorescence other sizes': 2},
      'val': {'fluorescence 32x32': 1, 'fluorescence 24x40': 1},
      'test': {'fluorescence 32x32': 1, 'fluorescence 24x40': 1}}
  assert summary['objects'] == {'train': 27, 'val': 6, 'test': 6}
  out = tmp_path / 'dsb'
  assert json.loads((out / 'summary.json').read_text()) == summary
  rows = list(csv.DictReader(open(out / 'manifest.csv')))
  assert len(rows) == 13 and {r['modality'] for r in rows} == {'fluorescence'}
  for row in rows:
    image = out / row['split'] / 'images' / f'{row["id"]}.png'
    labels = tifffile.imread(out / row['split'] / 'masks' / f'{row["id"]}.tif')
    np.testing.assert_array_equal(io.read_image(image), io.read_image(
        root / row['id'] / 'images' / f'{row["id"]}.png'))  # the file as it is
    masks = sorted((root / row['id'] / 'masks').iterdir())
    expected = sum((k + 1) * (cv2.imread(str(m), 0) > 0) for k, m in enumerate(masks))
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.uint16 and int(row['objects']) == 3
  # The folders are a 'lists' source as they are.
  assert len(lists.load_pairs(out / 'train')) == 9
  # Optional modalities join their own strata; the fluorescence split stays as it was.
  more = public.build_dsb(src, tmp_path / 'more', keep=public.MODALITIES, val_fraction=0.2,
                          test_fraction=0.2)
  assert [more['splits'][p].get('brightfield other sizes') for p in public.SPLITS] == [1, 1, 1]
  assert [more['splits'][p].get('histology other sizes') for p in public.SPLITS] == [2, None,
                                                                                     None]
  again = {r['id']: r['split'] for r in csv.DictReader(open(tmp_path / 'more' / 'manifest.csv'))}
  assert {r['id']: r['split'] for r in rows}.items() <= again.items()


def test_dsb_build_refuses_what_it_cannot_use(tmp_path):
  src = tmp_path / 'fixes'
  _dsb_standin(src, np.random.default_rng(2))
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  with pytest.raises(UserError, match='out is not empty; choose another folder or pass '
                     '--overwrite'):
    public.build_dsb(src, tmp_path / 'out')
  assert (tmp_path / 'out' / 'keep.txt').exists()
  with pytest.raises(UserError, match='not a folder'):
    public.build_dsb(tmp_path / 'missing', tmp_path / 'new')
  with pytest.raises(UserError, match=r"modalities \['phase'\] unknown"):
    public.build_dsb(src, tmp_path / 'new', keep=('phase',))
  # A bad sample fails the build in one line and leaves no half-written folder behind.
  (src / 'stage1_train' / 'fl00' / 'masks' / 'm0.png').write_bytes(b'not a png')
  with pytest.raises(UserError, match='m0.png'):
    public.build_dsb(src, tmp_path / 'new')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['fixes', 'out']


def test_the_command_prints_the_counts_and_errors_in_one_line(tmp_path, capsys):
  src = tmp_path / 'fixes'
  _dsb_standin(src, np.random.default_rng(3))
  assert public.main(['dsb', f'--src={src}', f'--out={tmp_path / "dsb"}']) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[0].startswith('dsb: 18 images: 13 fluorescence, 3 brightfield, 2 histology; '
                               'kept fluorescence (left out: brightfield 3, histology 2)')
  assert printed[1].split() == ['stratum', 'train', 'val', 'test']
  assert printed[-2].split() == ['all', '9', '2', '2']  # 6 and 5 images: 0.6 and 0.5 round up
  assert public.main(['dsb', f'--src={src}', f'--out={tmp_path / "dsb"}']) == 2
  error = capsys.readouterr().err
  assert error.count('\n') == 1 and 'is not empty' in error


def _ernet_standin(src, rng, shape=(40, 50)):
  """SRC/trainingdata/labelled_data/stack1..3 with ERNet's five pairs: grey images (JPEG and
  PNG) and RGBA annotations whose alpha channel is the mask (the colours are other
  layers). Returns {(stack, image name): mask}."""
  masks = {}
  for stack, image_name, mask_name in public.ERNET_PAIRS:
    folder = src / 'trainingdata' / 'labelled_data' / stack
    folder.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    cv2.imwrite(str(folder / image_name), image)
    alpha = rng.choice([0, 5, 11, 255], shape).astype(np.uint8)
    green = rng.choice([0, 255], shape).astype(np.uint8)
    rgba = np.stack([green, green, np.full(shape, 255, np.uint8), alpha], -1)  # BGRA
    cv2.imwrite(str(folder / mask_name), rgba)
    masks[(stack, image_name)] = alpha > 10
  return masks


def test_ernet_build_writes_pairs_and_leave_one_stack_out_lists(tmp_path):
  masks = _ernet_standin(tmp_path / 'ERNet', np.random.default_rng(4))
  summary = public.build_ernet(tmp_path / 'ERNet', tmp_path / 'ernet')
  out = tmp_path / 'ernet'
  assert [p['name'] for p in summary['pairs']] == [
      'stack1_0000', 'stack1_0126', 'stack2_0000', 'stack2_0126', 'stack3_0000']
  assert summary['stacks'] == ['stack1', 'stack2', 'stack3']
  pairs = lists.read_list(out / 'all.txt')
  assert [p.image.name for p in pairs] == [
      'stack1_0000.jpg', 'stack1_0126.png', 'stack2_0000.jpg', 'stack2_0126.jpg',
      'stack3_0000.jpg']
  for pair, (key, want) in zip(pairs, masks.items()):
    np.testing.assert_array_equal(io.read_mask(pair.mask), want)  # alpha > 10, ERNet's rule
    source = tmp_path / 'ERNet' / 'trainingdata' / 'labelled_data' / key[0] / key[1]
    assert pair.image.read_bytes() == source.read_bytes()  # the file as it is
  for stack, test_names in (('stack1', ['stack1_0000', 'stack1_0126']),
                            ('stack3', ['stack3_0000'])):
    fold = out / f'leave_out_{stack}'
    test = [p.image.stem for p in lists.read_list(fold / 'test.txt')]
    train = [p.image.stem for p in lists.read_list(fold / 'train.txt')]
    assert test == test_names
    assert sorted(train + test) == [p['name'] for p in summary['pairs']]
    regions = lists.read_list(fold / 'train_region.txt')
    assert [p.image.stem for p in regions] == train
    for pair in regions:  # the mask inside the annotated region, UNLABELLED outside it
      region = cv2.imread(str(pair.mask), cv2.IMREAD_UNCHANGED)
      mask = cv2.imread(str(out / 'masks' / pair.mask.name), cv2.IMREAD_UNCHANGED)
      inside = public.annotated_region(mask)
      np.testing.assert_array_equal(region[inside], mask[inside])
      assert np.all(region[~inside] == public.UNLABELLED)


def test_the_annotated_region_is_the_hull_grown_by_the_margin():
  truth = np.zeros((40, 60), np.uint8)
  truth[10, 10] = truth[10, 30] = truth[20, 20] = 255  # a triangle's corners
  hull = public.annotated_region(truth, margin=0)
  assert hull[10, 10:31].all() and hull[15, 15:26].all() and not hull[10, 31]
  grown = public.annotated_region(truth, margin=5)
  assert grown[5, 10] and grown[10, 35] and not grown[4, 10] and not grown[10, 36]
  assert grown[25, 20] and not grown[26, 20]


def test_ernet_build_errors_name_the_file(tmp_path):
  src = tmp_path / 'ERNet'
  _ernet_standin(src, np.random.default_rng(5))
  mask = src / 'trainingdata' / 'labelled_data' / 'stack2' / '126_segmented.png'
  cv2.imwrite(str(mask), np.zeros((40, 50), np.uint8))
  with pytest.raises(UserError, match='126_segmented.png: expected an RGBA PNG'):
    public.build_ernet(src, tmp_path / 'out')
  cv2.imwrite(str(mask), np.zeros((40, 51, 4), np.uint8))
  with pytest.raises(UserError, match=r'126_segmented.png: mask shape \(40, 51\) differs'):
    public.build_ernet(src, tmp_path / 'out')
  mask.unlink()
  with pytest.raises(UserError, match='126_segmented.png: not found'):
    public.build_ernet(src, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
