"""What each domain-randomisation group adds, measured on a shifted simulated test set.

  python -m experiments.shipped.domain_ablation --kind=er --steps=500 --workdir=runs/ablation

Same recipe, steps and seed for every row (the default U-Net recipe, `--steps` steps); only
the training data and augmentation differ:
  none          the simulator's default knobs, no augmentation (the default run's data);
  simulator     per-image knobs drawn from the simulator's 'wide' distribution;
  augmentation  default knobs, the pipeline's augmentation ('all');
  both          'wide' knobs and augmentation (the shipped models' recipe);
  both, percentile  the same with percentile normalisation instead of CLAHE (what the
                bioimage.io format can express; flmiseg/data/preprocess.py).
Each row reports mean IoU on 20 test images of an unseen seed with the default knobs and with
the 'shifted' knobs (another noise level, PSF and object scale), through the predict path at
the run's calibrated threshold.
"""

import pathlib
import time

from absl import app
from absl import flags

from experiments import common
from flmiseg.core import console
from flmiseg.train import trainer
from flmiseg.configs import default

ROWS = {
    'none': ('default', ''),
    'simulator': ('wide', ''),
    'augmentation': ('default', 'all'),
    'both': ('wide', 'all'),
    'both, percentile': ('wide', 'all'),
}


def row_config(name: str, kind: str, steps: int):
  config = default.get_config()
  config.data.kind = kind
  config.data.synthetic_params, config.data.augment = ROWS[name]
  config.data.num_synthetic_train = 600 if config.data.synthetic_params == 'wide' else 200
  if name.endswith('percentile'):
    config.data.normalization = 'percentile'
  config.train.num_steps = steps
  config.optim.warmup_steps = 50
  config.eval.every_steps = max(50, steps // 5)
  return config


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  tests = {p: common.test_pairs(FLAGS.kind, p, masks='geometry')
           for p in ('default', 'shifted')}
  print(f'| {FLAGS.kind}, {FLAGS.steps} steps | IoU, default knobs | IoU, shifted knobs | '
        'wall s |\n|---|---|---|---|')
  for name in FLAGS.rows:
    workdir = pathlib.Path(FLAGS.workdir) / FLAGS.kind / name.replace(', ', '_')
    start = time.perf_counter()
    trainer.train_and_evaluate(row_config(name, FLAGS.kind, FLAGS.steps), workdir)
    seconds = time.perf_counter() - start
    ious = {p: common.mean_iou(workdir, pairs) for p, pairs in tests.items()}
    print(f'| {name} | {ious["default"]:.3f} | {ious["shifted"]:.3f} | {seconds:.0f} |',
          flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('kind', 'er', 'er, mito or nucleus.')
  flags.DEFINE_integer('steps', 500, 'Training steps per row.')
  flags.DEFINE_string('workdir', 'runs/ablation', 'Where the runs go.')
  flags.DEFINE_list('rows', list(ROWS), 'Which rows.')
  app.run(main)
