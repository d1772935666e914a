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

The flags and their parsing live in flmiseg/cli/flags.py, what each mode runs in
flmiseg/cli/modes.py.
"""

from absl import app
from absl import flags

from flmiseg.cli import flags as cli_flags
from flmiseg.cli import modes
from flmiseg.core import console
from flmiseg.core import registry
from flmiseg.core.errors import CheckpointWriteError
from flmiseg.core.errors import UserError

FLAGS = flags.FLAGS
# --help lists the flags of the main module: flmiseg's are defined in flmiseg/cli/flags.py.
flags.adopt_module_key_flags(cli_flags)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  console.setup(FLAGS.verbose)
  try:
    if not FLAGS.workdir:
      raise UserError('--workdir is required (the run directory: where a run is trained, '
                      'or the trained run to use)')
    config = modes.mode_config(FLAGS.mode, FLAGS.workdir)
    # The user's code registers its names before anything is built from the config.
    registry.import_modules(config.get('imports', ''))
    modes.run(config, FLAGS.workdir, FLAGS.mode)
  except UserError as e:
    if FLAGS.debug:
      raise
    cli_flags.exit_with_error(str(e), fresh_line=isinstance(e, CheckpointWriteError))


def cli() -> None:
  """The `flmiseg` console script: the same as `python -m flmiseg.main`."""
  app.run(main, flags_parser=cli_flags.parse_flags)


if __name__ == '__main__':
  cli()
