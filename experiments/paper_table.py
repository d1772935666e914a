"""The paper's table in one command: every model, original vs lowlevel, per dataset kind.

  python -m experiments.paper_table --preset=cpu --workdir=runs/paper_table
  python -m experiments.paper_table --preset=reference --workdir=runs/paper_table_gpu
  # on your own data (one kind, your lists):
  python -m experiments.paper_table --preset=cpu --kinds=er \
      --train_list=train.txt --test_list=test.txt --workdir=runs/my_table

Trains every cell (kind, model, variant, seed) with `flmiseg.train.train_and_evaluate` in its
own folder WORKDIR/<kind>/<model>_<variant>/seed<k>, then writes WORKDIR/table.md and
WORKDIR/table.csv: test IoU and F1 (mean +- std over seeds) per model and kind, and for the
general-purpose models (fcn, segnet, deeplabv3p, hrnetv2) the lowlevel - original difference
with a paired test: a two-sided Wilcoxon signed-rank test on per-image test IoU, pairing the
same test image under the same seed (seeds x test images pairs). Cells run seed-major (every
kind and model for seed 0, then seed 1, ...), so a partial run still gives a complete table
over fewer seeds. Resumable: a finished cell (its result.json) is never retrained.

Presets:
  cpu        width 8 for every model, 128x128 crops, batch 8, Adam 2e-3 cosine, 60 steps,
             3 seeds: 1 h 50 min on the 2-core CPU (configs/default.py otherwise).
  reference  the reference recipe (configs/unet_<kind>.py: 256x256, batch 16, 30 epochs,
             SGD 0.01 step schedule, soft IoU) at each model's reference base width; a GPU job.
  tiny       width 4, 64x64 images, 4 steps, 1 seed: a test of this harness, not a result.
"""

import csv
import importlib
import json
import pathlib
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from scipy import stats

from flmiseg.configs import default
from flmiseg import models
from flmiseg import train

GENERAL = ('fcn', 'segnet', 'deeplabv3p', 'hrnetv2')  # the paper's general-purpose models
SPECIFIC = ('unet', 'unet_pp', 'agnet')  # the biomedical models it compares against
KINDS = ('er', 'mito', 'nucleus')


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_enum('preset', 'cpu', ['cpu', 'reference', 'tiny'], 'Training recipe.')
  flags.DEFINE_string('workdir', 'runs/paper_table', 'Folder for every cell and the table.')
  flags.DEFINE_list('kinds', list(KINDS), 'Dataset kinds (er, mito, nucleus).')
  flags.DEFINE_list('models', list(GENERAL + SPECIFIC), 'Models to train.')
  flags.DEFINE_integer('seeds', 0, 'Seeds per cell; 0 = the preset\'s (3 cpu/reference, 1 tiny).')
  flags.DEFINE_string('train_list', '', 'Your training list/folder (then --kinds is one kind).')
  flags.DEFINE_string('test_list', '', 'Your test list/folder.')
  flags.DEFINE_string('synthetic_dir', '', 'Cache folder of simulated data ('' = default).')


FLAGS = flags.FLAGS


def variants(name: str) -> tuple[str, ...]:
  return ('original', 'lowlevel') if name in GENERAL else ('original',)


def cell_config(preset: str, kind: str, name: str, variant: str, seed: int, *,
                train_list: str = '', test_list: str = '', synthetic_dir: str = ''):
  """The config of one cell of the table (on the user's lists when `train_list` is given)."""
  if preset == 'reference':
    config = importlib.import_module(f'flmiseg.configs.unet_{kind}').get_config()
    config.model.width = models.MODELS[name][2]
  else:
    config = default.get_config()
    config.data.kind = kind
    config.model.width = 8 if preset == 'cpu' else 4
    config.train.num_steps = 60 if preset == 'cpu' else 4
    config.eval.every_steps = config.train.num_steps
    config.train.log_every_steps = config.train.num_steps
    if preset == 'tiny':
      config.data.synthetic_size = 64
      config.data.crop_size = 64
      config.data.num_synthetic_train = 16
      config.data.num_synthetic_test = 4
      config.data.val_fraction = 0.25
      config.optim.warmup_steps = 0
  config.model.name, config.model.variant, config.seed = name, variant, seed
  config.data.seed = seed  # each seed also simulates its own data, as before data.seed existed
  if train_list:
    config.data.source = 'lists'
    config.data.train_list, config.data.test_list = train_list, test_list
  if synthetic_dir:
    config.data.synthetic_dir = synthetic_dir
  return config


def run_cell(workdir: pathlib.Path, config) -> dict:
  """Trains and evaluates one cell unless its result.json exists; returns the result."""
  done = workdir / 'result.json'
  if done.exists():
    return json.loads(done.read_text())
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, workdir)
  with open(workdir / 'eval' / 'per_image.csv', newline='') as f:
    per_image = {row['name']: float(row['iou']) for row in csv.DictReader(f)}
  result = {'iou': summary['iou'], 'f1': summary['f1'], 'per_image_iou': per_image,
            'seconds': time.perf_counter() - start}
  tmp = done.with_name('.result.json.tmp')
  tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + '\n')
  tmp.replace(done)
  return result


def paired_test(original: list[dict], lowlevel: list[dict]) -> tuple[float, int]:
  """Wilcoxon signed-rank p-value on per-image IoU pairs (same seed, same image)."""
  a, b = [], []
  for o, l in zip(original, lowlevel):
    for name, iou in o['per_image_iou'].items():
      a.append(iou)
      b.append(l['per_image_iou'][name])
  diff = np.asarray(b) - np.asarray(a)
  if not np.any(diff):
    return 1.0, len(diff)
  return float(stats.wilcoxon(b, a).pvalue), len(diff)


def _mean_std(values: list[float]) -> str:
  return f'{np.mean(values):.3f} ± {np.std(values):.3f}' if values else '–'


def make_table(results: dict, kinds, names, num_seeds: int) -> tuple[str, list[dict], str]:
  """(Markdown table, CSV rows, verdict) from results[(kind, name, variant)] = [per seed]."""
  rows = []
  for kind in kinds:
    for name in names:
      for variant in variants(name):
        cells = results.get((kind, name, variant), [])
        ious, f1s = [c['iou'] for c in cells], [c['f1'] for c in cells]
        row = {'kind': kind, 'model': name, 'variant': variant, 'seeds': len(cells),
               'iou_mean': np.mean(ious) if ious else np.nan,
               'iou_std': np.std(ious) if ious else np.nan,
               'f1_mean': np.mean(f1s) if f1s else np.nan,
               'f1_std': np.std(f1s) if f1s else np.nan,
               'iou': _mean_std(ious), 'f1': _mean_std(f1s),
               'delta_iou': '', 'p_value': '', 'pairs': ''}
        if variant == 'lowlevel':
          orig = results.get((kind, name, 'original'), [])
          n = min(len(orig), len(cells))
          if n:
            p, pairs = paired_test(orig[:n], cells[:n])
            delta = np.mean(ious[:n]) - np.mean([c['iou'] for c in orig[:n]])
            row.update(delta_iou=f'{delta:+.3f}', p_value=f'{p:.2g}', pairs=pairs)
        rows.append(row)
  lines = ['| kind | model | variant | test IoU | test F1 | lowlevel − original IoU | '
           'p (Wilcoxon, pairs) |', '|---|---|---|---|---|---|---|']
  for r in rows:
    test = f'{r["p_value"]} ({r["pairs"]})' if r['p_value'] else ''
    lines.append(f'| {r["kind"]} | {r["model"]} | {r["variant"]} | {r["iou"]} | {r["f1"]} | '
                 f'{r["delta_iou"]} | {test} |')
  compared = [r for r in rows if r['delta_iou']]
  worse = [f'{r["model"]} on {r["kind"]} ({r["delta_iou"]})' for r in compared
           if float(r['delta_iou']) <= 0]
  weak = [f'{r["model"]} on {r["kind"]} (p={r["p_value"]})' for r in compared
          if float(r['delta_iou']) > 0 and float(r['p_value']) >= 0.05]
  if not compared:
    verdict = 'No lowlevel/original pair finished yet.'
  elif not worse:
    verdict = (f'The paper\'s claim holds on all {len(compared)} comparisons: lowlevel beats '
               'original for every general-purpose model on every kind' +
               (f'; not significant at 0.05 for {", ".join(weak)}.' if weak else
                ', each significant at 0.05.'))
  else:
    verdict = (f'The paper\'s claim holds on {len(compared) - len(worse)} of {len(compared)} '
               f'comparisons; lowlevel does not beat original for {", ".join(worse)}.')
  return '\n'.join(lines), rows, verdict


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = pathlib.Path(FLAGS.workdir)
  num_seeds = FLAGS.seeds or (1 if FLAGS.preset == 'tiny' else 3)
  unknown = [n for n in FLAGS.models if n not in GENERAL + SPECIFIC]
  bad_kinds = [k for k in FLAGS.kinds if k not in KINDS]
  if unknown or bad_kinds:
    raise app.UsageError(f'unknown --models {unknown} or --kinds {bad_kinds}; valid: '
                         f'{", ".join(GENERAL + SPECIFIC)} and {", ".join(KINDS)}')
  if FLAGS.train_list and len(FLAGS.kinds) != 1:
    raise app.UsageError('--train_list: give exactly one --kinds (the preprocessing kind)')
  results = {}
  for seed in range(num_seeds):
    for kind in FLAGS.kinds:
      for name in FLAGS.models:
        for variant in variants(name):
          workdir = root / kind / f'{name}_{variant}' / f'seed{seed}'
          config = cell_config(FLAGS.preset, kind, name, variant, seed,
                               train_list=FLAGS.train_list, test_list=FLAGS.test_list,
                               synthetic_dir=FLAGS.synthetic_dir)
          result = run_cell(workdir, config)
          results.setdefault((kind, name, variant), []).append(result)
          print(json.dumps({'kind': kind, 'model': name, 'variant': variant, 'seed': seed,
                            'iou': round(result['iou'], 4), 'f1': round(result['f1'], 4),
                            'seconds': round(result['seconds'])}), flush=True)
  table, rows, verdict = make_table(results, FLAGS.kinds, FLAGS.models, num_seeds)
  header = (f'Preset `{FLAGS.preset}`, {num_seeds} seed(s); mean ± std over seeds of the '
            'test-set mean per-image IoU / F1.\n\n')
  (root / 'table.md').write_text(header + table + '\n\n' + verdict + '\n')
  with open(root / 'table.csv', 'w', newline='') as f:
    fields = ['kind', 'model', 'variant', 'seeds', 'iou_mean', 'iou_std', 'f1_mean', 'f1_std',
              'delta_iou', 'p_value', 'pairs']
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  print(header + table + '\n\n' + verdict)


if __name__ == '__main__':
  define_flags()
  app.run(main)
