"""The FLMI simulator: reproducibility, value types, ground truth, dataset layout, CLI, and
domain randomisation (new knobs, random_params presets, randomized datasets)."""

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

from flmiseg.configs import default as default_config
from flmiseg.data import lists
from flmiseg.data import loader
from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.data import simulate_random
from flmiseg.core.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('kind, dtype', [('er', np.uint16), ('mito', np.uint16),
                                         ('nucleus', np.uint8)])
def test_kinds_types_and_ground_truth(kind, dtype):
  image, mask = simulate.simulate(kind, 128, np.random.default_rng(1))
  assert image.shape == mask.shape == (128, 128)
  assert image.dtype == dtype and mask.dtype == np.uint8
  assert set(np.unique(mask)) == {0, 255}
  fg = mask.mean() / 255
  assert 0.02 < fg < 0.6, fg
  # The structure is brighter than the rest (the mask is where the fluorophore is).
  # Above the camera offset, the structure is at least twice as bright as the background.
  offset = simulate.resolve(kind, None).offset
  inside, outside = image[mask > 0].mean() - offset, image[mask == 0].mean() - offset
  assert inside > 2 * outside > 0, (inside, outside)


def test_same_seed_same_bytes_different_seed_differs():
  a = simulate.simulate('er', 64, np.random.default_rng(7))
  b = simulate.simulate('er', 64, np.random.default_rng(7))
  c = simulate.simulate('er', 64, np.random.default_rng(8))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])


def test_knobs_change_the_image_and_are_validated():
  rng = lambda: np.random.default_rng(0)
  bright = simulate.simulate('mito', 64, rng(), simulate.Params(photons=2000.0))[0]
  dim = simulate.simulate('mito', 64, rng(), simulate.Params(photons=50.0))[0]
  assert bright.max() > dim.max()
  airy = simulate.simulate('er', 64, rng(), simulate.Params(psf='airy'))[0]
  assert airy.dtype == np.uint16
  with pytest.raises(UserError, match='photons=0.1 is outside'):
    simulate.simulate('er', 64, rng(), simulate.Params(photons=0.1))
  with pytest.raises(UserError, match="kind='golgi' is not a kind"):
    simulate.simulate('golgi', 64, rng())


def test_write_dataset_layout_lists_and_refusal(tmp_path):
  out = synthetic.write_dataset('nucleus', tmp_path / 'ds', num_train=3, num_test=2, size=48,
                               seed=4)
  train, test = lists.read_list(out / 'train.txt'), lists.read_list(out / 'test.txt')
  assert len(train) == 3 and len(test) == 2
  assert train[0].image == (out / 'train/images/nucleus_00000.tif').resolve()
  assert not list(tmp_path.glob('.ds.partial*'))
  first = (out / 'train/images/nucleus_00001.tif').read_bytes()
  with pytest.raises(UserError, match='is not empty.*--overwrite'):
    synthetic.write_dataset('nucleus', out, 1, 1, size=48)
  assert (out / 'train/images/nucleus_00001.tif').read_bytes() == first  # untouched
  synthetic.write_dataset('nucleus', out, 2, 1, size=48, seed=4, overwrite=True)
  assert len(lists.read_list(out / 'train.txt')) == 2
  # Each image depends only on (seed, split, index).
  assert (out / 'train/images/nucleus_00001.tif').read_bytes() == first


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'flmiseg.cli.simulate', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_writes_all_kinds_and_rejects_bad_kind(tmp_path):
  result = _cli('--kind=all', '--num_train=2', '--num_test=1', '--size=32',
                f'--out={tmp_path}/all')
  assert result.returncode == 0, result.stderr[-1000:]
  for kind in simulate.KINDS:
    assert len(lists.read_list(tmp_path / 'all' / kind / 'train.txt')) == 2
  bad = _cli('--kind=golgi', f'--out={tmp_path}/bad')
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --kind='golgi' is not a kind")


# sha256 (first 16 hex digits) of image + mask bytes made by the simulator before the domain
# randomisation knobs existed: Params() must keep making exactly these images (cached datasets
# and the tests above rely on it).
_ORIGINAL = {('er', 64): '591e8c4aaf93ee60', ('er', 96): '35c47770bede5ba9',
             ('mito', 64): '7b2bfc22049c51e9', ('mito', 96): '3632c5be66b0a3a2',
             ('nucleus', 64): '46ddc1212fd2f131', ('nucleus', 96): 'f46d9a3ea8826d44',
             ('er', 'airy'): '6080ff579faac7b6', ('mito', 'airy'): '2ba4923695248dff',
             ('nucleus', 'airy'): '2d5d8901928ecdb9'}


def _digest(image, mask) -> str:
  return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()[:16]


@pytest.mark.parametrize('kind', simulate.KINDS)
def test_default_params_make_the_original_images(kind):
  for size in (64, 96):
    image, mask = simulate.simulate(kind, size, np.random.default_rng(3))
    assert _digest(image, mask) == _ORIGINAL[kind, size]
    image, mask = simulate.simulate(kind, size, np.random.default_rng(3), simulate.Params())
    assert _digest(image, mask) == _ORIGINAL[kind, size]
  airy = simulate.Params(psf='airy', psf_sigma=2.0)
  assert _digest(*simulate.simulate(kind, 96, np.random.default_rng(3), airy)) == _ORIGINAL[
      kind, 'airy']


def test_random_params_deterministic_valid_and_cover_their_ranges():
  draw = lambda seed, preset='wide': simulate_random.random_params(
      'er', np.random.default_rng(seed), preset)
  assert draw(5) == draw(5) and draw(5) != draw(6)
  wide = [draw(seed) for seed in range(200)]
  for p in wide:
    assert simulate.resolve('er', p) == p and p.photons_at_peak
  # (documented bounds, what 200 draws must at least span)
  for name, (low, high), (span_low, span_high) in [
      ('photons', (10, 3000), (20, 1500)), ('psf_sigma', (0.6, 3.5), (0.7, 2.8)),
      ('scale', (0.6, 1.6), (0.7, 1.45)), ('illumination', (0, 0.8), (0.1, 0.7))]:
    values = [getattr(p, name) for p in wide]
    assert low <= min(values) <= span_low and span_high <= max(values) <= high, name
  assert {p.bit_depth for p in wide} == set(simulate.BIT_DEPTHS)
  assert {p.psf for p in wide} == {'gaussian', 'airy'}
  # Documented rates, 50 % and 60 %: 200 draws land within 0.1 (about 3 standard deviations).
  assert np.mean([p.out_of_focus > 0 for p in wide]) == pytest.approx(0.5, abs=0.1)
  assert np.mean([p.debris > 0 for p in wide]) == pytest.approx(0.6, abs=0.1)
  with pytest.raises(UserError, match="randomize='narrow' is not a preset; valid: wide"):
    draw(0, 'narrow')


def test_nucleus_scale_spans_ten_to_a_hundred_x_and_keeps_the_other_knobs_stream():
  draw = lambda kind, seed: simulate_random.random_params(kind, np.random.default_rng(seed))
  scales = [draw('nucleus', seed).scale for seed in range(200)]
  # loguniform 0.35-2.5: 200 draws reach past both ends of the other kinds' 0.6-1.6.
  assert 0.35 <= min(scales) < 0.45 and 2.1 < max(scales) <= 2.5
  er_scales = [draw('er', seed).scale for seed in range(200)]
  assert 0.6 <= min(er_scales) and max(er_scales) <= 1.6
  # The entry draws one number, as the one it replaces: the knobs after it are unchanged.
  nucleus, er = draw('nucleus', 7), draw('er', 7)
  assert nucleus.psf == er.psf and nucleus.haze == er.haze
  assert nucleus.psf_sigma == pytest.approx(np.clip(
      er.psf_sigma / er.scale * nucleus.scale, *simulate_random.PSF_SIGMA_RANGE))


def test_shifted_lies_inside_wide_and_away_from_the_defaults():
  for kind in simulate.KINDS:
    wide, shifted = (simulate_random.preset_specs(p, kind) for p in ('wide', 'shifted'))
    assert wide.keys() == shifted.keys()
    for name, spec in shifted.items():
      if spec[0] in ('choice', 'other_than_default'):
        assert set(spec[1]) <= set(wide[name][1]), (kind, name)
      else:
        low, high = (0.0, wide[name][3]) if wide[name][0] == 'maybe' else wide[name][1:]
        assert low <= spec[1] <= spec[2] <= high, (kind, name)
  for kind in simulate.KINDS:
    default = simulate.resolve(kind, None)
    for seed in range(20):
      p = simulate_random.random_params(kind, np.random.default_rng(seed), 'shifted')
      assert p.bit_depth != default.bit_depth and p.scale >= 1.25
      assert p.psf_sigma > 1.5 * default.psf_sigma and p.photons < default.photons


@pytest.mark.parametrize('kind', ['er', 'mito'])
def test_a_cell_edge_leaves_only_the_camera_background_outside(kind):
  params = simulate.Params(outside=0.4, haze=0.8, autofluorescence=0.3, out_of_focus=1.0,
                           photons=2000.0, read_noise=0.0, offset=100.0)
  image, mask = simulate.simulate(kind, 128, np.random.default_rng(3), params)
  whole, _ = simulate.simulate(kind, 128, np.random.default_rng(3), dataclasses.replace(
      params, outside=0.0))
  background = image == 100  # no photon at all: nothing but the camera's offset
  # A fraction `outside` of the field, less its soft edge, holds not one photon, and no mask.
  assert 0.3 < background.mean() < 0.41
  assert not mask[ndi.binary_erosion(background, iterations=2)].any()
  assert (whole > 100).mean() > 0.99  # without the edge, haze fills the field
  assert mask.any() and image[mask > 0].mean() > 1000
  with pytest.raises(UserError, match='outside applies to er and mito'):
    simulate.simulate('nucleus', 64, np.random.default_rng(0), simulate.Params(outside=0.3))


@pytest.mark.parametrize('psf_sigma, width', [(1.2, 3), (2.5, 5)])
def test_visible_masks_draw_a_thin_line_to_its_half_maximum_and_keep_a_large_edge(psf_sigma,
                                                                                  width):
  # A 1-px line blurred by a Gaussian of sigma s falls to exp(-k^2 / 2s^2) at k px: above half
  # its ridge out to k=1 (0.71) for s=1.2, to k=2 (0.73; k=3: 0.49) for s=2.5. Its ends are
  # where its blur is half the ridge's, so it gets no longer. A 30x30 square's edge is where
  # its blur is half its interior's: on the edge, so the square stays as it is.
  objects = np.zeros((64, 96), np.float32)
  objects[8:56, 20] = 1
  objects[17:47, 50:80] = 2
  seen = simulate._visible(objects, simulate.Params(psf_sigma=psf_sigma))
  half = width // 2
  np.testing.assert_array_equal(seen[12:52, 20 - half:21 + half], 1)  # labelled as the line
  assert not seen[12:52, :20 - half].any() and not seen[12:52, 21 + half:40].any()
  assert not seen[:8].any() and not seen[56:, :40].any()
  np.testing.assert_array_equal(seen[:, 40:], objects[:, 40:])


@pytest.mark.parametrize('kind', ['er', 'mito', 'nucleus'])
def test_visible_masks_leave_the_image_and_grow_thin_structures_only(kind):
  params = simulate.Params(psf_sigma=2.5)
  image, geometry = simulate.simulate(kind, 96, np.random.default_rng(5), params)
  same, visible = simulate.simulate(kind, 96, np.random.default_rng(5), params,
                                    masks='visible')
  _, labels = simulate.simulate(kind, 96, np.random.default_rng(5), params, labels=True,
                                masks='visible')
  np.testing.assert_array_equal(image, same)
  np.testing.assert_array_equal(labels > 0, visible > 0)
  assert (visible[geometry > 0] > 0).all()
  grown = (visible > 0).sum() / (geometry > 0).sum()
  # ER's 1-3 px tubules get about as wide as the PSF; 3-7 px mitochondria and nuclei barely.
  assert {'er': 1.6 < grown < 2.6, 'mito': 1.05 < grown < 1.4, 'nucleus': grown < 1.03}[kind]
  with pytest.raises(UserError, match="masks='drawn' is not a way to draw masks; valid: "
                     'geometry, visible'):
    simulate.simulate(kind, 32, np.random.default_rng(0), masks='drawn')


def test_thickness_dims_a_nucleus_towards_its_edge_as_an_ellipsoid():
  blob = np.zeros((40, 40), np.uint8)
  cv2.circle(blob, (20, 20), 12, 1, -1)
  profile = simulate._thickness(blob, 0.6)
  depth = cv2.distanceTransform(np.pad(blob, 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
  t = depth / depth.max()
  np.testing.assert_allclose(profile[blob > 0], (0.4 + 0.6 * np.sqrt(t * (2 - t)))[blob > 0],
                             rtol=1e-6)
  assert profile[20, 20] == pytest.approx(1.0) and not profile[blob == 0].any()
  flat_params = simulate.Params(density=30.0, photons=5000.0, read_noise=0.0,
                                bit_depth='uint16')
  flat, mask = simulate.simulate('nucleus', 128, np.random.default_rng(4), flat_params)
  dome, same = simulate.simulate('nucleus', 128, np.random.default_rng(4), dataclasses.replace(
      flat_params, thickness=0.8))
  np.testing.assert_array_equal(mask, same)  # the geometry is the same
  edge = (mask > 0) & ~ndi.binary_erosion(mask > 0, iterations=2)
  inner = ndi.binary_erosion(mask > 0, iterations=5)
  ratio = lambda image: image[edge].mean() / image[inner].mean()
  assert ratio(dome) < ratio(flat) - 0.1
  with pytest.raises(UserError, match='thickness applies to nucleus'):
    simulate.simulate('mito', 32, np.random.default_rng(0), simulate.Params(thickness=0.5))


@pytest.mark.parametrize('bit_depth, dtype, top', [('uint8', np.uint8, 255),
                                                   ('uint12', np.uint16, 4095),
                                                   ('uint16', np.uint16, 65535)])
def test_bit_depths_and_gain(bit_depth, dtype, top):
  rng = lambda: np.random.default_rng(2)
  dim = simulate.Params(bit_depth=bit_depth, offset=0.0, gain=0.01 * top / 255)
  image = simulate.simulate('mito', 64, rng(), dim)[0]
  assert image.dtype == dtype and 0 < image.max() < top
  # A large gain saturates: clipped at the bit depth's maximum, never above it.
  bright = simulate.Params(bit_depth=bit_depth, photons=5000.0, gain=top / 100)
  image = simulate.simulate('mito', 64, rng(), bright)[0]
  assert image.dtype == dtype and image.max() == top
  with pytest.raises(UserError, match="bit_depth='uint10'; valid: uint8, uint12, uint16"):
    simulate.simulate('mito', 64, rng(), simulate.Params(bit_depth='uint10'))


@pytest.mark.parametrize('kind', simulate.KINDS)
def test_unfocused_light_changes_the_image_never_the_mask(kind):
  rng = lambda: np.random.default_rng(11)
  image, mask = simulate.simulate(kind, 96, rng())
  for knob in (dict(out_of_focus=1.0), dict(debris=30.0), dict(autofluorescence=0.3),
               dict(hot_pixels=50.0), dict(vignetting=0.5), dict(photons_at_peak=True)):
    other, other_mask = simulate.simulate(kind, 96, rng(), simulate.Params(**knob))
    assert np.array_equal(mask, other_mask), knob
    assert not np.array_equal(image, other), knob


@pytest.mark.parametrize('kind', simulate.KINDS)
def test_scale_sizes_the_objects(kind):
  def thickness(scale):  # mean distance of a structure pixel to the background
    masks = [simulate.simulate(kind, 128, np.random.default_rng(seed),
                               simulate.Params(scale=scale))[1] for seed in range(3)]
    return np.mean([ndi.distance_transform_edt(m)[m > 0].mean() for m in masks])
  assert thickness(1.6) > 1.4 * thickness(0.6)


@pytest.mark.parametrize('psf_sigma', [0.8, 3.0])
def test_photons_at_peak_sets_the_signal_whatever_the_psf(psf_sigma):
  # No background, noise or offset: the bright end of the structure is `photons` counts.
  p = simulate.Params(photons=400.0, photons_at_peak=True, psf_sigma=psf_sigma, haze=0.0,
                      illumination=0.0, read_noise=0.0, offset=0.0)
  image, mask = simulate.simulate('er', 128, np.random.default_rng(0), p)
  inside = image[mask > 0].astype(float)
  assert 0.85 < np.percentile(inside, 95) / 400 < 1.2


def _tree(folder):
  return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob('*'))
          if f.is_file()}


def test_randomized_dataset_is_reproducible_and_records_its_knobs(tmp_path):
  args = dict(num_train=4, num_test=2, size=48, seed=3)
  a = synthetic.write_dataset('mito', tmp_path / 'a', randomize='wide', **args)
  b = synthetic.write_dataset('mito', tmp_path / 'b', randomize='wide', **args)
  assert _tree(a) == _tree(b)
  knobs = [json.loads(line) for line in (a / 'train_params.jsonl').read_text().splitlines()]
  assert [k['image'] for k in knobs] == [
      str(pair.image.relative_to(a.resolve())) for pair in lists.read_list(a / 'train.txt')]
  assert len({k['photons'] for k in knobs}) == 4
  # Each image is reproducible on its own: its knobs come from params_rng(seed, split, i).
  p = simulate_random.random_params('mito', synthetic.params_rng(3, 'test', 1), 'wide')
  image, mask = simulate.simulate('mito', 48, synthetic.image_rng(3, 'test', 1), p, labels=True)
  assert np.array_equal(tifffile.imread(a / 'test/images/mito_00001.tif'), image)
  assert np.array_equal(tifffile.imread(a / 'test/masks/mito_00001.tif'), mask)
  shifted = synthetic.write_dataset('mito', tmp_path / 's', randomize='shifted', **args)
  assert _tree(shifted)['train/images/mito_00000.tif'] != _tree(a)['train/images/mito_00000.tif']
  with pytest.raises(UserError, match="randomize='wild' is not a preset"):
    synthetic.write_dataset('mito', tmp_path / 'c', randomize='wild', **args)
  with pytest.raises(UserError, match='pass it or params, not both'):
    synthetic.write_dataset('mito', tmp_path / 'c', randomize='wide', params=simulate.Params(),
                           **args)


def _data_cfg(tmp_path, synthetic_params):
  data = default_config.get_config().data
  data.update(synthetic_dir=str(tmp_path), num_synthetic_train=2, num_synthetic_test=1,
              synthetic_size=32, kind='nucleus', synthetic_params=synthetic_params)
  return data


def test_loader_synthetic_params_names_the_cache_and_is_validated(tmp_path):
  default = loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'default'), seed=0)
  assert default.name == 'nucleus_2+1_32px_seed0'  # the name cached datasets already have
  assert not (default / 'train_params.jsonl').exists()
  wide = loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'wide'), seed=0)
  assert wide.name == 'nucleus_2+1_32px_seed0_wide' and (wide / 'train_params.jsonl').is_file()
  # Drawn from an older preset (here: its stamp says so): made again, the same images.
  image = (wide / 'train/images/nucleus_00000.tif').read_bytes()
  (wide / synthetic.PRESET_FILE).write_text('{"scale": ["loguniform", 0.6, 1.6]}\n')
  assert loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'wide'), seed=0) == wide
  assert (wide / synthetic.PRESET_FILE).read_text() == synthetic.preset_stamp('nucleus', 'wide')
  assert '"scale": ["loguniform", 0.35, 2.5]' in synthetic.preset_stamp('nucleus', 'wide')
  assert (wide / 'train/images/nucleus_00000.tif').read_bytes() == image
  stamp_time = (wide / synthetic.PRESET_FILE).stat().st_mtime_ns
  loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'wide'), seed=0)  # current: reused
  assert (wide / synthetic.PRESET_FILE).stat().st_mtime_ns == stamp_time
  data = _data_cfg(tmp_path, 'wide')
  data.synthetic_masks = 'visible'
  assert loader.synthetic_dataset_dir(data, seed=0).name == 'nucleus_2+1_32px_seed0_wide_visible'
  data.synthetic_masks = 'traced'
  with pytest.raises(ValueError, match="config.data.synthetic_masks='traced' is not valid; "
                     'valid: geometry, visible'):
    loader.synthetic_dataset_dir(data, seed=0)
  with pytest.raises(ValueError) as error:
    loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'broad'), seed=0)
  assert str(error.value) == ("config.data.synthetic_params='broad' is not valid; valid: "
                              'default, wide, shifted')


def test_loader_remakes_a_cached_instance_dataset_without_label_images(tmp_path):
  folder = loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'default'), seed=0)
  mask_file = folder / 'train' / 'masks' / 'nucleus_00000.tif'
  labels = tifffile.imread(mask_file)
  image = tifffile.imread(folder / 'train' / 'images' / 'nucleus_00000.tif')
  assert labels.dtype == np.uint16
  tifffile.imwrite(mask_file, ((labels > 0) * 255).astype(np.uint8))  # as older versions wrote
  assert loader.synthetic_dataset_dir(_data_cfg(tmp_path, 'default'), seed=0) == folder
  np.testing.assert_array_equal(tifffile.imread(mask_file), labels)
  np.testing.assert_array_equal(tifffile.imread(folder / 'train' / 'images' /
                                                'nucleus_00000.tif'), image)


def test_cli_randomize(tmp_path):
  result = _cli('--kind=er', '--num_train=2', '--num_test=1', '--size=32', '--randomize=wide',
                '--masks=visible', f'--out={tmp_path}/er')
  assert result.returncode == 0, result.stderr[-1000:]
  assert len((tmp_path / 'er' / 'train_params.jsonl').read_text().splitlines()) == 2
  knobs = json.loads((tmp_path / 'er' / 'test_params.jsonl').read_text())
  _, visible = simulate.simulate('er', 32, synthetic.image_rng(0, 'test', 0), simulate.Params(
      **{k: v for k, v in knobs.items() if k != 'image'}), masks='visible')
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'er' / knobs['image'].replace(
      'images', 'masks')), visible)
  bad = _cli('--masks=traced', f'--out={tmp_path}/bad')
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1] == ("error: masks='traced' is not a way to draw "
                                                 'masks; valid: geometry, visible')
  assert not (tmp_path / 'bad').exists()
  bad = _cli('--randomize=wild', f'--out={tmp_path}/bad')
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: --randomize='wild' is not a")


def test_brightness_range_spreads_nucleus_levels_exactly_and_keeps_the_geometry():
  flat = dict(heterogeneity=0.0, density=40.0)  # texture exp(0) = 1: brightness = level
  p0 = simulate.resolve('nucleus', simulate.Params(**flat))
  p10 = simulate.resolve('nucleus', simulate.Params(brightness_range=10.0, **flat))
  mask0, level0 = simulate._nucleus(np.random.default_rng(4), 256, 256, p0)
  mask10, level10 = simulate._nucleus(np.random.default_rng(4), 256, 256, p10)
  np.testing.assert_array_equal(mask0, mask10)  # the same draws, the same nuclei
  normal = np.unique(level10[(level10 > 0) & (level10 <= 1)])
  assert normal.max() == pytest.approx(1.0) and normal.min() == pytest.approx(0.1)
  assert np.unique(level0[(level0 > 0) & (level0 <= 1)]).min() >= 0.35  # the original
  mitotic = level10 > 1
  np.testing.assert_allclose(level10[mitotic], level0[mitotic], rtol=1e-6)  # still above all
  # The map is monotone: brighter stays brighter, pixel by pixel.
  inside = level0 > 0
  order = np.argsort(level10[inside], kind='stable')
  assert np.all(np.diff(level0[inside][order]) >= 0)
  with pytest.raises(UserError, match='brightness_range applies to nucleus, not er'):
    simulate.resolve('er', simulate.Params(brightness_range=10.0))
  with pytest.raises(UserError, match='brightness_range=0.5: 0 \\(off\\) or a ratio >= 1'):
    simulate.resolve('nucleus', simulate.Params(brightness_range=0.5))


def test_spread_levels_maps_the_drawn_range_log_linearly():
  levels = np.array([0.0, 0.35, 0.5, 1.0, 2.5], np.float32)
  got = simulate.spread_levels(levels, 20.0)
  t = (np.float32(0.5) - 1.0) / (1.0 - np.float32(0.35))
  np.testing.assert_allclose(got, [0.0, 1 / 20, 20.0 ** t, 1.0, 2.5], rtol=1e-6)
  one = np.array([0.0, 0.7], np.float32)  # one nucleus: the brightest
  np.testing.assert_allclose(simulate.spread_levels(one, 20.0), [0.0, 1.0])


def test_wide_nuclei_span_ten_x_and_more_with_debris_brighter_than_nuclei():
  draws = [simulate_random.random_params('nucleus', np.random.default_rng(s)) for s in range(200)]
  ranges = [p.brightness_range for p in draws if p.brightness_range]
  assert len(ranges) / 200 == pytest.approx(0.5, abs=0.1) and 10 <= min(ranges)
  assert max(ranges) <= 40
  assert all(p.photons >= simulate_random.DIM_PHOTONS * p.brightness_range for p in draws)
  bright = [p.debris_brightness for p in draws]
  assert 4 <= min(bright) < 5 and 15 < max(bright) <= 20
  # 'shifted' keeps the original levels (its images are unchanged); er and mito never spread.
  for seed in range(20):
    shifted = simulate_random.random_params('nucleus', np.random.default_rng(seed), 'shifted')
    assert (shifted.brightness_range, shifted.debris_brightness) == (0.0, 4.0)
    er = simulate_random.random_params('er', np.random.default_rng(seed))
    assert (er.brightness_range, er.debris_brightness) == (0.0, 4.0)
  # In the image, each nucleus's interior is proportional to its fluorophore (so the 10x
  # spread of the levels, exact above, is the image's), and debris peaks above every nucleus.
  params = simulate.Params(brightness_range=10.0, debris=12.0, debris_brightness=20.0,
                           photons=3000.0, photons_at_peak=True, haze=0.0, illumination=0.0,
                           bit_depth='uint16')  # not saturated
  image, labels = simulate.simulate('nucleus', 256, np.random.default_rng(2), params,
                                    labels=True)
  # The same generator draws the same nuclei first: their fluorophore levels.
  _, levels = simulate._nucleus(np.random.default_rng(2), 256, 256,
                                simulate.resolve('nucleus', params))
  image = image.astype(np.float64)
  background = np.median(image[labels == 0])
  per_level = []
  for k in range(1, labels.max() + 1):
    core = ndi.binary_erosion(labels == k, iterations=3)
    if core.sum() > 20:
      per_level.append((np.median(image[core]) - background) / np.median(levels[core]))
  assert len(per_level) >= 8
  np.testing.assert_allclose(per_level, np.median(per_level), rtol=0.1)
  assert image[labels == 0].max() - background > np.max(image[labels > 0]) - background
