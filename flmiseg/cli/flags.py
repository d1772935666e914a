"""The command line's flags, and their parsing into one `error:` line when they are wrong.

Defines every flag of `python -m flmiseg.main` (and the `flmiseg` command), the locked config
flag, and `parse_flags`, absl's flag parsing with: a stock config name resolved to its file
(`resolve_config_arg`), `--model=NAME` made the shipped model's folder, the run's own
config.json for the inference modes, the free-form fields of a free section
(`--config.model.fusion_kwargs.<field>=<value>`, `split_free_fields`), and one-line messages
for a mistyped setting or a bad value (`flag_error_message`, `exit_with_error`).

Imports only absl, ml_collections and flmiseg's light modules (no JAX), so --help is fast.
"""

import ast
import os
import pathlib
import re
import sys

from absl import flags
from ml_collections import config_flags

from flmiseg.configs import default
from flmiseg.core.errors import UserError
from flmiseg.store import rundir

MODES = ('train', 'eval', 'summary', 'predict', 'export')
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
CONFIGS_DIR = _PACKAGE_DIR / 'configs'
RUN_CONFIG_FILE = _PACKAGE_DIR / 'store' / 'rundir_config.py'

FLAGS = flags.FLAGS
# The arguments the config flag reads its --config.* overrides from: filled by `parse_flags`
# (sys.argv less the free-form fields below, which are set afterwards).
_CONFIG_ARGV: list[str] = []
config_flags.DEFINE_config_file(
    'config', None, 'A config file, or a stock config name (default, unet_er, ...); '
    'eval/predict/summary: optional, the run directory holds the config.', lock_config=True,
    sys_argv=_CONFIG_ARGV)


def free_sections(config=None, prefix: str = '') -> tuple[str, ...]:
  """The config's sections whose fields the user names (an operator's hyper-parameters, as
  config.model.fusion_kwargs): the sections that flmiseg/configs/default.py leaves empty."""
  config = default.get_config() if config is None else config
  found = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      found.extend([f'{prefix}{key}'] if not value else free_sections(value, f'{prefix}{key}.'))
  return tuple(found)


# The locked config refuses new fields, so `--config.model.fusion_kwargs.<field>=<value>` is
# taken out of the arguments before parsing and set afterwards (`split_free_fields`).
FREE_SECTIONS = free_sections()
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
flags.DEFINE_bool('no_rescale', False, 'predict: never rescale images (to the pixel size the '
                  'model was trained at, or by the size of their objects).')
flags.DEFINE_float('diameter', None, 'predict: typical diameter of the objects in the inputs, '
                   'pixels (0: measured on a first pass); images are resized so they match '
                   'the model\'s (config.data.object_diameter; the shipped nucleus model: '
                   '31 px). Default: the model\'s choice (config.eval.measure_diameter: the '
                   'shipped nucleus model measures them on a first pass).')
flags.DEFINE_float('dim_gain', None, 'predict: look again for objects too dim for the first '
                   'pass, with the image\'s bright parts clipped at 1/DIM_GAIN of its range '
                   '(e.g. 4; 0: off), and add those found apart from the first pass\'s; '
                   'for models with an object diameter (nucleus). Default: the model\'s '
                   '(config.eval.dim_gain; 0 for the shipped models).')
flags.DEFINE_bool('overwrite', False, 'predict: replace existing results in --output.')
# Chunked prediction (flmiseg/chunked/, docs/large_images.md): images bigger than memory.
flags.DEFINE_bool('chunked', None, 'predict: block by block into an OME-Zarr (the default for '
                  'a zarr --input; give it for a tiled or pyramidal TIFF).')
flags.DEFINE_integer('level', 0, 'predict, chunked: the pyramid level to segment (0: full '
                     'resolution; its pixel size comes from the metadata).')
flags.DEFINE_string('scheduler', 'threads', 'predict, chunked: the Dask engine: threads, '
                    'processes, or the address of a dask.distributed scheduler '
                    '(tcp://host:8786).')
flags.DEFINE_integer('workers', 0, 'predict, chunked: threads or processes of the local '
                     'schedulers (0: 2 threads, or a process per CPU).')
flags.DEFINE_integer('block', None, 'predict, chunked: side of the blocks and of the output '
                     'chunks, pixels (default 2048).')
flags.DEFINE_integer('halo', None, 'predict, chunked: pixels each block labels around its '
                     'core (default: the tiles\' overlap and 2 object diameters, >= 32).')
flags.DEFINE_bool('labels_into_input', False, 'predict, chunked: write the label images into '
                  'the input OME-Zarr\'s labels/ group instead of a new OME-Zarr in --output.')
flags.DEFINE_enum('ngff_version', None, ('0.4', '0.5'), 'predict, chunked: the NGFF version '
                  'of a new OME-Zarr (default: the input\'s, else 0.5).')
flags.DEFINE_bool('trust_imports', False, 'eval/predict/summary: import the code that the run '
                  "directory's config.imports names (never imported on its own).")
flags.DEFINE_bool('verbose', False, 'Show the log lines of JAX, orbax and grain.')
flags.DEFINE_bool('debug', False, 'Show tracebacks for user errors.')


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
    return _stock_config_file(argv, index, value)
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


def _stock_config_file(argv: list[str], index: int, value: str) -> list[str]:
  """argv with `--config=<value>` (at `index`) made the file of a stock config when `value`
  names one: a bare name is a stock config unless a file of that name is here (a folder
  never is)."""
  path, _, arg = value.partition(':')
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
