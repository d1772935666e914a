"""flmiseg's entry point (also installed as the `flmiseg` command).

  python -m flmiseg.main --config=configs/default.py --workdir=DIR            # train + test
  python -m flmiseg.main --mode=predict --workdir=DIR --input=IMAGES --output=OUT
  python -m flmiseg.main --mode=predict --model=nucleus --input=IMAGES --output=OUT
  python -m flmiseg.main --mode=eval|summary --workdir=DIR
  python -m flmiseg.main --mode=export --workdir=DIR|--model=nucleus --output=PACKAGE

Modes: train (train, then evaluate the best checkpoint on the test set), eval (evaluate the
best checkpoint of DIR on the test list), summary (parameter count and forward FLOPs per image
at the configured crop size, written to DIR/model_summary.json), predict (masks for your own
images: --input=FILE|FOLDER|GLOB --output=FOLDER; see flmiseg/cli/predict.py), export (a
bioimage.io model package of the model, ONNX weights, into a new or empty --output folder;
flmiseg/export/onnx_graph.py, docs/export.md). predict and eval run on JAX or, with --backend=onnx, on
ONNX Runtime (CPU; the model is converted once and cached in DIR/export/). export and the ONNX
backend need the optional extra: pip install "flmiseg[export]".
--config is a config file or the name of a stock config (default, unet_er, unet_mito,
unet_nucleus: flmiseg/configs/). Training needs it; eval, predict and summary read the model's
config from DIR/config.json (the run directory is the model) and accept on the command line
only inference settings (flmiseg/store/rundir.py).
--config.imports=FILE.py,MODULE imports code of your own (models, fusion operators, backbones,
losses it registers) before anything is built (docs/fusion.md); a run directory's imports run
only when named again or with --trust_imports. An operator's fields are set with
--config.model.fusion_kwargs.<field>=<value>.
Every config field is checked before anything runs (flmiseg/train/config_checks.py). Errors in the
user's data or settings print one line and exit with status 2; --debug shows the traceback
instead. Library log lines stay off the console unless --verbose.
"""

import ast
import json
import os
import pathlib
import re
import sys

MODES = ('train', 'eval', 'summary', 'predict', 'export')
CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / 'configs'
RUN_CONFIG_FILE = pathlib.Path(__file__).resolve().parent / 'store' / 'rundir_config.py'

from absl import app
from absl import flags
from ml_collections import config_flags

from flmiseg.core import console
from flmiseg.core import registry
from flmiseg.store import rundir
from flmiseg.core.errors import CheckpointWriteError
from flmiseg.core.errors import UserError

FLAGS = flags.FLAGS
# The arguments the config flag reads its --config.* overrides from: filled by `parse_flags`
# (sys.argv less the free-form fields below, which main sets itself).
_CONFIG_ARGV: list[str] = []
config_flags.DEFINE_config_file(
    'config', None, 'A config file, or a stock config name (default, unet_er, ...); '
    'eval/predict/summary: optional, the run directory holds the config.', lock_config=True,
    sys_argv=_CONFIG_ARGV)
# Config sections whose fields the user names: an operator's hyper-parameters. The locked
# config refuses new fields, so `--config.model.fusion_kwargs.<field>=<value>` is taken out
# of the arguments before parsing and set afterwards (`split_free_fields`).
FREE_SECTIONS = ('model.fusion_kwargs',)
_FREE_FIELD = re.compile(r'--?(no)?config\.(%s)\.([A-Za-z_]\w*)(?:=(.*))?' %
                         '|'.join(re.escape(s) for s in FREE_SECTIONS), re.DOTALL)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('model', None, 'predict, export: a shipped model (er, mito, nucleus) or a '
                    'run or packed folder, instead of --workdir.')
flags.DEFINE_string('input', '', 'predict: an image file, a folder of images, or a glob.')
flags.DEFINE_string('output', '', 'predict: folder for <name>_mask.tif, _overlay.png, ...; '
                    'export: a new or empty folder for the bioimage.io package.')
flags.DEFINE_bool('tta', False, 'predict: average over the 8 flips/rotations of each tile.')
flags.DEFINE_bool('save_prob', False, 'predict: also write <name>_prob.tif (float32).')
flags.DEFINE_bool('instances', False,
                  'predict: also write <name>_instances.tif (uint16 component labels).')
flags.DEFINE_integer('min_size', None, 'predict --instances: smallest object kept, pixels '
                     '(default: the run\'s config.eval.min_size).')
flags.DEFINE_float('threshold', None,
                   'predict: probability threshold (default: calibrated, else config).')
flags.DEFINE_integer('tile', 0, 'predict: tile side in pixels, rounded up to a multiple of '
                     '32; export: the fixed tile of a '
                     'model whose ONNX graph cannot take any size (0: config.data.crop_size).')
flags.DEFINE_enum('backend', None, ('jax', 'onnx'), 'predict, eval: run the network on JAX or '
                  'on ONNX Runtime (CPU; needs flmiseg[export]). Default: jax.')
flags.DEFINE_float('overlap', 0.25, 'predict: fraction of a tile shared with its neighbour.')
flags.DEFINE_integer('channel', None, 'predict: the channel to segment in a multi-channel '
                     'image (0-based).')
flags.DEFINE_string('axes', '', 'predict: axes of the input files, e.g. CYX or TZYX, for '
                    'files without OME/ImageJ metadata (default: read from the file).')
flags.DEFINE_float('pixel_size', None, 'predict: pixel size of the inputs in micrometres '
                   '(default: read from the file).')
flags.DEFINE_bool('no_rescale', False, 'predict: never rescale images to the pixel size the '
                  'model was trained at.')
flags.DEFINE_float('diameter', None, 'predict: typical diameter of the objects in the inputs, '
                   'pixels (0: measured on a first pass); images are resized so they match '
                   'the model\'s (config.data.object_diameter; the shipped nucleus model: '
                   '31 px).')
flags.DEFINE_bool('overwrite', False, 'predict: replace existing results in --output.')
flags.DEFINE_bool('trust_imports', False, 'eval/predict/summary: import the code that the run '
                  "directory's config.imports names (never imported on its own).")
flags.DEFINE_bool('verbose', False, 'Show the log lines of JAX, orbax and grain.')
flags.DEFINE_bool('debug', False, 'Show tracebacks for user errors.')


def run(config, workdir: str, mode: str) -> None:
  """Checks the config (`config_checks.validate`: one line naming the first invalid field),
  then runs one mode; importing JAX-heavy modules here keeps --help fast."""
  from flmiseg.core import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  # pylint: disable-next=g-import-not-at-top
  from flmiseg.train import config_checks
  from flmiseg.core import files
  from flmiseg.evaluation import report
  from flmiseg.models import summary
  from flmiseg.train import trainer
  config_checks.validate(config)  # after config.imports registered their names
  if FLAGS.backend and mode not in ('predict', 'eval'):
    raise UserError(f'--backend={FLAGS.backend} is for --mode=predict or eval')
  if mode == 'summary':
    crop = config.data.crop_size
    result = summary.model_summary(config.model, (crop, crop))
    out = pathlib.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    if files.is_primary():
      files.write_text_atomic(out / 'model_summary.json', json.dumps(result) + '\n')
    print(f'{config.model.name}/{config.model.variant} width {config.model.width}: '
          f'{result["params"]:,} parameters, {result["flops"] / 1e9:.2f} GFLOP forward per '
          f'{crop}x{crop} image')
    return
  if mode == 'predict':
    from flmiseg.cli import predict  # pylint: disable=g-import-not-at-top
    options = predict.Options(
        input=FLAGS.input, output=FLAGS.output, tile=FLAGS.tile, overlap=FLAGS.overlap,
        tta=FLAGS.tta, threshold=FLAGS.threshold, save_prob=FLAGS.save_prob,
        instances=FLAGS.instances, min_size=FLAGS.min_size, channel=FLAGS.channel,
        axes=FLAGS.axes, pixel_size=FLAGS.pixel_size, rescale=not FLAGS.no_rescale,
        diameter=FLAGS.diameter,
        overwrite=FLAGS.overwrite, backend=FLAGS.backend or predict.DEFAULT_BACKEND)
    result = predict.run(config, workdir, options)
    skipped = f'; skipped {len(result["skipped"])} non-image file(s)' if result['skipped'] else ''
    print(f'Predicted {len(result["written"])} image(s) into {result["output"]} at threshold '
          f'{result["threshold"]:.3f} ({result["threshold_source"]}){skipped}')
    return
  if mode == 'export':
    from flmiseg.export import bioimage  # pylint: disable=g-import-not-at-top
    result = bioimage.run(config, workdir, bioimage.Options(output=FLAGS.output, tile=FLAGS.tile))
    print(f'Wrote the bioimage.io package of {workdir} (step {result["step"]}; '
          f'{result["layout"].describe()}) into {result["output"]}')
    return
  if mode == 'train':
    result = trainer.train_and_evaluate(config, workdir)
  elif FLAGS.backend == 'onnx':
    from flmiseg.export import onnx_backend  # pylint: disable=g-import-not-at-top
    result = trainer.evaluate_best(config, workdir, predict=onnx_backend.predict_step(
        config, workdir, config.eval.threshold))
  else:
    result = trainer.evaluate_best(config, workdir)
  if result:
    print(f'Test set ({result["num_images"]} images, best checkpoint at step '
          f'{result["checkpoint_step"]}):')
    print(report.format_table(result))
    print(f'Written: {pathlib.Path(workdir) / "eval"}/ (summary.json, per_image.csv, '
          'report.md, worst_best.png)')


def mode_config(mode: str, workdir: str):
  """The config a mode runs with: --config for training (and for summary of a config that
  was never trained); otherwise the run directory's, with the command line's inference
  settings (flmiseg/store/rundir.py)."""
  if mode == 'train' or (mode == 'summary' and FLAGS['config'].present
                         and not (pathlib.Path(workdir) / rundir.CONFIG_FILE).is_file()):
    config = load_config()
    if 'imports' in config:  # config.json then names the same files from anywhere
      config.imports = registry.normalize_imports(config.imports)
    return config
  if mode == 'summary':
    if not (pathlib.Path(workdir) / rundir.CONFIG_FILE).is_file():
      raise UserError(f'--workdir={workdir}: no {rundir.CONFIG_FILE}; give --config too')
  else:
    rundir.check_trained(workdir)
  config = rundir.inference_config(workdir, load_config())
  named = FLAGS['config'].override_values.get('imports') if FLAGS.config is not None else None
  config.imports = rundir.imports_to_run(
      workdir, config, None if named is None else registry.normalize_imports(named),
      FLAGS.trust_imports)
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  console.setup(FLAGS.verbose)
  try:
    if not FLAGS.workdir:
      raise UserError('--workdir is required (the run directory: where a run is trained, '
                      'or the trained run to use)')
    config = mode_config(FLAGS.mode, FLAGS.workdir)
    # The user's code registers its names before anything is built from the config.
    registry.import_modules(config.get('imports', ''))
    run(config, FLAGS.workdir, FLAGS.mode)
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

  The process then ends at once (os._exit): interpreter shutdown with those library threads
  still running once ended in a segmentation fault (status -11 instead of 2) in a test run.
  Nothing is lost: every file flmiseg writes is written atomically, and the run lock is the
  kernel's to release.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  os.write(2, f'{chr(10) if fresh_line else ""}error: {message}\n'.encode())
  os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
  os._exit(2)  # pylint: disable=protected-access


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but a mistyped setting or a bad value gives one `error:` line and
  exit status 2 (--debug: the traceback). A stock config name becomes its file; without
  --config, an inference mode reads the config of its --workdir."""
  try:
    argv = FLAGS.read_flags_from_files(resolve_config_arg(argv), force_gnu=False)
    argv, free_fields = split_free_fields(argv)
    _CONFIG_ARGV[:] = argv
    remaining = FLAGS(argv)
    if free_fields:
      set_free_fields(load_config(), free_fields)
    return remaining
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, or ml_collections'.
    if '--debug' in argv:
      raise
    exit_with_error(flag_error_message(e, argv))


def split_free_fields(argv: list[str]) -> tuple[list[str], list[tuple[str, str, object]]]:
  """(argv without the `--config.<free section>.<field>=<value>` arguments, their
  (section, field, value)s). Values parse as ml_collections parses a field of unknown type:
  a Python literal (true/false too), else the string; `--config...<field>` alone is True and
  `--noconfig...<field>` False."""
  rest, fields = [], []
  for arg in argv:
    match = _FREE_FIELD.fullmatch(arg)
    if match is None:
      rest.append(arg)
      continue
    negated, section, field, text = match.groups()
    if text is None:
      value = not negated
    elif negated:
      raise UserError(f'{arg}: give a value or use the --no form, not both')
    else:
      try:
        value = ast.literal_eval(text.capitalize() if text in ('true', 'false') else text)
      except (SyntaxError, ValueError):
        value = text
    fields.append((section, field, value))
  return rest, fields


def set_free_fields(config, fields: list[tuple[str, str, object]]) -> None:
  """Sets `split_free_fields`' fields in `config` (locked: new fields need the section
  unlocked)."""
  if config is None:
    raise UserError(f'--config.{fields[0][0]}.{fields[0][1]} needs --config')
  for section, field, value in fields:
    node = config
    for part in section.split('.'):
      node = node[part]
    with node.unlocked():
      node[field] = value


def _flag_value(argv: list[str], name: str) -> tuple[int, str | None]:
  """(index, value) of the last `--name=value` or `--name value` in argv; (-1, None)."""
  found = (-1, None)
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      found = (i, arg.split('=', 1)[1])
    elif arg == f'--{name}' and i + 1 < len(argv):
      found = (i, argv[i + 1])
  return found


def stock_configs() -> list[str]:
  return sorted(p.stem for p in CONFIGS_DIR.glob('*.py') if not p.stem.startswith('_'))


def resolve_config_arg(argv: list[str]) -> list[str]:
  """argv with `--model=NAME` made `--workdir=<its folder>`, `--config=NAME` (a stock config)
  made a file path, and, for eval, predict and summary without --config,
  `--config=<the run's config.json>` added."""
  argv = list(argv)
  _, mode = _flag_value(argv, 'mode')
  _, workdir = _flag_value(argv, 'workdir')
  _, model = _flag_value(argv, 'model')
  if model is not None:
    if mode not in ('predict', 'export'):
      raise UserError(f'--model={model} is for --mode=predict or export; to evaluate or '
                      'fine-tune, use --workdir or --config.train.init_from')
    if workdir is not None:
      raise UserError(f'--model={model} and --workdir={workdir}: give one of them')
    from flmiseg.store import pretrained  # pylint: disable=g-import-not-at-top
    workdir = str(pretrained.resolve_model(model))
    argv.append(f'--workdir={workdir}')
  index, value = _flag_value(argv, 'config')
  if value is not None:
    path, _, arg = value.partition(':')
    # A bare name is a stock config unless a file of that name is here (a folder never is).
    if not pathlib.Path(path).is_file() and '/' not in path and not path.endswith('.py'):
      if path not in stock_configs():
        raise UserError(f'--config={value}: no such file or stock config (stock configs: '
                        f'{", ".join(stock_configs())})')
      stock = str(CONFIGS_DIR / f'{path}.py') + (f':{arg}' if arg else '')
      if argv[index] == '--config':
        argv[index + 1] = stock
      else:
        argv[index] = f'--config={stock}'
    return argv
  if mode in (None, 'train'):
    if workdir is not None and not any(a in ('--help', '--helpfull') for a in argv):
      raise UserError('--config is required for training (a config file, or a stock config: '
                      f'{", ".join(stock_configs())})')
    return argv
  if mode in MODES and workdir:
    if not (pathlib.Path(workdir) / rundir.CONFIG_FILE).is_file():
      rundir.check_trained(workdir)  # raises, naming what is missing
    argv.insert(1, f'--config={RUN_CONFIG_FILE}:{pathlib.Path(workdir).resolve()}')
  return argv


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
  """FLAGS.config (None when not given); a config file that cannot be loaded is a UserError
  naming it."""
  try:
    config = FLAGS.config
    if config is not None:
      config.keys()  # ml_collections loads the file lazily, on first use.
    return config
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise UserError(f'--config={FLAGS["config"].config_filename}: cannot load it '
                    f'({reason})') from e


def cli() -> None:
  """The `flmiseg` console script: the same as `python -m flmiseg.main`."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
