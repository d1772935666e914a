"""A shipped model on one real, annotated image: no training, fine-tuned on crops of its top
half, and trained from scratch on the same crops, all measured on its bottom half.

  python -m experiments.real_image --image=img2d.tif --labels=mask2d.tif --kind=nucleus \
      --workdir=runs/real_nuclei [--seeds=2] [--recipes=finetuned,scratch] [--model=DIR]

The image is split in two at its middle row: 12 seeded 128x128 crops (image and mask) of the
top half are the annotated data (configs/finetune.py holds a quarter of them out for
validation), the bottom half is the test image no run sees. The labels may be a binary mask
or a label image (0 background, one value per object, as StarDist and Cellpose write them);
with a label image and a model with the instance head the table also gives instance AP@0.5,
and AP@0.5 of the connected components of the same mask. The shipped model is also measured
on the whole image. Every figure goes through the predict path (`train_pretrained.scores`).
"""

import dataclasses
import pathlib

from absl import app
from absl import flags
import numpy as np
import tifffile

from flmiseg import console
from flmiseg import pretrained
from flmiseg.data import io
from flmiseg.data import lists
from experiments import finetune
from experiments import train_pretrained

CROP = finetune.CROP


def split(image: np.ndarray, labels: np.ndarray, root: pathlib.Path, num: int = 12,
          seed: int = 0):
  """Writes `num` seeded CROPxCROP crops of the top half of (image, labels) into root/crops
  with root/train.txt listing them, and the bottom half into root/test; returns (train list,
  test list, test pairs)."""
  middle = image.shape[0] // 2
  if middle < CROP or image.shape[1] < CROP:
    raise app.UsageError(f'--image: {image.shape[0]}x{image.shape[1]} pixels; the top half '
                         f'must hold {CROP}x{CROP} crops (at least {2 * CROP} rows, {CROP} '
                         'columns)')
  rng = np.random.default_rng(seed)
  (root / 'crops').mkdir(parents=True, exist_ok=True)
  (root / 'test').mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(num):
    y, x = rng.integers(0, middle - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
    tifffile.imwrite(root / 'crops' / f'{i:02d}.tif', image[y:y + CROP, x:x + CROP])
    tifffile.imwrite(root / 'crops' / f'{i:02d}_mask.tif', labels[y:y + CROP, x:x + CROP])
    lines.append(f'crops/{i:02d}.tif crops/{i:02d}_mask.tif')
  (root / 'train.txt').write_text('\n'.join(lines) + '\n')
  tifffile.imwrite(root / 'test' / 'bottom.tif', image[middle:])
  tifffile.imwrite(root / 'test' / 'bottom_mask.tif', labels[middle:])
  (root / 'test.txt').write_text('test/bottom.tif test/bottom_mask.tif\n')
  return root / 'train.txt', root / 'test.txt', lists.load_pairs(root / 'test.txt')


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  root = pathlib.Path(FLAGS.workdir).resolve()
  image = io.read_image(FLAGS.image)
  labels = io.read_mask_values(FLAGS.labels)
  if labels.shape != image.shape[:2]:
    raise app.UsageError(f'--labels: {FLAGS.labels} is {labels.shape}, the image '
                         f'{image.shape[:2]}')
  train_list, test_list, pairs = split(image, labels, root)
  whole = [dataclasses.replace(pairs[0], image=pathlib.Path(FLAGS.image).resolve(),
                               mask=pathlib.Path(FLAGS.labels).resolve())]
  model = pathlib.Path(FLAGS.model) if FLAGS.model else pretrained.PRETRAINED_DIR / FLAGS.kind
  name = FLAGS.model or f'shipped {FLAGS.kind}'
  rows = {f'{name}, no training, whole image':
          [{**train_pretrained.scores(model, whole), 'seconds': 0.0}],
          f'{name}, no training': [{**train_pretrained.scores(model, pairs), 'seconds': 0.0}]}
  recipes = {'finetuned': ('fine-tuned from it', str(model)),
             'scratch': ('from scratch', '')}
  for recipe in FLAGS.recipes if FLAGS.seeds else ():
    label, init = recipes[recipe]
    rows[label] = [finetune.run_cell(FLAGS.kind, root, train_list, test_list, init, False, s,
                                     pairs, FLAGS.lr) for s in range(FLAGS.seeds)]
  print(f'| {pathlib.Path(FLAGS.image).name}, bottom half; 12 crops of {CROP}x{CROP} of the '
        'top half | IoU | instance AP@0.5 | AP@0.5, connected components | wall s per run |\n'
        '|---|---|---|---|---|')

  def cell(cells, key):
    values = [c[key] for c in cells if key in c]
    return f'{np.mean(values):.3f} ± {np.std(values):.3f}' if values else '-'

  for label, cells in rows.items():
    print(f'| {label} | {cell(cells, "iou")} | {cell(cells, "ap_0.5")} | '
          f'{cell(cells, "ap_0.5_connected_components")} | '
          f'{np.mean([c["seconds"] for c in cells]):.0f} |')


if __name__ == '__main__':
  flags.DEFINE_string('image', None, 'The real image (TIFF/PNG, one channel).', required=True)
  flags.DEFINE_string('labels', None, 'Its annotation: a mask or a label image.',
                      required=True)
  flags.DEFINE_enum('kind', 'nucleus', list(pretrained.SHIPPED), 'The shipped model.')
  flags.DEFINE_string('workdir', 'runs/real_image', 'Where the crops and runs go.')
  flags.DEFINE_string('model', '', 'A run or packed folder to measure and fine-tune instead '
                      'of the shipped model.')
  flags.DEFINE_integer('seeds', 2, 'Seeds per recipe (0: the model without training only).')
  flags.DEFINE_float('lr', 0.0, 'Learning rate (0: configs/finetune.py\'s).')
  flags.DEFINE_multi_enum('recipes', ['finetuned', 'scratch'], ['finetuned', 'scratch'],
                          'Rows to train.')
  app.run(main)
