"""Axes, channels and pixel size of microscopy files: reading, plane selection, writing."""

import pathlib

import cv2
import numpy as np
import pytest
import tifffile

from flmiseg.data import io
from flmiseg.core.errors import UserError


def _raises(fn, *fragments):
  """Calls fn, expecting a one-line UserError that contains every fragment."""
  with pytest.raises(UserError) as e:
    fn()
  message = str(e.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def _ramp(shape, dtype=np.uint16):
  return (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)


def test_imagej_hyperstack_axes_and_pixel_size(tmp_path):
  data = _ramp((2, 3, 2, 16, 20))
  path = tmp_path / 'h.tif'
  tifffile.imwrite(path, data, imagej=True, metadata={'axes': 'TZCYX', 'unit': 'um'},
                   resolution=(1 / 0.065, 1 / 0.065))
  image = io.read_image_file(path)
  assert image.axes == 'TZCYX' and image.data.shape == data.shape
  assert image.data.dtype == np.uint16 and np.array_equal(image.data, data)
  assert image.pixel_size == pytest.approx(0.065, rel=1e-9)
  assert image.channel_names == () and not image.ome


def test_imagej_units(tmp_path):
  for unit, expected in (('micron', 0.5), ('\\u00B5m', 0.5), ('nm', 0.5e-3), ('mm', 500.0),
                         ('pixel', None)):
    path = tmp_path / 'u.tif'
    tifffile.imwrite(path, _ramp((8, 8)), imagej=True, metadata={'unit': unit},
                     resolution=(2.0, 2.0))
    got = io.read_image_file(path).pixel_size
    assert got == (pytest.approx(expected) if expected else None), unit


def test_ome_channels_and_units(tmp_path):
  data = _ramp((2, 16, 16))
  path = tmp_path / 'o.ome.tif'
  tifffile.imwrite(path, data, ome=True, metadata={
      'axes': 'CYX', 'PhysicalSizeX': 0.1, 'PhysicalSizeXUnit': 'µm',
      'Channel': {'Name': ['DAPI', 'GFP']}})
  image = io.read_image_file(path)
  assert image.axes == 'CYX' and image.ome and image.channel_names == ('DAPI', 'GFP')
  assert image.pixel_size == pytest.approx(0.1)
  _raises(lambda: io.select_planes(image, None, path), 'o.ome.tif: 2 channels',
          '0: DAPI, 1: GFP', '--channel=')
  planes, axes, shape = io.select_planes(image, 1, path)
  assert planes.shape == (1, 16, 16) and axes == 'YX' and shape == (16, 16)
  assert np.array_equal(planes[0], data[1])
  for size, unit, expected in ((65, 'nm', 0.065), (2, 'Å', 2e-4), (0.002, 'mm', 2.0),
                               (3, 'µm', 3.0)):
    tifffile.imwrite(path, data[0], ome=True, metadata={
        'axes': 'YX', 'PhysicalSizeX': size, 'PhysicalSizeXUnit': unit})
    assert io.read_image_file(path).pixel_size == pytest.approx(expected), unit


def test_plain_tiff_resolution_rules(tmp_path):
  path = tmp_path / 'p.tif'
  cases = (((1e4 / 0.325,) * 2, 'CENTIMETER', 0.325), ((25400 / 0.5,) * 2, 'INCH', 0.5),
           ((72, 72), 'INCH', None), ((96, 96), 'INCH', None), ((1, 1), 'CENTIMETER', None),
           ((5000, 5000), 'NONE', None), ((72 / 2.54,) * 2, 'CENTIMETER', None))
  for resolution, unit, expected in cases:
    tifffile.imwrite(path, _ramp((8, 8)), resolution=resolution, resolutionunit=unit)
    got = io.read_image_file(path).pixel_size
    assert got == (pytest.approx(expected, rel=1e-6) if expected else None), (unit, resolution)
  tifffile.imwrite(path, _ramp((8, 8)))
  assert io.read_image_file(path).pixel_size is None


def test_plain_stack_is_z_and_rgb_is_luminance(tmp_path):
  stack = _ramp((5, 8, 9))
  tifffile.imwrite(tmp_path / 'q.tif', stack)
  tifffile.imwrite(tmp_path / 'i.tif', stack, photometric='minisblack', metadata=None)
  for name in ('q.tif', 'i.tif'):
    image = io.read_image_file(tmp_path / name)
    assert image.axes == 'ZYX' and np.array_equal(image.data, stack), name
  rgb = np.zeros((6, 7, 3), np.uint8)
  rgb[..., 0] = 200
  rgb[2, 3] = (10, 250, 30)
  tifffile.imwrite(tmp_path / 'rgb.tif', rgb, photometric='rgb')
  image = io.read_image_file(tmp_path / 'rgb.tif')
  assert image.axes == 'YX' and image.data.dtype == np.uint8
  expected = np.round(rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))
  np.testing.assert_array_equal(image.data, expected.astype(np.uint8))
  cv2.imwrite(str(tmp_path / 'rgb.png'), rgb[..., ::-1])  # OpenCV writes BGR
  image = io.read_image_file(tmp_path / 'rgb.png')
  assert image.axes == 'YX' and image.pixel_size is None
  np.testing.assert_array_equal(image.data, expected.astype(np.uint8))
  assert io.read_image_file(tmp_path / 'rgb.png', axes='YXC').axes == 'YXC'


def test_grey_and_single_colour_rgb_keep_their_values_and_a_channel_picks_a_colour(tmp_path):
  grey = _ramp((6, 7)).astype(np.uint16)
  zero = np.zeros_like(grey)
  files = {'grey': np.stack([grey] * 3, -1), 'blue': np.stack([zero, zero, grey], -1),
           'magenta': np.stack([grey, zero, grey, np.full_like(grey, 9)], -1)}  # + alpha
  for name, rgb in files.items():
    tifffile.imwrite(tmp_path / f'{name}.tif', rgb, photometric='rgb',
                     extrasamples=['unassalpha'] if rgb.shape[-1] == 4 else None)
    image = io.read_image_file(tmp_path / f'{name}.tif')
    assert image.axes == 'YX' and image.data.dtype == np.uint16, name
    np.testing.assert_array_equal(image.data, grey, err_msg=name)  # no luminance scaling
  composite = np.stack([grey, grey[::-1], zero], -1).astype(np.uint8)  # two stains
  cv2.imwrite(str(tmp_path / 'composite.png'), composite[..., ::-1])
  image = io.read_image_file(tmp_path / 'composite.png', rgb_as_channels=True)
  assert image.axes == 'YXC' and image.channel_names == ('red', 'green', 'blue')
  planes, axes, _ = io.select_planes(image, 1, tmp_path / 'composite.png')
  assert axes == 'YX'
  np.testing.assert_array_equal(planes[0], composite[..., 1])
  with pytest.raises(UserError, match=r'--channel=3: .*composite.png has 3 channel'):
    io.select_planes(image, 3, tmp_path / 'composite.png')


def test_unknown_axis_letter_asks_for_axes_flag(tmp_path):
  path = tmp_path / 'r.tif'
  tifffile.imwrite(path, _ramp((2, 3, 8, 8)), photometric='minisblack',
                   metadata={'axes': 'EZYX'})
  _raises(lambda: io.read_image_file(path), 'r.tif', "'E'", '(2, 3, 8, 8)', '--axes=')
  image = io.read_image_file(path, axes='czyx')
  assert image.axes == 'CZYX' and image.data.shape == (2, 3, 8, 8)


@pytest.mark.parametrize('axes, fragment', [
    ('ZYX', '4 dimensions (2, 3, 8, 8)'), ('ZZYX', 'Z repeated'), ('TZCY', 'needs both Y'),
    ('ZBYX', "unknown letter 'B'"), ('', 'empty')])
def test_bad_axes_flag(tmp_path, axes, fragment):
  path = tmp_path / 'f.tif'
  tifffile.imwrite(path, _ramp((2, 3, 8, 8)), photometric='minisblack',
                   metadata={'axes': 'TZYX'})
  _raises(lambda: io.read_image_file(path, axes=axes), f'--axes={axes}:', fragment,
          'one letter per dimension from T, Z, C, Y, X')


def test_select_planes_restore_axes_round_trip():
  data = _ramp((2, 3, 4, 5, 6), np.int32)
  for axes in ('TZCYX', 'YXCZT', 'CYZXT', 'XTCYZ'):  # Y, X anywhere, even swapped
    image = io.ImageFile(data, axes)
    c = axes.index('C')
    for channel in range(data.shape[c]):
      planes, out_axes, out_shape = io.select_planes(image, channel, 'a.tif')
      assert out_axes == axes.replace('C', '') and planes.ndim == 3
      assert planes.shape[1:] == (data.shape[axes.index('Y')], data.shape[axes.index('X')])
      restored = io.restore_axes(planes.astype(np.float32), out_axes, out_shape)
      assert restored.shape == out_shape and restored.dtype == np.float32
      assert np.array_equal(restored, np.take(data, channel, axis=c))
  planes, _, _ = io.select_planes(io.ImageFile(data, 'TZCYX'), 0, 'a.tif')
  assert np.array_equal(planes[4], data[1, 1, 0])  # C order: t=1, z=1


def test_select_planes_channel_errors():
  three = io.ImageFile(_ramp((3, 8, 8)), 'CYX')
  _raises(lambda: io.select_planes(three, None, 'img.tif'), 'img.tif: 3 channels (0, 1, 2)',
          '--channel=N')
  for bad in (3, -1):
    _raises(lambda: io.select_planes(three, bad, 'img.tif'), f'--channel={bad}:', 'img.tif',
            '--channel=0 to --channel=2')
  one = io.ImageFile(_ramp((1, 8, 8)), 'CYX')
  for channel in (None, 0):
    assert io.select_planes(one, channel, 'a.tif')[0].shape == (1, 8, 8)
  flat = io.ImageFile(_ramp((2, 8, 8)), 'ZYX')
  assert io.select_planes(flat, 0, 'z.tif')[0].shape == (2, 8, 8)
  _raises(lambda: io.select_planes(flat, 1, 'z.tif'), '--channel=1:', 'z.tif',
          'no channel axis')


@pytest.mark.parametrize('axes, shape, name, flavour', [
    ('YX', (16, 20), 'a.tif', 'imagej'), ('ZYX', (3, 16, 20), 'a.tif', 'imagej'),
    ('TZYX', (2, 3, 16, 20), 'a.tif', 'imagej'), ('CYX', (2, 16, 20), 'a.tif', 'imagej'),
    ('TZCYX', (2, 3, 2, 8, 8), 'a.ome.tif', 'ome'), ('ZYX', (3, 16, 20), 'a.OME.TIFF', 'ome'),
    ('CZYX', (2, 3, 8, 8), 'a.tif', 'plain'), ('YXZ', (8, 9, 3), 'a.ome.tif', 'plain'),
    ('ZYX', (1, 8, 8), 'a.tif', 'plain')])
@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.float32])
def test_write_tiff_round_trip(tmp_path, axes, shape, name, flavour, dtype):
  data = _ramp(shape, dtype)
  path = tmp_path / name
  io.write_tiff(path, data, axes=axes, pixel_size=0.1234567)
  image = io.read_image_file(path)
  assert image.axes == axes and image.data.dtype == dtype
  assert np.array_equal(image.data, data)
  assert image.pixel_size == pytest.approx(0.1234567, rel=1e-6)
  with tifffile.TiffFile(path) as tif:
    assert (tif.is_ome, tif.is_imagej) == (flavour == 'ome', flavour == 'imagej')
  assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_write_tiff_defaults_and_wide_dtypes(tmp_path):
  io.write_tiff(tmp_path / 'm.tif', np.ones((3, 8, 8), np.uint8))  # today's callers
  image = io.read_image_file(tmp_path / 'm.tif')
  assert image.axes == 'ZYX' and image.pixel_size is None
  labels = _ramp((2, 8, 8), np.int64)
  io.write_tiff(tmp_path / 'l.ome.tif', labels, axes='ZYX', pixel_size=2.0)
  image = io.read_image_file(tmp_path / 'l.ome.tif')
  assert image.axes == 'ZYX' and image.pixel_size == pytest.approx(2.0)
  assert np.array_equal(image.data, labels)


def test_read_image_keeps_its_contract(tmp_path):
  io.write_tiff(tmp_path / 'one.tif', _ramp((1, 1, 8, 9)), axes='TCYX')
  assert io.read_image(tmp_path / 'one.tif').shape == (8, 9)
  io.write_tiff(tmp_path / 'yxz.tif', _ramp((8, 9, 2)), axes='YXZ')
  stack = io.read_image(tmp_path / 'yxz.tif', allow_stack=True)
  assert stack.shape == (2, 8, 9) and np.array_equal(stack[1], _ramp((8, 9, 2))[..., 1])
  io.write_tiff(tmp_path / 'tz.tif', _ramp((2, 3, 8, 9)), axes='TZYX')
  assert io.read_image(tmp_path / 'tz.tif', allow_stack=True).shape == (6, 8, 9)
  _raises(lambda: io.read_image(tmp_path / 'tz.tif'), 'tz.tif: expected a 2-D image')
  io.write_tiff(tmp_path / 'x.tif', _ramp((2, 8, 8)), axes='CYX')
  _raises(lambda: io.read_image(tmp_path / 'x.tif'),
          'x.tif: 2 channels (CYX, shape (2, 8, 8)); choose one for training with '
          '--config.data.channel=N')
  np.testing.assert_array_equal(io.read_image(tmp_path / 'x.tif', channel=1),
                                _ramp((2, 8, 8))[1])
  _raises(lambda: io.read_image(tmp_path / 'x.tif', channel=2),
          'x.tif: 2 channel(s); config.data.channel=2 needs at least 3')
  assert np.array_equal(io.read_image(tmp_path / 'one.tif', channel=0),
                        io.read_image(tmp_path / 'one.tif'))
  _raises(lambda: io.read_image(tmp_path / 'one.tif', channel=1),
          'one.tif: 1 channel(s); config.data.channel=1 needs at least 2')
  rgb = np.stack([_ramp((8, 8)), _ramp((8, 8)).T, np.zeros((8, 8), np.uint16)], -1)
  tifffile.imwrite(tmp_path / 'rgb.tif', rgb, photometric='rgb')
  np.testing.assert_array_equal(io.read_image(tmp_path / 'rgb.tif', channel=1), rgb[..., 1])
  _raises(lambda: io.read_mask(tmp_path / 'x.tif'), 'x.tif: 2 channels')
  tifffile.imwrite(tmp_path / 'b.tif', np.eye(4, dtype=bool))
  got = io.read_image(tmp_path / 'b.tif')
  assert got.dtype == np.uint8 and np.array_equal(got, np.eye(4))


def test_bad_files_one_line_errors(tmp_path):
  _raises(lambda: io.read_image_file(tmp_path / 'nope.tif'), 'nope.tif: file not found')
  (tmp_path / 'empty.tif').write_bytes(b'')
  _raises(lambda: io.read_image_file(tmp_path / 'empty.tif'), 'empty.tif: file is empty')
  (tmp_path / 'junk.tif').write_bytes(b'II*\x00garbage-not-a-tiff' * 3)
  _raises(lambda: io.read_image_file(tmp_path / 'junk.tif'), 'junk.tif: cannot read image')
  (tmp_path / 'junk.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not a png' * 8)
  _raises(lambda: io.read_image_file(tmp_path / 'junk.png'), 'junk.png: cannot read image')
  tifffile.imwrite(tmp_path / 'full.tif', _ramp((64, 64)))
  data = (tmp_path / 'full.tif').read_bytes()
  (tmp_path / 'cut.tif').write_bytes(data[:len(data) // 2])
  _raises(lambda: io.read_image_file(tmp_path / 'cut.tif'), 'cut.tif')
  bad = np.ones((2, 8, 8), np.float32)
  bad[1, 2, 3] = np.inf
  tifffile.imwrite(tmp_path / 'inf.tif', bad, photometric='minisblack')
  _raises(lambda: io.read_image_file(tmp_path / 'inf.tif'), 'inf.tif: image contains NaN')


def test_output_stem():
  assert io.output_stem(pathlib.Path('d/x.ome.tif')) == ('x', True)
  assert io.output_stem(pathlib.Path('x.OME.TIFF')) == ('x', True)
  assert io.output_stem(pathlib.Path('x.tif')) == ('x', False)
  assert io.output_stem(pathlib.Path('a.b.png')) == ('a.b', False)
  assert io.output_stem(pathlib.Path('x.ome.png')) == ('x.ome', False)
