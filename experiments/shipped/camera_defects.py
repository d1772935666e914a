"""What real camera images do to the shipped models: hot pixels, a stitching border,
saturation, and sparse fields.

  python -m experiments.shipped.camera_defects [--before]

Camera images: for each shipped model (er, mito, nucleus), the 512x512 simulated image of
the end-to-end check (`simulate.simulate(kind, 512, default_rng(77))`) as a 16-bit camera
writes it (offset 100, about 3,100 counts at the brightest pixel), then: with 300 hot pixels
at 65535; with its left 180 columns 0 (what stitching or registration leaves); with its
brightest 3 % saturated; with 6 debris blobs (radius 4 or 8 px) 10x as bright as its
brightest structure. Mask IoU against the simulator's mask on the columns right of the border
(and away from the debris), through `flmiseg.inference.model` (the predict path).

Sparse fields: 1024x1024 simulated nucleus fields with the simulator's density knob below its
range (0.15 and 0.5 nuclei per 256x256; 14 is the default), seeds 60 and 61, the shipped
nucleus model, IoU against the simulator's mask.

`--before` runs the code as it was before 2026-12-06: no `preprocess.repair` beyond NaN, and
no bounds for sparse fields and debris (`preprocess.SPARSE_TOP_RATIO`, `DEBRIS_RATIO`). The
figures are in docs/inference.md.
"""

import math

from absl import app
from absl import flags
import cv2
import numpy as np

import flmiseg
from flmiseg.core import console
from flmiseg.evaluation import metrics
from flmiseg.data import loader
from flmiseg.data import preprocess
from flmiseg.data import simulate

BORDER = 180  # columns of zeros in the 'border' variant; IoU is taken right of them


def camera_variants(kind: str, masks: str = 'geometry') -> tuple[dict[str, np.ndarray],
                                                                  np.ndarray]:
  """({variant: uint16 image}, bool truth) of the kind's end-to-end image, its mask drawn
  as `masks` says (simulate.MASKS)."""
  image, mask = simulate.simulate(kind, 512, np.random.default_rng(77), masks=masks)
  image = image.astype(np.float64)
  clean = np.round(100 + image / image.max() * 3000).astype(np.uint16)
  hot = clean.copy()
  ys, xs = np.random.default_rng(3).integers(0, 512, (2, 300))
  hot[ys, xs] = 65535
  border = clean.copy()
  border[:, :BORDER] = 0
  saturated = np.minimum(clean, np.percentile(clean, 97)).astype(np.uint16)
  variants = {'clean': clean, '300 hot pixels': hot, f'left {BORDER} columns 0': border,
              'brightest 3 % saturated': saturated}
  for radius in (4, 8):
    variants[f'6 debris blobs of radius {radius}, 10x as bright'] = debris(clean, radius)
  return variants, mask > 0


def debris(image: np.ndarray, radius: int) -> np.ndarray:
  """`image` with 6 blurred discs of `radius` at 10x its brightest structure (dead cells,
  aggregates); the IoU leaves them and their surroundings out (`debris_free`)."""
  return np.round(image + _debris_map(radius) * 10 * 3000).clip(0, 65535).astype(np.uint16)


def _debris_map(radius: int) -> np.ndarray:
  blobs = np.zeros((512, 512), np.float32)
  for y, x in np.random.default_rng(5).integers(20, 492, (6, 2)):
    cv2.circle(blobs, (int(x), int(y)), radius, 1.0, -1)
  return cv2.GaussianBlur(blobs, (0, 0), 1.5)


def debris_free(name: str) -> np.ndarray:
  """bool (512, 512): where a variant's IoU is taken (all but the debris and 4 px around)."""
  if 'debris' not in name:
    return np.ones((512, 512), bool)
  radius = int(name.split('radius ')[1].split(',')[0])
  return cv2.dilate((_debris_map(radius) > 0.05).astype(np.uint8),
                    np.ones((9, 9), np.uint8)) == 0


def sparse_fields() -> list[tuple[str, np.ndarray, np.ndarray]]:
  """[(name, image, bool truth)] of 1024x1024 nucleus fields of a few nuclei."""
  low, high = simulate.RANGES['density']
  simulate.RANGES['density'] = (0.01, high)  # below the knob's range, for this experiment
  try:
    fields = []
    for density in (0.15, 0.5, 14.0):
      for seed in (60, 61):
        image, mask = simulate.simulate('nucleus', 1024, np.random.default_rng(seed),
                                        simulate.Params(density=density))
        fields.append((f'density {density:g}, seed {seed}, nuclei '
                       f'{100 * (mask > 0).mean():.2f} %', image, mask > 0))
    return fields
  finally:
    simulate.RANGES['density'] = (low, high)


def _without_repair(planes, name):
  """preprocess.repair as it was: NaN/inf only, filled with the plane's lowest finite value."""
  planes = np.asarray(planes)
  if not np.issubdtype(planes.dtype, np.floating) or np.isfinite(planes).all():
    return planes, None, []
  missing = ~np.isfinite(planes)
  lowest = np.where(missing, np.inf, planes).min(axis=(1, 2), keepdims=True)
  return np.where(missing, lowest, planes), missing, []


def main(argv):
  del argv
  console.setup()
  if FLAGS.before:
    preprocess.repair = _without_repair
    preprocess.SPARSE_TOP_RATIO = math.inf
    preprocess.DEBRIS_RATIO = math.inf
  print('| image | model | IoU |')
  print('|---|---|---|')
  for kind in ('er', 'mito', 'nucleus'):
    model = flmiseg.load(kind)
    variants, truth = camera_variants(kind, loader.synthetic_masks(model.config.data))
    for name, image in variants.items():
      keep = debris_free(name)[:, BORDER:]
      iou = metrics.mask_iou((model.segment(image).mask[:, BORDER:] > 0) & keep,
                             truth[:, BORDER:] & keep)
      print(f'| {name} | {kind} | {iou:.3f} |', flush=True)
  model = flmiseg.load('nucleus')
  for name, image, truth in sparse_fields():
    iou = metrics.mask_iou(model.segment(image).mask, truth)
    print(f'| sparse field: {name} | nucleus | {iou:.3f} |', flush=True)
  print('code before 2026-12-06' if FLAGS.before else 'current code')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_bool('before', False, 'Run without the repairs and the normalisation bounds.')
  app.run(main)
