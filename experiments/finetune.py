"""Fine-tuning a shipped model on 12 crops of 128x128 versus training from scratch on them.

  python -m experiments.finetune --kind=nucleus --workdir=runs/finetune [--seeds=3]

The 12 crops are cut from simulated images drawn with the simulator's 'shifted' knobs (a
microscope unlike the simulator's defaults), the test set is 20 other 'shifted' images of an
unseen seed. Rows, same data, same steps (configs/finetune.py): the shipped model as it is
(no training), fine-tuned from it (BatchNorm statistics updated, or frozen with
config.train.freeze_batch_stats), and the same recipe from a random initialisation
(--recipes picks the rows).
"""

import pathlib
import time

from absl import app
from absl import flags
import numpy as np
import tifffile

from flmiseg import console
from flmiseg import train
from flmiseg.configs import finetune
from flmiseg.data import io
from experiments import train_pretrained

CROP = 128


def write_crops(kind: str, root: pathlib.Path, num: int = 12) -> pathlib.Path:
  """`num` 128x128 crops (image, mask) of 'shifted' simulated images; returns the list."""
  pairs = train_pretrained.test_pairs(kind, 'shifted', 40)[20:20 + num // 2]
  rng = np.random.default_rng(0)
  (root / 'crops').mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(num):
    pair = pairs[i // 2]
    image, mask = io.read_image(pair.image), io.read_mask(pair.mask)
    y, x = rng.integers(0, image.shape[0] - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
    tifffile.imwrite(root / 'crops' / f'{i:02d}.tif', image[y:y + CROP, x:x + CROP])
    tifffile.imwrite(root / 'crops' / f'{i:02d}_mask.tif', mask[y:y + CROP, x:x + CROP] * 255)
    lines.append(f'crops/{i:02d}.tif crops/{i:02d}_mask.tif')
  (root / 'train.txt').write_text('\n'.join(lines) + '\n')
  return root / 'train.txt'


def write_test(kind: str, root: pathlib.Path) -> pathlib.Path:
  pairs = train_pretrained.test_pairs(kind, 'shifted', 40)[:20]
  (root / 'test.txt').write_text(''.join(f'{p.image} {p.mask}\n' for p in pairs))
  return root / 'test.txt'


def run_cell(kind, root, train_list, test_list, init_from: str, freeze: bool, seed: int,
             pairs) -> dict:
  """Trains one run; its test IoU is measured as the shipped model's (predict path, the
  run's calibrated threshold)."""
  config = finetune.get_config()
  config.data.kind = kind
  config.data.train_list, config.data.test_list = str(train_list), str(test_list)
  config.train.init_from = init_from
  config.seed = seed
  config.optim.lr = FLAGS.lr or config.optim.lr
  config.train.freeze_batch_stats = freeze
  start = time.perf_counter()
  name = f'{"finetuned" if init_from else "scratch"}{"_frozen_bn" if freeze else ""}_seed{seed}'
  train.train_and_evaluate(config, root / name)
  seconds = time.perf_counter() - start
  return {'iou': train_pretrained.mean_iou(root / name, pairs), 'seconds': seconds}


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  root = pathlib.Path(FLAGS.workdir) / FLAGS.kind
  train_list = write_crops(FLAGS.kind, root)
  test_list = write_test(FLAGS.kind, root)
  folder = train_pretrained.pretrained.PRETRAINED_DIR / FLAGS.kind
  pairs = train_pretrained.test_pairs(FLAGS.kind, 'shifted', 40)[:20]
  zero_shot = train_pretrained.mean_iou(folder, pairs)
  rows = {'shipped model, no training': [{'iou': zero_shot, 'seconds': 0.0}]}
  recipes = {'finetuned': ('fine-tuned from it', FLAGS.kind, False),
             'finetuned_frozen_bn': ('fine-tuned, BatchNorm statistics frozen', FLAGS.kind,
                                     True),
             'scratch': ('from scratch', '', False)}
  for recipe in FLAGS.recipes:
    label, init, freeze = recipes[recipe]
    rows[label] = [run_cell(FLAGS.kind, root, train_list, test_list, init, freeze, s, pairs)
                   for s in range(FLAGS.seeds)]
  print(f'| {FLAGS.kind}: 12 crops of 128x128 | test IoU (mean ± std over seeds) | '
        'wall s per run |\n|---|---|---|')
  for label, cells in rows.items():
    ious = [c['iou'] for c in cells]
    print(f'| {label} | {np.mean(ious):.3f} ± {np.std(ious):.3f} | '
          f'{np.mean([c["seconds"] for c in cells]):.0f} |')


if __name__ == '__main__':
  flags.DEFINE_string('kind', 'nucleus', 'er, mito or nucleus.')
  flags.DEFINE_string('workdir', 'runs/finetune', 'Where the runs go.')
  flags.DEFINE_integer('seeds', 3, 'Seeds per recipe.')
  flags.DEFINE_float('lr', 0.0, 'Learning rate (0: configs/finetune.py\'s).')
  flags.DEFINE_multi_enum('recipes', ['finetuned', 'finetuned_frozen_bn', 'scratch'],
                          ['finetuned', 'finetuned_frozen_bn', 'scratch'], 'Rows to train.')
  app.run(main)
