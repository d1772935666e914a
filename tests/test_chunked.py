"""Chunked prediction (flmiseg/chunked/): an image predicted block by block gives what the
in-memory path gives, bit for bit; objects across block borders and corners get one label
each; a run killed with SIGKILL and started again ends with an uninterrupted run's output; a
dask.distributed cluster of two worker processes gives the threads' output; bad input is one
line and writes nothing.

One small image (256 x 256, 16-bit) of nucleus-like discs, some of them centred on the block
borders (x = 128, y = 128) and one on the corner where four blocks meet, predicted with the
shipped nucleus model (which has an instance head), in blocks of 128 (and of 96).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import tifffile
import zarr

import flmiseg
from flmiseg.chunked import engine
from flmiseg.chunked import run as chunked
from flmiseg.chunked import sources
from flmiseg.core.errors import UserError
from flmiseg.objects import instances
from tests import helpers

BLOCK = 128
# Disc centres: on the corner of four blocks, on the vertical and horizontal borders, two
# touching discs on either side of the vertical border, and two inside blocks.
CENTRES = ((128, 128), (50, 128), (128, 210), (205, 114), (205, 141), (40, 40), (128, 30))


def _discs() -> np.ndarray:
  yy, xx = np.mgrid[:256, :256]
  shape = np.zeros((256, 256), np.float32)
  for cy, cx in CENTRES:
    shape[(yy - cy) ** 2 + (xx - cx) ** 2 < 13 ** 2] = 1
  shape = cv2.GaussianBlur(shape, (0, 0), 1.5)
  noise = np.random.default_rng(0).normal(0, 60, shape.shape)
  return np.clip(400 + 3000 * shape + noise, 0, 65535).astype(np.uint16)


def write_ome_zarr(path, image, version: str, scale=(1.0, 1.0), unit=None, chunks=64):
  """An OME-Zarr of a 2-D image (or of a list of them: levels 0, 1, ..., each of twice the
  scale before) as another tool would write it (NGFF 0.4: zarr v2, '/' chunk keys; 0.5: zarr
  v3, metadata under 'ome')."""
  group = zarr.open_group(str(path), mode='w', zarr_format=2 if version == '0.4' else 3)
  extra = {'chunk_key_encoding': {'name': 'v2', 'separator': '/'}} if version == '0.4' else {}
  levels = image if isinstance(image, list) else [image]
  for level, pixels in enumerate(levels):
    group.create_array(str(level), data=pixels, chunks=(chunks, chunks), **extra)
  axes = [dict(name=n, type='space', **({'unit': unit} if unit else {})) for n in 'yx']
  multiscale = {'axes': axes, 'datasets': [
      {'path': str(level), 'coordinateTransformations': [
          {'type': 'scale', 'scale': [s * 2 ** level for s in scale]}]}
      for level in range(len(levels))]}
  if version == '0.4':
    group.attrs['multiscales'] = [{'version': '0.4', **multiscale}]
  else:
    group.attrs['ome'] = {'version': '0.5', 'multiscales': [multiscale]}
  return path


@pytest.fixture(scope='module')
def nucleus():
  return flmiseg.load('nucleus')


@pytest.fixture(scope='module')
def image():
  return _discs()


@pytest.fixture(scope='module')
def inputs(tmp_path_factory, image):
  root = tmp_path_factory.mktemp('chunked_inputs')
  with tifffile.TiffWriter(root / 'discs.ome.tif') as tif:
    tif.write(image, subifds=1, tile=(64, 64), metadata={'axes': 'YX'})
    tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64))
  return {'0.4': write_ome_zarr(root / 'discs.ome.zarr', image, '0.4'),
          '0.5': write_ome_zarr(root / 'discs05.ome.zarr', image, '0.5'),
          'tiff': root / 'discs.ome.tif'}


@pytest.fixture(scope='module')
def reference(nucleus, image):
  return nucleus.segment(image, instances=True, rescale=False)


@pytest.fixture(scope='module')
def chunked_run(nucleus, inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp('chunked_out')
  result = chunked.segment_zarr(nucleus, str(inputs['0.4']), str(out), instances=True,
                                save_prob=True, block=BLOCK, progress=False)
  return result, zarr.open_group(result['output'], mode='r')


def _arrays(group) -> dict:
  return {k: np.asarray(group[k][:]) for k in ('0', '1', 'labels/mask/0', 'labels/mask/1',
                                               'labels/instances/0', 'labels/instances/1')}


def _assert_same_outputs(a: dict, b: dict) -> None:
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_chunked_gives_the_in_memory_outputs_bit_for_bit(chunked_run, reference):
  result, group = chunked_run
  assert result['blocks'] == 4 and result['threshold'] == reference.threshold
  # The shipped nucleus model measures its objects on a first pass in memory; not here.
  assert any('not resized by the size of its objects' in note for note in result['notes'])
  np.testing.assert_array_equal(group['0'][:], reference.prob)
  np.testing.assert_array_equal(group['labels/mask/0'][:], reference.mask)
  labels = group['labels/instances/0'][:]
  assert labels.dtype == np.uint32
  pairs = np.unique(np.stack([reference.labels.ravel(), labels.ravel()]), axis=1)
  assert pairs.shape[1] == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))  # 1:1
  # Ids are each object's first pixel in raster order, plus 1: canonical, whatever the blocks.
  for value in np.unique(labels[labels > 0]):
    first = np.flatnonzero(labels.ravel() == value)[0]
    assert value == first + 1
  # The objects table: the in-memory table's rows, under the chunked ids.
  header, rows = instances.object_table(reference.labels, _discs(), None)
  renumber = dict(zip(pairs[0].tolist(), pairs[1].tolist()))
  expected = sorted([0, renumber[r[0]], *r[1:]] for r in rows)
  lines = pathlib.Path(result['table']).read_text().splitlines()
  assert lines[0].split(',') == ['plane'] + header
  got = sorted([int(v) if i < 2 else float(v) for i, v in enumerate(line.split(','))]
               for line in lines[1:])
  assert [g[:2] for g in got] == [e[:2] for e in expected]
  np.testing.assert_allclose([g[2:] for g in got], [e[2:] for e in expected], rtol=1e-12)


def test_objects_across_borders_and_corners_get_one_label_each(chunked_run):
  _, group = chunked_run
  labels = group['labels/instances/0'][:]
  found = [int(labels[cy, cx]) for cy, cx in CENTRES]
  assert 0 not in found and len(set(found)) == len(CENTRES)  # touching discs stay apart
  corner = labels == found[0]
  quadrants = [corner[:BLOCK, :BLOCK], corner[:BLOCK, BLOCK:], corner[BLOCK:, :BLOCK],
               corner[BLOCK:, BLOCK:]]
  assert all(q.sum() > 50 for q in quadrants)  # the corner disc lies in four blocks' cores
  for value, (cy, cx) in zip(found, CENTRES):
    count, _ = cv2.connectedComponents((labels == value).astype(np.uint8), connectivity=8)
    assert count == 2, (cy, cx)  # one piece (background + it): no seam splits it


def test_without_instances_blocks_need_no_halo_and_give_the_in_memory_mask(
    nucleus, inputs, reference, tmp_path):
  result = chunked.segment_zarr(nucleus, str(inputs['0.4']), str(tmp_path), block=BLOCK,
                                progress=False)
  group = zarr.open_group(result['output'], mode='r')
  assert result['table'] is None and group['labels'].attrs['labels'] == ['mask']
  np.testing.assert_array_equal(group['labels/mask/0'][:], reference.mask)
  prob = np.rint(reference.prob * 255.0).astype(np.uint8)  # uint8 without --save_prob
  np.testing.assert_array_equal(group['0'][:], prob)


def test_outputs_are_ngff_label_images_with_pyramids(chunked_run):
  result, group = chunked_run
  assert group.metadata.zarr_format == 2
  assert group.attrs['multiscales'][0]['version'] == '0.4'
  assert [d['path'] for d in group.attrs['multiscales'][0]['datasets']] == ['0', '1']
  assert group['labels'].attrs['labels'] == ['mask', 'instances']
  for name in ('mask', 'instances'):
    attrs = group[f'labels/{name}'].attrs
    assert attrs['image-label']['source'] == {'image': '../../'}
    scales = [d['coordinateTransformations'][0]['scale']
              for d in attrs['multiscales'][0]['datasets']]
    assert scales == [[1.0, 1.0], [2.0, 2.0]]
    np.testing.assert_array_equal(group[f'labels/{name}/1'][:],
                                  group[f'labels/{name}/0'][::2, ::2])
  assert not (pathlib.Path(result['table']).parent / '.discs.chunked').exists()
  # The output reads back as an OME-Zarr.
  back = sources.open_source(str(pathlib.Path(result['output']) / 'labels' / 'instances'),
                             level=1)
  assert back.shape == (128, 128) and back.layout.version == '0.4'


def test_a_killed_run_continues_to_the_uninterrupted_output(nucleus, inputs, chunked_run,
                                                            tmp_path):
  """SIGKILL after a few blocks, then the same run again: it continues and writes what the
  uninterrupted run wrote, though with blocks of 96 (9 blocks) rather than 128, into an NGFF
  0.5 input's own labels/ group (--labels_into_input) rather than a new OME-Zarr."""
  image = tmp_path / 'discs05.ome.zarr'
  shutil.copytree(inputs['0.5'], image)
  pixels = zarr.open_group(str(image), mode='r')['0'][:]
  out = tmp_path / 'out'
  args = [sys.executable, '-m', 'flmiseg.main', '--mode=predict', '--model=nucleus',
          f'--input={image}', f'--output={out}', '--instances', '--labels_into_input',
          '--block=96', '--workers=1']
  process = subprocess.Popen(args, env=helpers.cli_env(8), cwd=helpers.REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  records = out / '.discs05.chunked' / 'blocks'
  # The finished blocks' records; a record being written is a hidden temporary file.
  finished = lambda: [p for p in records.glob('*.npz') if not p.name.startswith('.')]
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if len(finished()) >= 2:
      os.kill(process.pid, signal.SIGKILL)
      break
    time.sleep(0.02)
  process.wait()
  assert process.returncode == -signal.SIGKILL, 'the run ended before it was killed'
  done = len(finished())
  assert 2 <= done < 9
  with pytest.raises(UserError, match='labels/mask exists'):  # other settings: kept
    chunked.segment_zarr(nucleus, str(image), str(out), block=96, into_input=True,
                         progress=False)
  result = chunked.segment_zarr(nucleus, str(image), str(out), instances=True, block=96,
                                workers=1, into_input=True, progress=False)
  assert result['resumed'] == done and result['output'] == str(image)
  group = zarr.open_group(str(image), mode='r')
  np.testing.assert_array_equal(group['0'][:], pixels)  # the image itself is untouched
  assert group.attrs['ome']['version'] == '0.5' and 'multiscales' in group.attrs['ome']
  assert group['labels'].attrs['ome'] == {'version': '0.5', 'labels': ['mask', 'instances']}
  assert group['labels/instances'].metadata.zarr_format == 3
  assert group['labels/instances/0'].metadata.dimension_names == ('y', 'x')
  labels = {k: v for k, v in _arrays(chunked_run[1]).items() if k.startswith('labels')}
  _assert_same_outputs(labels, {k: np.asarray(group[k][:]) for k in labels})
  # The same rows (in the order of the blocks, which differ here), to the last digit.
  rows = [sorted(pathlib.Path(r['table']).read_text().splitlines()) for r in (result,
                                                                             chunked_run[0])]
  assert rows[0] == rows[1]


def test_a_local_cluster_of_two_processes_gives_the_threads_output(nucleus, inputs,
                                                                   chunked_run, tmp_path):
  """Two dask.distributed worker processes, each loading the model once, on the pyramidal
  OME-TIFF of the same pixels."""
  distributed = pytest.importorskip('distributed')
  with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                dashboard_address=None) as cluster:
    result = chunked.segment_zarr(nucleus, str(inputs['tiff']), str(tmp_path), instances=True,
                                  save_prob=True, block=BLOCK,
                                  scheduler=cluster.scheduler_address, progress=False)
  group = zarr.open_group(result['output'], mode='r')
  assert group.metadata.zarr_format == 3  # a TIFF input gets NGFF 0.5
  _assert_same_outputs(_arrays(chunked_run[1]), _arrays(group))


def _nothing_written(path: pathlib.Path) -> bool:
  return not path.exists() or not any(path.iterdir())


@pytest.mark.parametrize('case', ['no_ngff', 'level', 'block', 'exists', 'scheduler'])
def test_bad_input_is_one_line_and_writes_nothing(nucleus, inputs, chunked_run, tmp_path,
                                                  monkeypatch, case):
  monkeypatch.setattr(engine, 'CONNECT_TIMEOUT_S', 1)
  plain = tmp_path / 'plain.zarr'
  zarr.create_array(str(plain), data=_discs(), chunks=(64, 64))
  out = tmp_path / 'out'
  src, kwargs, expected = {
      'no_ngff': (plain, {}, f'{plain}: a zarr array without NGFF'),
      'level': (inputs['0.4'], {'level': 3}, '--level=3: .* has level\\(s\\) 0 to 0'),
      'block': (inputs['0.4'], {'block': 32}, '--block=32: smaller than the halo of 64'),
      'exists': (inputs['0.4'], {}, 'discs.ome.zarr exists; use --overwrite'),
      'scheduler': (inputs['0.4'], {'scheduler': 'tcp://127.0.0.1:1'},
                    '--scheduler=tcp://127.0.0.1:1: cannot reach'),
  }[case]
  if case == 'exists':
    out = pathlib.Path(chunked_run[0]['output']).parent
  before = {p: p.stat().st_mtime_ns for p in out.rglob('*')} if out.exists() else {}
  with pytest.raises(UserError, match=expected) as error:
    chunked.segment_zarr(nucleus, str(src), str(out), instances=True, progress=False,
                         **kwargs)
  assert '\n' not in str(error.value)
  if case == 'exists':
    assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before
  else:
    assert _nothing_written(out)


def test_the_command_line_reports_a_zarr_without_axes_in_one_line(tmp_path):
  plain = tmp_path / 'plain.zarr'
  zarr.create_array(str(plain), data=_discs(), chunks=(64, 64))
  result = helpers.run_cli(['--mode=predict', '--model=nucleus', f'--input={plain}',
                            f'--output={tmp_path / "out"}'])
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert errors == [f'error: {plain}: a zarr array without NGFF (OME-Zarr) metadata: give its '
                    'axes with --axes (one letter per dimension of (256, 256), e.g. YX)']
  assert 'Traceback' not in result.stderr and not (tmp_path / 'out').exists()


def test_sources_read_levels_pixel_sizes_channels_and_regions(tmp_path, image):
  ngff = write_ome_zarr(tmp_path / 'a.ome.zarr', image, '0.5', scale=(0.5, 0.25),
                        unit='micrometer')
  source = sources.open_source(str(ngff))
  assert (source.pixel_size, source.name, source.shape) == (0.25, 'a', (256, 256))
  np.testing.assert_array_equal(source.read((), (10, 20), (30, 45)), image[10:20, 30:45])
  with tifffile.TiffWriter(tmp_path / 'p.ome.tif') as tif:
    tif.write(image, subifds=1, tile=(64, 64),
              metadata={'axes': 'YX', 'PhysicalSizeX': 0.2, 'PhysicalSizeY': 0.2})
    tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64))
  level1 = sources.open_source(str(tmp_path / 'p.ome.tif'), level=1)
  assert level1.shape == (128, 128) and level1.pixel_size == pytest.approx(0.4)
  np.testing.assert_array_equal(level1.read((), (0, 128), (0, 128)), image[::2, ::2])
  stack = np.stack([image, image // 2, image // 3])
  zarr.create_array(str(tmp_path / 'c.zarr'), data=stack, chunks=(1, 64, 64))
  channels = sources.open_source(str(tmp_path / 'c.zarr'), axes='CYX', channel=2)
  assert channels.pixel_size is None and channels.plane_axes == 'YX'
  np.testing.assert_array_equal(channels.read((), (5, 9), (0, 256)), stack[2, 5:9])
  with pytest.raises(UserError, match='3 channels; choose one with --channel'):
    sources.open_source(str(tmp_path / 'c.zarr'), axes='CYX')
