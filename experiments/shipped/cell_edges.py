"""The shipped models on images with a cell edge: beyond it, only the camera's background.

  python -m experiments.shipped.cell_edges [--kinds=er,mito] [--model=DIR]

Real ER and mitochondria images often show a cell's edge, with dark glass beyond it; the
simulator's default images are cytoplasm from border to border. Test images: the 20 default-
knob test images of each kind (`common.test_pairs`, seed 1000), each pasted into a
cell (an irregular blob, seeded, 33-61 % of the field outside it, its edge softened over about
two pixels) whose outside holds the camera alone: the kind's offset, read noise and a Poisson
background of 2 photons. The mask is the original one inside the cell. Reported: mean IoU of
the original images and of the cell-edge images on the pixels more than 4 px from the edge
(structures cut by the pasted edge fade out over its softening, which no real cell does), and
the predicted pixels outside the cell per image.
`--model` measures a run or packed folder instead of the shipped model (one kind).
"""

import dataclasses
import pathlib
import tempfile

from absl import app
from absl import flags
import cv2
import numpy as np
from scipy import ndimage
import tifffile

from experiments import common
from flmiseg.core import console
from flmiseg.evaluation import metrics
from flmiseg.store import pretrained
from flmiseg.data import simulate


def cell_edge_pairs(kind: str, folder: pathlib.Path):
  """(original pairs, cell-edge pairs written into `folder`, their cell maps (bool))."""
  folder.mkdir(parents=True, exist_ok=True)
  knobs = simulate.resolve(kind, None)
  rng = np.random.default_rng(7)
  pairs = common.test_pairs(kind, 'default')
  edged, cells = [], []
  for i, pair in enumerate(pairs):
    raw = tifffile.imread(pair.image)
    image = raw.astype(np.float64)
    h, w = image.shape
    cell = np.zeros((h, w), np.uint8)
    centre = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h])
    radii = rng.uniform(0.35, 0.5, 2) * [w, h]
    contour = simulate._blob_contour(rng, centre, radii, rng.uniform(0, np.pi), 0.25)  # pylint: disable=protected-access
    cv2.fillPoly(cell, [contour], 1)
    soft = ndimage.gaussian_filter(cell.astype(np.float64), 2.0)
    glass = (rng.poisson(2.0, image.shape) + knobs.offset +
             rng.normal(0, knobs.read_noise, image.shape))
    mixed = np.round(soft * image + (1 - soft) * glass).clip(0, np.iinfo(raw.dtype).max)
    truth = (tifffile.imread(pair.mask) > 0) & (soft > 0.5)
    image_path, mask_path = folder / f'{i:02d}.tif', folder / f'{i:02d}_mask.tif'
    tifffile.imwrite(image_path, mixed.astype(raw.dtype))
    tifffile.imwrite(mask_path, truth.astype(np.uint8) * 255)
    edged.append(dataclasses.replace(pair, image=image_path, mask=mask_path))
    cells.append(cell > 0)
  return pairs, edged, cells


def _scores(folder, pairs, cells) -> tuple[float, float]:
  """(mean IoU more than 4 px from the cell's edge, mean predicted pixels outside the cell) of
  the model in `folder` on `pairs`."""
  ious, outside = [], []
  for pair, cell, pred in zip(pairs, cells, common.predictions(folder, pairs)):
    truth = tifffile.imread(pair.mask) > 0
    far = ~(ndimage.binary_dilation(cell, iterations=4) & ~ndimage.binary_erosion(
        cell, iterations=4))
    ious.append(metrics.mask_iou(pred & far, truth & far))
    outside.append((pred & ~cell).sum())
  return float(np.mean(ious)), float(np.mean(outside))


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  print('| model | IoU, cytoplasm to the borders | IoU, with a cell edge | predicted pixels '
        'outside the cell |\n|---|---|---|---|')
  for kind in FLAGS.kinds:
    folder = pathlib.Path(FLAGS.model) if FLAGS.model else pretrained.PRETRAINED_DIR / kind
    with tempfile.TemporaryDirectory() as tmp:
      pairs, edged, cells = cell_edge_pairs(kind, pathlib.Path(tmp))
      plain, _ = _scores(folder, pairs, cells)
      edge, outside = _scores(folder, edged, cells)
    print(f'| {kind} ({folder}) | {plain:.3f} | {edge:.3f} | {outside:.0f} |', flush=True)


if __name__ == '__main__':
  flags.DEFINE_list('kinds', ['er', 'mito'], 'Shipped models to measure (er, mito).')
  flags.DEFINE_string('model', '', 'A run or packed folder to measure instead (one kind).')
  app.run(main)
