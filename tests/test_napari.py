"""The napari plugin (flmiseg/napari), headless: the manifest, the sample data, and the widget,
which segments an image layer in a worker thread into the Labels layers that
`flmiseg.load(...).segment` (the code of --mode=predict, tests/test_segment.py) gives.

Needs the napari extra (`pip install "flmiseg[napari]"`) and pytest-qt, which CI installs;
without them these tests are skipped. napari draws with OpenGL: on Linux without a display, a
private Xvfb server (Debian package xvfb, with Mesa's software OpenGL, libgl1-mesa-dri; .ci/run
installs both) gives Qt's offscreen platform its OpenGL context.
"""

import ctypes
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tomllib

import numpy as np
import pytest

import flmiseg
from flmiseg.data import simulate
from flmiseg.data import synthetic

napari = pytest.importorskip(
    'napari', reason='the napari extra is not installed (pip install "flmiseg[napari]")')
pytest.importorskip('pytestqt', reason='pytest-qt is not installed (requirements-dev.txt)')

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANIFEST = ROOT / 'flmiseg' / 'napari' / 'napari.yaml'
GL_PACKAGES = 'xvfb libgl1-mesa-dri libegl1 libxkbcommon0 libfontconfig1 libdbus-1-3'


@pytest.fixture(scope='session', autouse=True)
def _display(tmp_path_factory):
  """Qt's offscreen platform, with OpenGL from an X server: $DISPLAY's, else a private Xvfb
  (Linux). Set before pytest-qt creates the QApplication (session fixtures run first)."""
  if not sys.platform.startswith('linux'):
    yield  # macOS and Windows draw OpenGL without an X server
    return
  os.environ.setdefault('QT_QPA_PLATFORM', 'offscreen')
  # napari keeps settings in a file: the tests' go to a folder of their own.
  os.environ.setdefault('NAPARI_CONFIG',
                        str(tmp_path_factory.mktemp('napari') / 'settings.yaml'))
  if os.environ.get('DISPLAY'):
    yield
    return
  if shutil.which('Xvfb') is None:  # .ci/run installs it, so CI runs these tests
    pytest.skip('no display for napari\'s OpenGL canvas: install Xvfb and Mesa (Debian: '
                f'apt-get install {GL_PACKAGES}), or set $DISPLAY')
  read, write = os.pipe()
  server = subprocess.Popen(
      ['Xvfb', '-displayfd', str(write), '-screen', '0', '1280x1024x24', '-nolisten', 'tcp'],
      pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      preexec_fn=_end_with_parent)
  os.close(write)
  number = b''
  while not number.endswith(b'\n') and select.select([read], [], [], 20)[0]:
    chunk = os.read(read, 16)  # Xvfb writes the display number it chose when it is ready
    if not chunk:
      break
    number += chunk
  os.close(read)
  if not number.strip():
    server.kill()
    pytest.fail('Xvfb did not start (run `Xvfb :99` to see why)')
  os.environ['DISPLAY'] = f':{number.decode().strip()}'
  yield
  from qtpy.QtWidgets import QApplication  # pylint: disable=g-import-not-at-top
  if QApplication.instance() is None:
    server.terminate()
    server.wait()
  # Otherwise Qt stays connected until this process ends, and ending the server now would
  # end the process with an X I/O error (status 1): it ends with this process instead.


def _end_with_parent():
  """In the child, before exec: the kernel sends it SIGTERM when this process ends."""
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture
def make_napari_viewer(qtbot):
  """Makes hidden napari viewers, closed after the test. (napari's own pytest plugin has one,
  but pyproject.toml keeps that plugin off: it imports napari into every pytest process.)"""
  del qtbot  # its QApplication is the viewers'
  viewers = []

  def make():
    viewers.append(napari.Viewer(show=False))
    return viewers[-1]
  yield make
  for viewer in viewers:
    viewer.close()


@pytest.fixture(scope='module')
def cells():
  """(a simulated 128x128 nucleus image, its ground-truth mask as bool)."""
  image, truth = simulate.simulate('nucleus', 128, synthetic.image_rng(3, 'test', 0))
  return image, truth > 0


@pytest.fixture(scope='module')
def nucleus():
  return flmiseg.load('nucleus')


def _open_widget(viewer):
  """The Segment widget, docked through the manifest (registered from the source tree when
  flmiseg was installed without its entry point, e.g. before `pip install -e .`)."""
  import npe2  # pylint: disable=g-import-not-at-top
  manager = npe2.PluginManager.instance()
  if 'flmiseg' not in manager:
    manager.register(npe2.PluginManifest.from_file(MANIFEST))
  _, widget = viewer.window.add_plugin_dock_widget('flmiseg', 'Segment')
  return widget


def _run(widget, qtbot):
  worker = widget.run()
  assert worker is not None
  qtbot.waitUntil(lambda: not widget.busy, timeout=180_000)
  return widget.result


def test_manifest_and_entry_point():
  import npe2  # pylint: disable=g-import-not-at-top
  manifest = npe2.PluginManifest.from_file(MANIFEST)
  manifest.validate_imports()  # every python_name imports and exists
  assert manifest.name == 'flmiseg'
  assert [w.display_name for w in manifest.contributions.widgets] == ['Segment']
  assert {s.key for s in manifest.contributions.sample_data} == {'er', 'mito', 'nucleus'}
  project = tomllib.loads((ROOT / 'pyproject.toml').read_text())
  entry = project['project']['entry-points']['napari.manifest']['flmiseg']
  assert entry == 'flmiseg.napari:napari.yaml'
  assert 'napari/napari.yaml' in project['tool']['setuptools']['package-data']['flmiseg']


def test_widget_segments_the_layer_as_predict_does(make_napari_viewer, qtbot, cells, nucleus):
  image, truth = cells
  viewer = make_napari_viewer()
  layer = viewer.add_image(image, name='cells', scale=(0.5, 0.5), translate=(3, 4))
  widget = _open_widget(viewer)
  assert widget._image.value is layer
  widget._instances.value = True
  result = _run(widget, qtbot)
  expected = nucleus.segment(image, instances=True)
  mask, objects = viewer.layers['cells mask'], viewer.layers['cells instances']
  assert isinstance(mask, napari.layers.Labels) and isinstance(objects, napari.layers.Labels)
  np.testing.assert_array_equal(mask.data, expected.mask)
  np.testing.assert_array_equal(objects.data, expected.labels)
  assert tuple(mask.scale) == (0.5, 0.5) and tuple(mask.translate) == (3, 4)
  assert (mask.data > 0).sum() and ((mask.data > 0) & truth).sum() / (
      (mask.data > 0) | truth).sum() > 0.8
  assert widget._progress.value == 100 and 'calibrated' in widget._status.value
  assert widget._threshold.value == pytest.approx(result.threshold)
  assert widget._pixel_size.value == 0  # scale 0.5 in pixels (napari's default units): unknown
  microns = viewer.add_image(image, name='microns', scale=(0.16, 0.16), units=('um', 'um'))
  widget._image.value = microns
  assert widget._pixel_size.value == pytest.approx(0.16)
  nanometres = viewer.add_image(image, name='nm', scale=(65, 65), units=('nm', 'nm'))
  widget._image.value = nanometres
  assert widget._pixel_size.value == pytest.approx(0.065)
  _run(widget, qtbot)  # the shipped model knows no pixel size: the same mask
  np.testing.assert_array_equal(viewer.layers['nm mask'].data, expected.mask)
  widget._diameter.value = 15.5  # resized x2 to the model's 31 px (not by the 0.065 um)
  _run(widget, qtbot)
  np.testing.assert_array_equal(viewer.layers['nm mask'].data,
                                nucleus.segment(image, diameter=15.5).mask)
  assert widget.result.warnings[0] == ("nm: resized x2 so its objects (15.5 px, --diameter) "
                                       "match the model's (31 px)")
  widget._diameter.value = 0
  widget._image.value = layer

  # A threshold of one's own: fewer pixels, and exactly the probabilities above it.
  widget._calibrated.value = False
  widget._threshold.value = 0.9
  _run(widget, qtbot)
  assert len(viewer.layers) == 7  # the Labels layers are replaced, not added again
  # (The model measures the nuclei on a first pass at the threshold given, so compare with
  # the same call.)
  own = nucleus.segment(image, threshold=0.9)
  np.testing.assert_array_equal(viewer.layers['cells mask'].data, own.mask)
  np.testing.assert_array_equal(own.mask, own.prob > 0.9)
  assert viewer.layers['cells mask'].data.sum() < expected.mask.sum()


def test_widget_channel_option_picks_the_channel(make_napari_viewer, qtbot, cells, nucleus):
  image, _ = cells
  noise = np.random.default_rng(0).integers(0, 256, image.shape).astype(np.uint8)
  viewer = make_napari_viewer()
  viewer.add_image(np.stack([noise, image]), name='two')  # CYX, one layer
  widget = _open_widget(viewer)
  widget._channel.value = 1
  _run(widget, qtbot)
  np.testing.assert_array_equal(viewer.layers['two mask'].data, nucleus.segment(image).mask)
  assert '(CYX)' in widget._status.value
  widget._channel.value = 0
  _run(widget, qtbot)
  np.testing.assert_array_equal(viewer.layers['two mask'].data, nucleus.segment(noise).mask)
  assert widget._channel.choices == (-1, 0, 1)  # shown as none, 0, 1
  rgb = viewer.add_image(np.stack([image] * 3, axis=-1), name='rgb', rgb=True)
  widget._image.value = rgb  # grey in RGB: its luminance is the image
  widget._channel.value = -1
  _run(widget, qtbot)
  assert '(YXS)' in widget._status.value
  np.testing.assert_array_equal(viewer.layers['rgb mask'].data, nucleus.segment(image).mask)
  widget._image.value = viewer.layers['two']
  widget._channel.value = 1
  widget._axes.value = 'zyx'  # a stack has no channel 1: a notification; the layer stays
  _run(widget, qtbot)
  assert 'failed: --channel=1: two has no channel axis' in widget._status.value
  np.testing.assert_array_equal(viewer.layers['two mask'].data, nucleus.segment(noise).mask)


def test_sample_data_and_run_folder_choice(make_napari_viewer, qtbot):
  viewer = make_napari_viewer()
  import npe2  # pylint: disable=g-import-not-at-top
  if 'flmiseg' not in npe2.PluginManager.instance():
    npe2.PluginManager.instance().register(npe2.PluginManifest.from_file(MANIFEST))
  viewer.open_sample('flmiseg', 'nucleus')
  assert [l.name for l in viewer.layers] == ['simulated nucleus', 'simulated nucleus truth']
  assert viewer.layers['simulated nucleus'].data.shape == (256, 256)
  widget = _open_widget(viewer)
  widget._model.value = 'run folder...'
  assert widget._folder.native.isVisibleTo(widget.native)
  assert widget.run() is None  # no folder chosen yet: a notification, no worker
