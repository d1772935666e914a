"""Draws docs/napari_zarr.png: napari showing a chunked run's OME-Zarr labels over its input.

  xvfb-run -a python -m experiments.figures.napari_zarr_screenshot [--out=docs/napari_zarr.png]

Builds a 1024 x 1024 simulated nucleus OME-Zarr (NGFF 0.4) as
experiments/benchmarks/gigapixel.py builds its mosaics, predicts it block by block with the
shipped nucleus model and --instances (`flmiseg.segment_zarr`, blocks of 512: four blocks,
objects across their borders one label each), then opens both in napari through napari's own
reader (plugin 'napari', napari_builtins): the input as an image, the output's
labels/instances (two levels) as a multiscale Labels layer; draws the blocks' borders and
saves the whole window.

napari's reader reads a zarr group of arrays as the levels of one multiscale image, not the
NGFF metadata: it opens the input, and each label image (`<output>/labels/<name>`) once told
its layer type (`layer_type='labels'`), at one pixel per unit (both images here have the same
grid, so they align); the output's root it cannot open (it descends into `labels/`, which
holds groups, and finds no arrays). napari-ome-zarr (ome-zarr-py), which reads the metadata
and the root with its labels, is not a dependency: docs/large_images.md, Dependencies.
Needs the napari and zarr extras; xvfb-run as for experiments/figures/napari_screenshot.py.
"""

import pathlib
import shutil
import tempfile
import time

from absl import app
from absl import flags

from experiments.benchmarks import gigapixel

FLAGS = flags.FLAGS
SIZE = 1024  # the input's side, pixels (one simulated field of gigapixel.TILE)
BLOCK = 512  # the chunked run's blocks: 2 x 2


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('out', 'docs/napari_zarr.png', 'Output PNG.')
  flags.DEFINE_string('workdir', '', 'Where the OME-Zarr input and output go (default: a '
                      'temporary folder, removed after).')
  flags.DEFINE_integer('width', 1280, 'Window width, pixels.')
  flags.DEFINE_integer('height', 760, 'Window height, pixels.')


def predict(workdir: pathlib.Path) -> tuple[pathlib.Path, dict]:
  """(the input OME-Zarr, segment_zarr's result) of the simulated nuclei in `workdir`."""
  import flmiseg  # pylint: disable=g-import-not-at-top
  source = workdir / 'nuclei.ome.zarr'
  gigapixel.build(source, SIZE, '0.4', None)
  result = flmiseg.segment_zarr(flmiseg.load('nucleus'), str(source), str(workdir / 'out'),
                                instances=True, block=BLOCK, overwrite=True)
  print(f'Predicted {result["blocks"]} blocks: {result["objects"]} objects in '
        f'{result["output"]}')
  return source, result


def show(source: pathlib.Path, result: dict, out: pathlib.Path) -> None:
  """Opens the input and the instances with napari's reader and saves the window."""
  import napari  # pylint: disable=g-import-not-at-top
  from qtpy.QtWidgets import QApplication  # pylint: disable=g-import-not-at-top
  viewer = napari.Viewer(show=True)
  viewer.window._qt_window.resize(FLAGS.width, FLAGS.height)  # pylint: disable=protected-access
  [image] = viewer.open(str(source), plugin='napari', name='nuclei.ome.zarr')
  instances = pathlib.Path(result['output']) / 'labels' / 'instances'
  [labels] = viewer.open(str(instances), plugin='napari', layer_type='labels',
                         name='labels/instances', opacity=0.5)
  for layer in (image, labels):
    print(f'{layer.name}: {type(layer).__name__}, levels {layer.level_shapes.tolist()}, '
          f'{layer.dtype}')
  borders = [[[BLOCK * i, 0], [BLOCK * i, SIZE]] for i in range(1, SIZE // BLOCK)]
  borders += [[[y, x] for x, y in line] for line in borders]
  viewer.add_shapes(borders, shape_type='line', edge_color='yellow', edge_width=2,
                    name='block borders')
  viewer.layers.selection.active = labels
  viewer.reset_view()
  for _ in range(20):
    QApplication.processEvents()
    time.sleep(0.05)
  out.parent.mkdir(parents=True, exist_ok=True)
  viewer.screenshot(str(out), canvas_only=False, flash=False)
  print(f'Written: {out}')
  viewer.close()


def main(argv):
  del argv
  if FLAGS.workdir:
    workdir = pathlib.Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
  else:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix='napari_zarr_'))
  try:
    show(*predict(workdir), pathlib.Path(FLAGS.out))
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
