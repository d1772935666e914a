"""What each --mode of `python -m flmiseg.main` runs, and the config it runs with.

`mode_config` picks the config (--config for training, else the run directory's with the
command line's inference settings); `run` checks it and runs one mode: train
(flmiseg/train/trainer.py), eval (flmiseg/evaluation/best_checkpoint.py), summary
(flmiseg/models/summary.py), predict (flmiseg/cli/predict.py) or export
(flmiseg/export/bioimage.py), and prints what it did. The JAX-heavy modules are imported
when a mode runs, so --help stays fast.
"""

import json
import pathlib

from absl import flags

from flmiseg.cli import flags as cli_flags
from flmiseg.core import registry
from flmiseg.core.errors import UserError
from flmiseg.store import rundir

FLAGS = flags.FLAGS


def run(config, workdir: str, mode: str) -> None:
  """Runs `mode` with `config` in `workdir`. Training checks its config itself
  (`trainer.train_and_evaluate`); the other modes check it here (`config_checks.validate`:
  one line naming the first invalid field)."""
  # pylint: disable=g-import-not-at-top
  from flmiseg.core import distributed
  distributed.initialize()
  from flmiseg.train import config_checks
  if mode != 'train':
    config_checks.validate(config)  # after config.imports registered their names
  if FLAGS.backend and mode not in ('predict', 'eval'):
    raise UserError(f'--backend={FLAGS.backend} is for --mode=predict or eval')
  {'train': _train, 'eval': _eval, 'summary': _summary, 'predict': _predict,
   'export': _export}[mode](config, workdir)


def _train(config, workdir: str) -> None:
  from flmiseg.train import trainer  # pylint: disable=g-import-not-at-top
  _print_test_result(trainer.train_and_evaluate(config, workdir), workdir)


def _eval(config, workdir: str) -> None:
  # pylint: disable=g-import-not-at-top
  from flmiseg.evaluation import best_checkpoint
  if FLAGS.backend == 'onnx':
    from flmiseg.export import onnx_backend
    predict = onnx_backend.predict_step(config, workdir, config.eval.threshold)
  else:
    from flmiseg.train import steps
    predict = steps.jit_predict(config.eval.threshold)
  _print_test_result(best_checkpoint.evaluate_best(config, workdir, predict), workdir)


def _print_test_result(result: dict, workdir: str) -> None:
  """The test summary as a table (nothing without a test set: an empty `result`)."""
  from flmiseg.evaluation import report  # pylint: disable=g-import-not-at-top
  if result:
    print(f'Test set ({result["num_images"]} images, best checkpoint at step '
          f'{result["checkpoint_step"]}):')
    print(report.format_table(result))
    print(f'Written: {pathlib.Path(workdir) / "eval"}/ (summary.json, per_image.csv, '
          'report.md, worst_best.png)')


def _summary(config, workdir: str) -> None:
  # pylint: disable=g-import-not-at-top
  from flmiseg.core import files
  from flmiseg.models import summary
  crop = config.data.crop_size
  result = summary.model_summary(config.model, (crop, crop))
  out = pathlib.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  if files.is_primary():
    files.write_text_atomic(out / 'model_summary.json', json.dumps(result) + '\n')
  print(f'{config.model.name}/{config.model.variant} width {config.model.width}: '
        f'{result["params"]:,} parameters, {result["flops"] / 1e9:.2f} GFLOP forward per '
        f'{crop}x{crop} image')


def _predict(config, workdir: str) -> None:
  from flmiseg.cli import predict  # pylint: disable=g-import-not-at-top
  options = predict.Options(
      input=FLAGS.input, output=FLAGS.output, tile=FLAGS.tile, overlap=FLAGS.overlap,
      tta=FLAGS.tta, threshold=FLAGS.threshold, save_prob=FLAGS.save_prob,
      instances=FLAGS.instances, min_size=FLAGS.min_size, channel=FLAGS.channel,
      axes=FLAGS.axes, pixel_size=FLAGS.pixel_size, rescale=not FLAGS.no_rescale,
      diameter=FLAGS.diameter, dim_gain=FLAGS.dim_gain,
      overwrite=FLAGS.overwrite, backend=FLAGS.backend or predict.DEFAULT_BACKEND,
      chunked=FLAGS.chunked, level=FLAGS.level, scheduler=FLAGS.scheduler,
      workers=FLAGS.workers, block=FLAGS.block or 0, halo=FLAGS.halo,
      labels_into_input=FLAGS.labels_into_input, ngff_version=FLAGS.ngff_version)
  result = predict.run(config, workdir, options)
  if 'blocks' in result:  # chunked
    resumed = f', {result["resumed"]} of them done before' if result['resumed'] else ''
    objects = f'; {result["objects"]} objects in {result["table"]}' if result['table'] else ''
    print(f'Predicted {result["blocks"]} block(s){resumed} into {result["output"]} at '
          f'threshold {result["threshold"]:.3f} ({result["threshold_source"]}){objects}')
    return
  skipped = f'; skipped {len(result["skipped"])} non-image file(s)' if result['skipped'] else ''
  print(f'Predicted {len(result["written"])} image(s) into {result["output"]} at threshold '
        f'{result["threshold"]:.3f} ({result["threshold_source"]}){skipped}')


def _export(config, workdir: str) -> None:
  from flmiseg.export import bioimage  # pylint: disable=g-import-not-at-top
  result = bioimage.run(config, workdir, bioimage.Options(output=FLAGS.output, tile=FLAGS.tile))
  print(f'Wrote the bioimage.io package of {workdir} (step {result["step"]}; '
        f'{result["layout"].describe()}) into {result["output"]}')


def mode_config(mode: str, workdir: str):
  """The config a mode runs with: --config for training (and for summary of a config that
  was never trained); otherwise the run directory's, with the command line's inference
  settings (flmiseg/store/rundir.py)."""
  if mode == 'train' or (mode == 'summary' and FLAGS['config'].present
                         and not (pathlib.Path(workdir) / rundir.CONFIG_FILE).is_file()):
    config = cli_flags.load_config()
    if 'imports' in config:  # config.json then names the same files from anywhere
      config.imports = registry.normalize_imports(config.imports)
    return config
  if mode == 'summary':
    if not (pathlib.Path(workdir) / rundir.CONFIG_FILE).is_file():
      raise UserError(f'--workdir={workdir}: no {rundir.CONFIG_FILE}; give --config too')
  else:
    rundir.check_trained(workdir)
  config = _inference_config(workdir, cli_flags.load_config())
  named = FLAGS['config'].override_values.get('imports') if FLAGS.config is not None else None
  config.imports = rundir.imports_to_run(
      workdir, config, None if named is None else registry.normalize_imports(named),
      FLAGS.trust_imports)
  return config


def _inference_config(workdir: str, given):
  """The run's config with the inference settings of `given` (the command line's): which
  fields those are, and which define the model, each field's rule says (config_checks)."""
  from flmiseg.train import config_checks  # pylint: disable=g-import-not-at-top
  return rundir.inference_config(workdir, given, config_checks.INFERENCE_FIELDS,
                                 config_checks.MODEL_FIELDS)
