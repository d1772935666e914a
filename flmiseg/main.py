"""flmiseg's entry point.

  python -m flmiseg.main --config=configs/default.py --workdir=DIR [--mode=train]

Modes: train (train, then evaluate the best checkpoint on the test set), eval (evaluate the
best checkpoint of DIR on the test list), summary (parameter count and forward FLOPs per image
at the configured crop size, written to DIR/model_summary.json), predict (masks for your own
images: --input=FILE|FOLDER|GLOB --output=FOLDER; see flmiseg/predict.py).
Errors in the user's data or settings print one line and exit with status 2; --debug shows the
traceback instead.
"""

import json
import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from flmiseg.errors import CheckpointWriteError
from flmiseg.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'summary', 'predict'], 'What to do.')
flags.DEFINE_string('input', '', 'predict: an image file, a folder of images, or a glob.')
flags.DEFINE_string('output', '', 'predict: folder for <name>_mask.tif, _overlay.png, ...')
flags.DEFINE_bool('tta', False, 'predict: average over the 8 flips/rotations of each tile.')
flags.DEFINE_bool('save_prob', False, 'predict: also write <name>_prob.tif (float32).')
flags.DEFINE_bool('instances', False,
                  'predict: also write <name>_instances.tif (uint16 component labels).')
flags.DEFINE_integer('min_size', 16, 'predict --instances: smallest component kept, pixels.')
flags.DEFINE_float('threshold', None,
                   'predict: probability threshold (default: calibrated, else config).')
flags.DEFINE_integer('tile', 0, 'predict: tile side in pixels (0: config.data.crop_size).')
flags.DEFINE_float('overlap', 0.25, 'predict: fraction of a tile shared with its neighbour.')
flags.DEFINE_bool('overwrite', False, 'predict: replace existing results in --output.')
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
  if mode == 'predict':
    from flmiseg import predict  # pylint: disable=g-import-not-at-top
    options = predict.Options(
        input=FLAGS.input, output=FLAGS.output, tile=FLAGS.tile, overlap=FLAGS.overlap,
        tta=FLAGS.tta, threshold=FLAGS.threshold, save_prob=FLAGS.save_prob,
        instances=FLAGS.instances, min_size=FLAGS.min_size, overwrite=FLAGS.overwrite)
    result = predict.run(config, workdir, options)
    skipped = f'; skipped {len(result["skipped"])} non-image file(s)' if result['skipped'] else ''
    print(f'Predicted {len(result["written"])} image(s) into {result["output"]} at threshold '
          f'{result["threshold"]:.3f} ({result["threshold_source"]}){skipped}')
    return
  if mode == 'train':
    result = train.train_and_evaluate(config, workdir)
  else:
    result = train.evaluate_best(config, workdir)
  if result:
    print(f'Test set ({result["num_images"]} images, best checkpoint at step '
          f'{result["checkpoint_step"]}):')
    print(evaluate.format_table(result))
    print(f'Written: {pathlib.Path(workdir) / "eval"}/ (summary.json, per_image.csv, '
          'report.md, worst_best.png)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.INFO)
  try:
    run(load_config(), FLAGS.workdir, FLAGS.mode)
  except UserError as e:
    if FLAGS.debug:
      raise
    exit_with_error(str(e), fresh_line=isinstance(e, CheckpointWriteError))


def exit_with_error(message: str, fresh_line: bool = False) -> None:
  """Prints `error: message` as one line on stderr and exits with status 2.

  The line goes out in one write, and stderr is then closed to the rest of the process:
  after a failed checkpoint write (`fresh_line`), tensorstore's threads go on printing
  "RuntimeError: Event loop is closed" tracebacks into orbax's closed event loops, which
  would otherwise split the line and bury it; a fresh line starts it.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(2, f'{chr(10) if fresh_line else ""}error: {message}\n'.encode())
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a mistyped setting or a bad value gives one `error:` line and
  exit status 2 (--debug: the traceback)."""
  try:
    return FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, or ml_collections'.
    if '--debug' in argv:
      raise
    exit_with_error(flag_error_message(e, argv))


def flag_error_message(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing flags (ml_collections' span several)."""
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(..))
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    # ml_collections: "'batchsize'\nDid you mean "batch_size" instead of "batchsize"?"
    lines = str(error.args[0]).splitlines()
    key = lines[0].strip("'")
    flag = next((a.split('=')[0] for a in argv
                 if a.startswith('--config.') and key in a.split('=')[0].split('.')), '--config')
    hint = f' ({lines[1][0].lower()}{lines[1][1:]})' if len(lines) > 1 and lines[1] else ''
    return f'{flag}: no such setting {key!r}{hint}'
  text = str(error)
  if isinstance(error, OSError) and 'config file' in text:  # --config names a missing file
    flag = next((a for a in reversed(argv) if a.startswith('--config=')), '--config')
    return f'{flag}: cannot load it ({text.strip().splitlines()[-1].strip()})'
  if 'Traceback (most recent call last)' in text:  # a config file that fails to run
    text = text.split('Traceback')[0] + text.rstrip().splitlines()[-1]
  return ' '.join(text.split())


def load_config():
  """FLAGS.config; a config file that cannot be loaded is a UserError naming it."""
  try:
    config = FLAGS.config
    config.keys()  # ml_collections loads the file lazily, on first use.
    return config
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise UserError(f'--config={FLAGS["config"].config_filename}: cannot load it '
                    f'({reason})') from e


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
