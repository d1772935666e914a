"""Trains every (name, variant) of the zoo briefly from the default config and reports test
IoU: a check that each model learns, not a benchmark (see experiments/paper/paper_table.py for the
comparison the paper makes).

  python -m experiments.paper.zoo_smoke --workdir=runs/zoo [--steps=60] [--width=8]

Each run is `configs/default.py` (simulated ER) with only the model name/variant changed, plus
the shortened schedule and width given here. Resumable: finished runs are not retrained.
"""

import json
import pathlib
import time

from absl import app
from absl import flags
from absl import logging

from flmiseg.configs import default
from flmiseg.train import trainer


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('workdir', 'runs/zoo', 'Folder for the runs.')
  flags.DEFINE_integer('steps', 60, 'Training steps per model.')
  flags.DEFINE_integer('width', 8, 'Base width of every model.')


FLAGS = flags.FLAGS

MODELS = [('unet', 'original'), ('unet_pp', 'original'), ('agnet', 'original'),
          ('fcn32s', 'original'), ('fcn8s', 'original'), ('fcn', 'original'),
          ('fcn', 'lowlevel'), ('segnet', 'original'), ('segnet', 'lowlevel'),
          ('deeplabv3p', 'original'), ('deeplabv3p', 'lowlevel'), ('hrnetv2', 'original'),
          ('hrnetv2', 'lowlevel')]


def main(_):
  logging.set_verbosity(logging.WARNING)
  rows = []
  for name, variant in MODELS:
    config = default.get_config()
    config.model.name, config.model.variant = name, variant
    config.model.width = FLAGS.width
    config.train.num_steps = FLAGS.steps
    config.eval.every_steps = FLAGS.steps
    start = time.perf_counter()
    result = trainer.train_and_evaluate(config, pathlib.Path(FLAGS.workdir) / f'{name}_{variant}')
    rows.append({'model': name, 'variant': variant, 'test_iou': result['iou'],
                 'test_f1': result['f1'], 'seconds': time.perf_counter() - start})
    print(json.dumps(rows[-1]), flush=True)
  print(f'| model | variant | test IoU | test F1 | wall s ({FLAGS.steps} steps, width '
        f'{FLAGS.width}) |\n|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["model"]} | {r["variant"]} | {r["test_iou"]:.3f} | {r["test_f1"]:.3f} | '
          f'{r["seconds"]:.0f} |')


if __name__ == '__main__':
  define_flags()
  app.run(main)
