"""Which features carry the segmentation: the paper's ablation of the decoder's inputs.

  python -m experiments.paper.feature_importance --workdir=runs/default \
      [--figure=docs/feature_importance.png]

For a trained run (its DIR/config.json and best checkpoint), zeroes each input of the decoder in
turn at inference, never retraining: every skip connection (skip0 = full resolution, skip1 =
1/2, ...) and the bottleneck path (the deepest feature, where the decoder starts), and
reports the test IoU without it and the drop from the intact model. Works for models with an
`ablate` field: unet, and the `lowlevel` wrapper. Writes DIR/feature_importance/ (table.md,
results.json, importance.png).

Zeroing a post-ReLU feature map is the simplest "remove this input" (the decoder then sees
what it sees for a blank input region at that level); a large drop means the decoder relies on
that level, a small one that the other levels carry the same information.
"""

import json
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from flmiseg.evaluation import best_checkpoint
from flmiseg.evaluation import evaluate
from flmiseg.train import losses
from flmiseg.evaluation import metrics
from flmiseg.core import registry
from flmiseg.store import rundir
from flmiseg.train import steps as steps_lib
from flmiseg.train import trainer
from flmiseg.data import loader
from flmiseg.core.errors import UserError


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('workdir', None, 'A trained run (with config.json and a checkpoint).')
  flags.DEFINE_string('figure', '', 'Also save the bar chart here (e.g. docs/...png).')
  flags.DEFINE_string('imports', None, 'The code of your own that the run needs (its '
                      'config.imports: .py files or modules), imported before the model is built.')
  flags.DEFINE_bool('trust_imports', False, "Import what the run's config.imports names.")


FLAGS = flags.FLAGS


def ablation_points(model, hw: tuple[int, int]) -> list[str]:
  """Names of the decoder inputs `model` can zero: skip0.. (finest first), 'bottleneck'."""
  if 'ablate' not in {f.name for f in model.__dataclass_fields__.values()}:
    raise UserError(f'{type(model).__name__} cannot zero its decoder inputs (no `ablate` '
                    'field); supported: unet, lowlevel')
  x = jnp.zeros((1, *hw, 1), jnp.float32)
  _, aux = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
  # Every model's aux holds its skips (finest first) and its bottleneck apart from them
  # (flmiseg/models/__init__.py).
  return [f'skip{i}' for i in range(len(aux['skips']))] + ['bottleneck']


def mean_iou(predict, state, source, mesh, batch_size: int) -> tuple[float, float]:
  """(mean per-image IoU, pooled IoU) of `state` on `source`."""
  rows = [c for _, _, c in evaluate.predictions(predict, state, source, mesh, batch_size,
                                                 with_probs=False)]
  counts = {k: np.array([r[k] for r in rows]) for k in metrics.COUNT_NAMES}
  per_image = metrics.overlap_metrics(**counts)['iou']
  pooled = metrics.overlap_metrics(**{k: v.sum() for k, v in counts.items()})['iou']
  return float(np.mean(per_image)), float(pooled)


def run(workdir: pathlib.Path, imports: str | None = None, trust_imports: bool = False
        ) -> list[dict]:
  """The intact model's and every ablation's test IoU; rows also hold the drop.

  `imports`/`trust_imports` as the CLI's --config.imports/--trust_imports: a run directory
  never imports the code its config names on its own (flmiseg/store/rundir.py).
  """
  saved = workdir / rundir.CONFIG_FILE
  if not saved.exists():
    raise UserError(f'{saved}: not found; --workdir must be a trained run')
  config = rundir.read_config(workdir)
  registry.import_modules(rundir.imports_to_run(
      workdir, config, None if imports is None else registry.normalize_imports(imports),
      trust_imports))
  data = loader.load(config, workdir / 'cache', need_train=False)
  if data.test is None:
    raise UserError(f'{workdir}: its config has no test set to measure on')
  crop = config.data.crop_size
  setup = trainer.build(config, (crop, crop), 1)
  model, schedule, mesh, state = setup.model, setup.schedule, setup.mesh, setup.state
  state, step = best_checkpoint.restore_best(workdir, state)
  loss_fn = losses.from_config(config)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  _, predict = steps_lib.jit_steps(config, loss_fn, schedule, mesh, shardings)
  rows = []
  for name in ['none'] + ablation_points(model, (crop, crop)):
    # apply_fn is static in the state, so each ablation traces its own program.
    ablated = model.clone(ablate=() if name == 'none' else (name,))
    iou, pooled = mean_iou(predict, state.replace(apply_fn=ablated.apply), data.test, mesh,
                           config.eval.batch_size)
    rows.append({'zeroed': name, 'iou': iou, 'pooled_iou': pooled})
    logging.info('zeroed %s: IoU %.4f', name, iou)
  for row in rows:
    row['drop'] = rows[0]['iou'] - row['iou']
  out = workdir / 'feature_importance'
  out.mkdir(exist_ok=True)
  (out / 'results.json').write_text(json.dumps(
      {'checkpoint_step': step, 'model': config.model.to_dict(), 'rows': rows},
      indent=1) + '\n')
  table = format_table(rows, config, len(data.test))
  (out / 'table.md').write_text(table + '\n')
  plot(rows, out / 'importance.png', title=f'{config.model.name} (width '
       f'{config.model.width}), {config.data.kind}: test IoU drop when zeroed')
  return rows


def format_table(rows: list[dict], config, num_images: int) -> str:
  lines = [f'{config.model.name} width {config.model.width} on {num_images} '
           f'{config.data.kind} test images (threshold {config.eval.threshold})', '',
           '| zeroed input | test IoU | drop | pooled IoU |', '|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["zeroed"]} | {r["iou"]:.4f} | {r["drop"]:+.4f} | '
                 f'{r["pooled_iou"]:.4f} |')
  return '\n'.join(lines)


def plot(rows: list[dict], path, title: str) -> None:
  names = [r['zeroed'] for r in rows[1:]]
  drops = [r['drop'] for r in rows[1:]]
  fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
  ax.bar(names, drops, color=['#4477aa'] * (len(names) - 1) + ['#cc6677'])
  for i, d in enumerate(drops):
    ax.text(i, d, f'{d:.2f}', ha='center', va='bottom', fontsize=8)
  ax.set_ylabel('IoU drop (intact − zeroed)')
  ax.set_title(title, fontsize=9)
  ax.set_ylim(min(0.0, min(drops)) * 1.1, max(drops + [0.01]) * 1.15)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  workdir = pathlib.Path(FLAGS.workdir)
  try:
    run(workdir, FLAGS.imports, FLAGS.trust_imports)
  except UserError as e:
    raise app.UsageError(str(e)) from None
  print((workdir / 'feature_importance' / 'table.md').read_text())
  if FLAGS.figure:
    pathlib.Path(FLAGS.figure).write_bytes(
        (workdir / 'feature_importance' / 'importance.png').read_bytes())


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  app.run(main)
