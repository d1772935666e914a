"""flmiseg's entry point.

  python -m flmiseg.main --config=configs/default.py --workdir=DIR [--mode=train]

Modes: train (train, then evaluate the best checkpoint on the test set), eval (evaluate the
best checkpoint of DIR on the test list), summary (parameter count and forward FLOPs per image
at the configured crop size, written to DIR/model_summary.json).
Errors in the user's data or settings print one line and exit with status 2; --debug shows the
traceback instead.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flmiseg.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'summary'], 'What to do.')
flags.DEFINE_bool('debug', False, 'Show tracebacks for user errors.')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str, mode: str) -> None:
  """Runs one mode; importing JAX-heavy modules here keeps --help fast."""
  from flmiseg import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  from flmiseg import evaluate, summary, train  # pylint: disable=g-import-not-at-top
  if mode == 'summary':
    crop = config.data.crop_size
    result = summary.model_summary(config.model, (crop, crop))
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'model_summary.json').write_text(json.dumps(result) + '\n')
    print(f'{config.model.name}/{config.model.variant} width {config.model.width}: '
          f'{result["params"]:,} parameters, {result["flops"] / 1e9:.2f} GFLOP forward per '
          f'{crop}x{crop} image')
    return
  if mode == 'train':
    result = train.train_and_evaluate(config, workdir)
  else:
    result = train.evaluate_best(config, workdir)
  if result:
    print(f'Test set ({result["num_images"]} images, best checkpoint at step '
          f'{result["checkpoint_step"]}):')
    print(evaluate.format_table(result))
    print(f'Written: {pathlib.Path(workdir) / "eval" / "summary.json"}, per_image.csv')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.INFO)
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
  except UserError as e:
    if FLAGS.debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
