"""Choosing the shipped models' recipe: learning rate, steps and width, by validation IoU.

  python -m experiments.shipped.pretrained_recipe --kind=er --workdir=runs/recipe \
      --variants=w16_lr0.002_s1500,w16_lr0.001_s1500,w16_lr0.01_s1500,w8_lr0.002_s1500

Each variant `w<width>_lr<learning rate>_s<steps>` trains the shipped recipe
(`common.pretrained_config(kind, steps)`: the 'wide' simulated microscopes and the
augmentation) with that U-Net width and learning rate in WORKDIR/<kind>_<variant> (resumable:
a finished run is only measured), then reports its calibrated validation IoU (the 60
validation images of the wide distribution: what the choice rests on), the test IoU on the
kind's default and 'shifted' test knobs (common.test_scores), and the wall time of a cold
1024x1024 prediction. Nothing is packed; `train_pretrained` ships the chosen recipe.
"""

import json
import pathlib
import re

from absl import app
from absl import flags

from experiments import common
from flmiseg.evaluation import calibration
from flmiseg.core import console
from flmiseg.train import trainer

FLAGS = flags.FLAGS


def parse_variant(variant: str) -> tuple[int, float, int]:
  """'w16_lr0.002_s1500' -> (16, 0.002, 1500); a malformed name is a one-line error."""
  match = re.fullmatch(r'w(\d+)_lr([0-9.eE+-]+)_s(\d+)', variant)
  if not match:
    raise app.UsageError(f'--variants: {variant!r} is not w<width>_lr<rate>_s<steps>, '
                         'e.g. w16_lr0.002_s1500')
  return int(match[1]), float(match[2]), int(match[3])


def run_variant(kind: str, variant: str, root: pathlib.Path) -> dict:
  width, lr, steps = parse_variant(variant)
  workdir = root / f'{kind}_{variant}'
  if not (workdir / 'calibration.json').exists():
    config = common.pretrained_config(kind, steps)
    config.model.width, config.optim.lr = width, lr
    trainer.train_and_evaluate(config, workdir)
  row = {'kind': kind, 'width': width, 'lr': lr, 'steps': steps,
         'val_iou': calibration.read_calibration(workdir)['val_score'],
         **common.test_scores(workdir, kind)}
  row['cold_predict_1024_s'] = common.cold_predict_seconds(kind, str(workdir))
  return row


def main(argv):
  del argv
  console.setup()
  for variant in FLAGS.variants:  # every name checked before the first run trains
    parse_variant(variant)
  rows = []
  for variant in FLAGS.variants:
    rows.append(run_variant(FLAGS.kind, variant, pathlib.Path(FLAGS.workdir)))
    print(json.dumps(rows[-1]))
  lines = ['| width | lr | steps | val IoU (wide) | test IoU, default knobs | '
           'test IoU, shifted knobs | cold predict 1024x1024 (s) |', '|---|---|---|---|---|---|---|']
  lines += [f'| {r["width"]} | {r["lr"]:g} | {r["steps"]} | {r["val_iou"]:.3f} | '
            f'{r["iou_default"]:.3f} | {r["iou_shifted"]:.3f} | {r["cold_predict_1024_s"]:.1f} |'
            for r in rows]
  print('\n'.join(lines))


if __name__ == '__main__':
  flags.DEFINE_string('kind', 'er', 'er, mito or nucleus.')
  flags.DEFINE_string('workdir', 'runs/recipe', 'Where each variant trains.')
  flags.DEFINE_list('variants', ['w16_lr0.002_s1500'], 'w<width>_lr<rate>_s<steps> each.')
  app.run(main)
