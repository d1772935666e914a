"""The FLMI simulator: reproducibility, value types, ground truth, dataset layout, CLI."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flmiseg.data import lists
from flmiseg.data import simulate
from flmiseg.errors import UserError

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
  out = simulate.write_dataset('nucleus', tmp_path / 'ds', num_train=3, num_test=2, size=48,
                               seed=4)
  train, test = lists.read_list(out / 'train.txt'), lists.read_list(out / 'test.txt')
  assert len(train) == 3 and len(test) == 2
  assert train[0].image == (out / 'train/images/nucleus_00000.tif').resolve()
  assert not list(tmp_path.glob('.ds.partial*'))
  first = (out / 'train/images/nucleus_00001.tif').read_bytes()
  with pytest.raises(UserError, match='is not empty.*--overwrite'):
    simulate.write_dataset('nucleus', out, 1, 1, size=48)
  assert (out / 'train/images/nucleus_00001.tif').read_bytes() == first  # untouched
  simulate.write_dataset('nucleus', out, 2, 1, size=48, seed=4, overwrite=True)
  assert len(lists.read_list(out / 'train.txt')) == 2
  # Each image depends only on (seed, split, index).
  assert (out / 'train/images/nucleus_00001.tif').read_bytes() == first


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'flmiseg.simulate', *args], cwd=REPO, env=env,
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
