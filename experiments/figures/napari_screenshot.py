"""Draws docs/napari.png: the napari widget after segmenting a simulated nucleus image.

  python -m experiments.figures.napari_screenshot [--out=docs/napari.png]
  xvfb-run -a python -m experiments.figures.napari_screenshot     # on a machine without a screen

Needs the napari extra (pip install "flmiseg[napari]"). Opens napari with the plugin's sample
image (File > Open Sample > flmiseg > Simulated nuclei), docks the Segment widget, segments
with the shipped nucleus model (calibrated threshold, instances) and saves the whole window.
Under xvfb-run Qt uses its xcb platform, which needs (Debian) libxcb-icccm4,
libxcb-keysyms1, libxcb-image0, libxcb-render-util0, libxcb-xinerama0, libxcb-cursor0 and
libxkbcommon-x11-0: the offscreen platform, which the tests use, draws no canvas.
"""

import pathlib
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('out', 'docs/napari.png', 'Output PNG.')
  flags.DEFINE_integer('width', 1280, 'Window width, pixels.')
  flags.DEFINE_integer('height', 760, 'Window height, pixels.')


def main(argv):
  del argv
  import napari  # pylint: disable=g-import-not-at-top
  import npe2  # pylint: disable=g-import-not-at-top
  from qtpy.QtWidgets import QApplication  # pylint: disable=g-import-not-at-top
  manager = npe2.PluginManager.instance()
  if 'flmiseg' not in manager:  # a source tree that was not pip-installed
    manager.register(npe2.PluginManifest.from_file(
        pathlib.Path(__file__).resolve().parents[2] / 'flmiseg' / 'napari' / 'napari.yaml'))
  viewer = napari.Viewer(show=True)
  viewer.window._qt_window.resize(FLAGS.width, FLAGS.height)  # pylint: disable=protected-access
  viewer.open_sample('flmiseg', 'nucleus')
  _, widget = viewer.window.add_plugin_dock_widget('flmiseg', 'Segment')
  widget._instances.value = True  # pylint: disable=protected-access
  widget.run()
  while widget.busy:
    QApplication.processEvents()
    time.sleep(0.05)
  viewer.layers['simulated nucleus mask'].visible = False  # the instances show the mask too
  viewer.layers.selection.active = viewer.layers['simulated nucleus']
  viewer.reset_view()
  # The notification of the warning (no instance head) would cover part of the image.
  # pylint: disable-next=g-import-not-at-top
  from napari._qt.dialogs.qt_notification import NapariQtNotification
  window = viewer.window._qt_window  # pylint: disable=protected-access
  for toast in window.findChildren(NapariQtNotification):
    toast.close()
  for _ in range(20):
    QApplication.processEvents()
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  viewer.screenshot(str(out), canvas_only=False, flash=False)
  print(f'Written: {out}')
  viewer.close()


if __name__ == '__main__':
  define_flags()
  app.run(main)
