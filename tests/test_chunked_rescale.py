"""Chunked prediction resized for the model (flmiseg/chunked/): by --diameter and by the pixel
size of the chosen --level in the NGFF metadata, each block is resized, predicted and its
outputs resized back, so the mask matches the in-memory path's with the same resizing (IoU
>= 0.99; not bit for bit: the resized pixels depend on where the plane is cut) and objects
across block borders and corners still get one label each.

Two 256 x 256 images of discs predicted with the shipped nucleus model (objects of 31 px) in
blocks of 128: large discs (48 px) shrunk x0.65 by --diameter=48, and tests/test_chunked.py's
small ones (26 px) as level 1 of a pyramid at 0.4 um, enlarged x1.21 for the same model told
that it was trained at 0.33 um.
"""

import cv2
import numpy as np
import pytest
import zarr

import flmiseg
from flmiseg.chunked import run as chunked
from flmiseg.core.errors import UserError
from flmiseg.inference import segment
from tests.test_chunked import CENTRES
from tests.test_chunked import _discs
from tests.test_chunked import write_ome_zarr

BLOCK = 128
# Large discs: on the corner of four blocks, across the borders (x = 128, y = 128) and inside.
LARGE = ((128, 128), (40, 128), (128, 215), (128, 40), (215, 60), (50, 45), (210, 200))
LARGE_RADIUS = 24
MODEL_PIXEL_SIZE = 0.33  # um, for the level test's model; level 1 is at 0.4 um


def _large_discs() -> np.ndarray:
  yy, xx = np.mgrid[:256, :256]
  shape = np.zeros((256, 256), np.float32)
  for cy, cx in LARGE:
    shape[(yy - cy) ** 2 + (xx - cx) ** 2 < LARGE_RADIUS ** 2] = 1
  shape = cv2.GaussianBlur(shape, (0, 0), 2.5)
  noise = np.random.default_rng(0).normal(0, 60, shape.shape)
  return np.clip(400 + 3000 * shape + noise, 0, 65535).astype(np.uint16)


@pytest.fixture(scope='module')
def nucleus():
  return flmiseg.load('nucleus')


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.astype(bool), b.astype(bool)
  return float((a & b).sum() / (a | b).sum())


def _check_like_in_memory(group, reference, centres) -> None:
  """The chunked outputs `group` against the in-memory Segmentation `reference`: the mask
  within IoU 0.99, the same number of objects, each disc one label in one piece."""
  assert _iou(group['labels/mask/0'][:], reference.mask) >= 0.99
  labels = group['labels/instances/0'][:]
  assert len(np.unique(labels[labels > 0])) == reference.labels.max() == len(centres)
  found = [int(labels[cy, cx]) for cy, cx in centres]
  assert 0 not in found and len(set(found)) == len(centres)
  corner = labels == found[0]  # centred where four blocks meet
  assert all(q.sum() > 50 for q in (corner[:BLOCK, :BLOCK], corner[:BLOCK, BLOCK:],
                                    corner[BLOCK:, :BLOCK], corner[BLOCK:, BLOCK:]))
  for value, centre in zip(found, centres):
    count, _ = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=8)
    assert count == 2, centre  # background + the object: no seam splits it


def test_diameter_shrinks_each_block_like_the_whole_image(nucleus, tmp_path):
  image = _large_discs()
  src = write_ome_zarr(tmp_path / 'large.ome.zarr', image, '0.4')
  reference = nucleus.segment(image, diameter=48, instances=True)
  result = chunked.segment_zarr(nucleus, str(src), str(tmp_path / 'out'), instances=True,
                                diameter=48, block=BLOCK, progress=False)
  assert result['notes'][0].endswith('(level 0): resized x0.646 so its objects (48 px, '
                                     '--diameter) match the model\'s (31 px)')
  group = zarr.open_group(result['output'], mode='r')
  _check_like_in_memory(group, reference, LARGE)
  # The halo is the model's (64 px) in the image's pixels: 64 / 0.646, rounded up to 112.
  settings = segment.Settings(diameter=48)
  assert chunked.default_halo(nucleus, settings, 31 / 48) == 112
  assert chunked.default_halo(nucleus, settings) == 64
  # Without instances the resized blocks keep their halo (the network's context): the same
  # mask.
  masks = chunked.segment_zarr(nucleus, str(src), str(tmp_path / 'masks'), diameter=48,
                               block=BLOCK, progress=False)
  np.testing.assert_array_equal(
      zarr.open_group(masks['output'], mode='r')['labels/mask/0'][:],
      group['labels/mask/0'][:])


def test_level_pixel_size_from_the_metadata_enlarges_each_block(nucleus, tmp_path):
  image = _discs()  # level 1; level 0 twice its size
  src = write_ome_zarr(tmp_path / 'pyramid.ome.zarr',
                       [np.repeat(np.repeat(image, 2, axis=0), 2, axis=1), image], '0.4',
                       scale=(0.2, 0.2), unit='micrometer')
  config = nucleus.config.copy_and_resolve_references()
  config.data.pixel_size = MODEL_PIXEL_SIZE
  model = flmiseg.load('nucleus', config=config)
  reference = model.segment(image, pixel_size=0.4, instances=True)
  result = chunked.segment_zarr(model, str(src), str(tmp_path / 'out'), level=1,
                                instances=True, block=BLOCK, save_prob=True, progress=False)
  assert result['notes'][0].endswith('(level 1): resized x1.21 to the model\'s pixel size '
                                     '(0.33 um; the image\'s is 0.4 um)')
  group = zarr.open_group(result['output'], mode='r')
  assert group.attrs['multiscales'][0]['datasets'][0]['coordinateTransformations'] == [
      {'type': 'scale', 'scale': [0.4, 0.4]}]  # the outputs are at the level's pixel size
  _check_like_in_memory(group, reference, CENTRES)
  assert np.abs(group['0'][:] - reference.prob).mean() < 0.005


@pytest.mark.parametrize('case', ['auto_diameter', 'block'])
def test_what_resizing_cannot_do_is_one_line_and_writes_nothing(nucleus, tmp_path, case):
  src = write_ome_zarr(tmp_path / 'large.ome.zarr', _large_discs(), '0.4')
  kwargs, expected = {
      'auto_diameter': ({'diameter': 0}, '--diameter=0 \\(measured on a first pass\\) needs '
                        'the whole image'),
      'block': ({'diameter': 48, 'block': 96}, '--block=96: smaller than the halo of 112 px'),
  }[case]
  with pytest.raises(UserError, match=expected) as error:
    chunked.segment_zarr(nucleus, str(src), str(tmp_path / 'out'), instances=True,
                         progress=False, **kwargs)
  assert '\n' not in str(error.value) and not (tmp_path / 'out').exists()
