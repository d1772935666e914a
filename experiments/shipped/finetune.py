"""Fine-tuning a shipped model on 12 crops of 128x128 versus training from scratch on them.

  python -m experiments.shipped.finetune --kind=nucleus --workdir=runs/finetune [--seeds=3]
  python -m experiments.shipped.finetune --kind=er --knobs=default --annotation=thick

`--annotation=thick|thin` redraws every mask (crops and test set) one pixel wider or narrower
on each side (4-connected dilation or erosion), as another annotator's convention: the
shipped model draws the simulator's boundaries, so fine-tuning has to learn the new ones.

The 12 crops are cut from simulated images drawn with the simulator's 'shifted' knobs (a
microscope unlike the simulator's defaults), the test set is 20 other 'shifted' images of an
unseen seed. Rows, same data, same steps (configs/finetune.py): the shipped model as it is
(no training), fine-tuned from it (BatchNorm statistics updated, or frozen with
config.train.freeze_batch_stats), and the same recipe from a random initialisation
(--recipes picks the rows).
"""

import dataclasses
import pathlib

from absl import app
from absl import flags
import numpy as np
from scipy import ndimage
import tifffile

from experiments import common
from flmiseg.core import console
from flmiseg.data import io
from flmiseg.store import pretrained

CROP = common.CROP


def annotate(mask: np.ndarray, annotation: str) -> np.ndarray:
  """The binary mask as an annotator with `annotation`'s convention draws it: 'simulator'
  (as simulated), 'thick' (one pixel more on every side) or 'thin' (one pixel less)."""
  mask = mask > 0
  if annotation == 'thick':
    return ndimage.binary_dilation(mask)
  if annotation == 'thin':
    return ndimage.binary_erosion(mask)
  return mask


def annotated_test_pairs(kind: str, knobs: str, annotation: str, root: pathlib.Path):
  """The 20 test (image, mask) pairs; masks redrawn with `annotation` (into root/test_masks)."""
  pairs = common.test_pairs(kind, knobs, 40)[:20]
  if annotation == 'simulator':
    return pairs
  (root / 'test_masks').mkdir(parents=True, exist_ok=True)
  out = []
  for pair in pairs:
    path = root / 'test_masks' / pathlib.Path(pair.mask).name
    tifffile.imwrite(path, annotate(io.read_mask(pair.mask), annotation).astype(np.uint8) * 255)
    out.append(dataclasses.replace(pair, mask=path))
  return out


def write_crops(kind: str, root: pathlib.Path, num: int = 12, knobs: str = 'shifted',
                annotation: str = 'simulator') -> pathlib.Path:
  """`num` 128x128 crops (image, mask) of simulated images with `knobs`, masks drawn with
  `annotation` (annotate); returns the list."""
  pairs = common.test_pairs(kind, knobs, 40)[20:20 + num // 2]
  rng = np.random.default_rng(0)
  (root / 'crops').mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(num):
    pair = pairs[i // 2]
    image, mask = io.read_image(pair.image), io.read_mask(pair.mask)
    y, x = rng.integers(0, image.shape[0] - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
    tifffile.imwrite(root / 'crops' / f'{i:02d}.tif', image[y:y + CROP, x:x + CROP])
    crop = annotate(mask[y:y + CROP, x:x + CROP], annotation)
    tifffile.imwrite(root / 'crops' / f'{i:02d}_mask.tif', crop.astype(np.uint8) * 255)
    lines.append(f'crops/{i:02d}.tif crops/{i:02d}_mask.tif')
  (root / 'train.txt').write_text('\n'.join(lines) + '\n')
  return root / 'train.txt'


def write_test(pairs, root: pathlib.Path) -> pathlib.Path:
  (root / 'test.txt').write_text(''.join(f'{p.image} {p.mask}\n' for p in pairs))
  return root / 'test.txt'


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  root = pathlib.Path(FLAGS.workdir).resolve() / FLAGS.kind
  if FLAGS.knobs != 'shifted' or FLAGS.annotation != 'simulator':
    root = root.with_name(f'{FLAGS.kind}_{FLAGS.knobs}_{FLAGS.annotation}')
  train_list = write_crops(FLAGS.kind, root, knobs=FLAGS.knobs, annotation=FLAGS.annotation)
  pairs = annotated_test_pairs(FLAGS.kind, FLAGS.knobs, FLAGS.annotation, root)
  test_list = write_test(pairs, root)
  folder = pretrained.PRETRAINED_DIR / FLAGS.kind
  zero_shot = common.mean_iou(folder, pairs)
  rows = {'shipped model, no training': [{'iou': zero_shot, 'seconds': 0.0}]}
  recipes = {'finetuned': ('fine-tuned from it', FLAGS.kind, False),
             'finetuned_frozen_bn': ('fine-tuned, BatchNorm statistics frozen', FLAGS.kind,
                                     True),
             'scratch': ('from scratch', '', False)}
  for recipe in FLAGS.recipes:
    label, init, freeze = recipes[recipe]
    rows[label] = [common.run_cell(FLAGS.kind, root, train_list, test_list, init, freeze, s,
                                   pairs, FLAGS.lr) for s in range(FLAGS.seeds)]
  print(f'| {FLAGS.kind}: 12 crops of 128x128, {FLAGS.knobs} knobs, {FLAGS.annotation} masks '
        '| test IoU (mean ± std over seeds) | wall s per run |\n|---|---|---|')
  for label, cells in rows.items():
    ious = [c['iou'] for c in cells]
    print(f'| {label} | {np.mean(ious):.3f} ± {np.std(ious):.3f} | '
          f'{np.mean([c["seconds"] for c in cells]):.0f} |')


if __name__ == '__main__':
  flags.DEFINE_string('kind', 'nucleus', 'er, mito or nucleus.')
  flags.DEFINE_string('workdir', 'runs/finetune', 'Where the runs go.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per recipe.')
  flags.DEFINE_string('knobs', 'shifted', 'Simulator knobs of the crops and test images.')
  flags.DEFINE_enum('annotation', 'simulator', ['simulator', 'thick', 'thin'],
                    'How the masks are drawn (annotate).')
  flags.DEFINE_float('lr', 0.0, 'Learning rate (0: configs/finetune.py\'s).')
  flags.DEFINE_multi_enum('recipes', ['finetuned', 'finetuned_frozen_bn', 'scratch'],
                          ['finetuned', 'finetuned_frozen_bn', 'scratch'], 'Rows to train.')
  app.run(main)
