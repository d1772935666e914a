"""The paper's table in one command: every model, original vs lowlevel, per dataset kind.

  python -m experiments.paper.paper_table --preset=cpu --workdir=runs/paper_table
  python -m experiments.paper.paper_table --preset=converged --kinds=er --workdir=runs/converged
  python -m experiments.paper.paper_table --preset=reference --workdir=runs/paper_table_gpu
  # on your own data (one kind, your lists):
  python -m experiments.paper.paper_table --preset=cpu --kinds=er \
      --train_list=train.txt --test_list=test.txt --workdir=runs/my_table

Trains every cell (kind, model, variant, seed) with `flmiseg.train.trainer.train_and_evaluate` in its
own folder WORKDIR/<kind>/<model>_<variant>/seed<k>, then writes WORKDIR/table.md and
WORKDIR/table.csv: test IoU and F1 (mean +- std over seeds) per model and kind, and for the
general-purpose models (fcn, segnet, deeplabv3p, hrnetv2) the lowlevel - original difference
with a paired test: a two-sided Wilcoxon signed-rank test on per-image test IoU, pairing the
same test image under the same seed (seeds x test images pairs; preset converged, whose seeds
share the data: one pair per test image, its IoU averaged over seeds). Cells run seed-major (every
kind and model for seed 0, then seed 1, ...), so a partial run still gives a complete table
over fewer seeds. Resumable: a finished cell (its result.json) is never retrained.

Presets:
  converged  width 8, 128x128 crops, batch 8, Adam with a cosine schedule, 400 steps,
             validation every 40; the simulated data fixed across seeds (data.seed 0, only
             the model seed varies); each model's learning rate chosen among --lrs (1e-3,
             3e-3, 1e-2) by its seed-0 best validation IoU, never the test set. Each cell
             reports whether its validation IoU plateaued (PLATEAU_RULE). Sweep cells live in
             <model>_<variant>/lr<lr>/seed0; the chosen learning rate's seed 0 is a cell of
             the table. With --lrs_from (the recorded cells of kinds already run) each
             sweep instead starts at the rate those kinds chose and climbs LR_LADDER while
             validation improves, or reuses a rate that two or more kinds agree on:
               --kinds=mito --lrs_from=docs/paper_table_converged/cells/er
               --kinds=nucleus --lrs_from=docs/paper_table_converged/cells/er,...cells/mito
             WORKDIR/curves.png: validation IoU against steps per pair.
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
import shutil
import time

from absl import app
from absl import flags
import numpy as np
from scipy import stats

from flmiseg.configs import default
from flmiseg.core import console
from flmiseg import models
from flmiseg.train import trainer

GENERAL = ('fcn', 'segnet', 'deeplabv3p', 'hrnetv2')  # the paper's general-purpose models
SPECIFIC = ('unet', 'unet_pp', 'agnet')  # the biomedical models it compares against
KINDS = ('er', 'mito', 'nucleus')
PRESETS = ('cpu', 'converged', 'reference', 'tiny')
SWEEPS = ('converged',)  # presets that choose each model's learning rate on validation
CONVERGED_LRS = (1e-3, 3e-3, 1e-2)
# The rungs a climbing sweep (--lrs_from) moves along: steps of about x3, 1e-3 to 1e-1.
LR_LADDER = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
CONVERGED_STEPS, CONVERGED_EVERY = 400, 40
# A cell has plateaued when its last PLATEAU_LAST validation IoUs lie within PLATEAU_TOL.
PLATEAU_LAST, PLATEAU_TOL = 3, 0.005
PLATEAU_RULE = (f'the last {PLATEAU_LAST} validation IoUs within {PLATEAU_TOL} of each other')


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_enum('preset', 'cpu', PRESETS, 'Training recipe.')
  flags.DEFINE_list('lrs', [], 'Learning rates swept at seed 0 (preset converged; empty = '
                    f'{",".join(map(str, CONVERGED_LRS))}).')
  flags.DEFINE_list('lrs_from', [], 'Recorded cells of other kinds (e.g. '
                    'docs/paper_table_converged/cells/er): each model-variant\'s sweep starts at '
                    'the rate they chose and climbs the ladder '
                    f'{",".join(map(str, LR_LADDER))} while the seed-0 best validation IoU '
                    'improves; where two or more kinds chose one rate, it is reused unswept '
                    '(preset converged; replaces --lrs).')
  flags.DEFINE_string('workdir', 'runs/paper_table', 'Folder for every cell and the table.')
  flags.DEFINE_list('kinds', list(KINDS), 'Dataset kinds (er, mito, nucleus).')
  flags.DEFINE_list('models', list(GENERAL + SPECIFIC), 'Models to train.')
  flags.DEFINE_integer('seeds', 0, 'Seeds per cell; 0 = the preset\'s (3 cpu/reference, 1 tiny).')
  flags.DEFINE_string('train_list', '', 'Your training list/folder (then --kinds is one kind).')
  flags.DEFINE_string('test_list', '', 'Your test list/folder.')
  flags.DEFINE_string('results', '', 'A folder that keeps every finished cell\'s result.json '
                      '(small; commit it): cells found there are not trained again, so a '
                      'table can be finished across sittings and machines.')
  flags.DEFINE_string('compare_to', '', 'Another table.csv (e.g. docs/paper_table.csv): '
                      'WORKDIR/claims.md sets each claim beside it.')
  flags.DEFINE_string('synthetic_dir', '', 'Cache folder of simulated data ('' = default).')


FLAGS = flags.FLAGS


def variants(name: str) -> tuple[str, ...]:
  return ('original', 'lowlevel') if name in GENERAL else ('original',)


def cell_config(preset: str, kind: str, name: str, variant: str, seed: int, *,
                train_list: str = '', test_list: str = '', synthetic_dir: str = '',
                lr: float | None = None):
  """The config of one cell of the table (on the user's lists when `train_list` is given);
  `lr` replaces the preset's learning rate."""
  if preset == 'reference':
    config = importlib.import_module(f'flmiseg.configs.unet_{kind}').get_config()
    config.model.width = models.MODELS[name][2]
  else:
    config = default.get_config()
    config.data.kind = kind
    config.model.width = 4 if preset == 'tiny' else 8
    config.train.num_steps = {'cpu': 60, 'converged': CONVERGED_STEPS, 'tiny': 4}[preset]
    config.eval.every_steps = CONVERGED_EVERY if preset == 'converged' else \
        config.train.num_steps
    config.train.log_every_steps = config.eval.every_steps
    if preset == 'tiny':
      config.data.synthetic_size = 64
      config.data.crop_size = 64
      config.data.num_synthetic_train = 16
      config.data.num_synthetic_test = 4
      config.data.val_fraction = 0.25
      config.optim.warmup_steps = 0
  config.model.name, config.model.variant, config.seed = name, variant, seed
  # converged: one dataset, seeds vary the model only; the other presets keep their history
  # (each seed also simulates its own data, as before data.seed existed).
  config.data.seed = 0 if preset == 'converged' else seed
  if lr is not None:
    config.optim.lr = lr
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
  summary = trainer.train_and_evaluate(config, workdir)
  with open(workdir / 'eval' / 'per_image.csv', newline='') as f:
    per_image = {row['name']: float(row['iou']) for row in csv.DictReader(f)}
  result = {'iou': summary['iou'], 'f1': summary['f1'], 'per_image_iou': per_image,
            'seconds': time.perf_counter() - start, 'val_curve': val_curve(workdir)}
  tmp = done.with_name('.result.json.tmp')
  tmp.write_text(json.dumps(result, indent=1, sort_keys=True) + '\n')
  tmp.replace(done)
  return result


def val_curve(workdir: pathlib.Path) -> list[list[float]]:
  """[[step, validation IoU], ...] of a finished cell, from its metrics.jsonl (a step
  validated again after a resume counts once, with its last value)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  by_step = {r['step']: r['iou'] for r in records if r['kind'] == 'val' and 'iou' in r}
  return [[step, by_step[step]] for step in sorted(by_step)]


def plateaued(curve) -> bool:
  """PLATEAU_RULE on a cell's validation curve (False with fewer validations)."""
  last = [iou for _, iou in curve[-PLATEAU_LAST:]]
  return len(last) == PLATEAU_LAST and max(last) - min(last) <= PLATEAU_TOL


def best_val(result: dict) -> float:
  return max((iou for _, iou in result.get('val_curve', [])), default=-1.0)


def choose_lr(sweep: dict[float, dict]) -> float:
  """The learning rate whose seed-0 cell reached the best validation IoU (ties: the smaller)."""
  return max(sorted(sweep), key=lambda lr: (best_val(sweep[lr]), -lr))


def recorded_choice(cells: pathlib.Path, name: str, variant: str) -> float | None:
  """The learning rate a finished sweep chose (`choose_lr` over its recorded seed-0 cells
  cells/<name>_<variant>/lr<lr>/seed0/result.json), or None when it has none."""
  sweep = {}
  for record in sorted((cells / f'{name}_{variant}').glob('lr*/seed0/result.json')):
    sweep[float(record.parent.parent.name[2:])] = json.loads(record.read_text())
  return choose_lr(sweep) if sweep else None


def climb(start: float, run_at) -> dict[float, dict]:
  """A climbing sweep: `run_at(lr)` (a seed-0 result) at `start`, then at each next rung of
  LR_LADDER while the best validation IoU improves; returns {lr: result} of every rate run.

  The rate below the start is not tried: the starting rate is what an earlier sweep of the
  same model-variant chose on another kind."""
  rungs = [lr for lr in LR_LADDER if lr >= start * (1 - 1e-9)]
  if not rungs or abs(rungs[0] - start) > 1e-9 * start:
    rungs = [start] + rungs
  runs = {rungs[0]: run_at(rungs[0])}
  best = best_val(runs[rungs[0]])
  for lr in rungs[1:]:
    runs[lr] = run_at(lr)
    if best_val(runs[lr]) <= best:
      break
    best = best_val(runs[lr])
  return runs


def sweep_start(choices: list[float | None]) -> tuple[float, bool] | None:
  """(start rate, reuse) from the rates other kinds chose for one model-variant: reuse (no
  sweep) when two or more kinds chose the same rate; otherwise climb from the smallest
  chosen. None when no kind recorded a choice."""
  known = [c for c in choices if c is not None]
  if not known:
    return None
  return min(known), len(known) >= 2 and len({f'{c:g}' for c in known}) == 1


def paired_test(original: list[dict], lowlevel: list[dict],
                same_data: bool = False) -> tuple[float, int]:
  """Wilcoxon signed-rank p-value on per-image IoU pairs.

  Each seed simulates its own data by default, so a pair is one image under one seed. With
  `same_data` (every seed tests the same images, preset converged) a pair is one image, its
  IoU averaged over seeds: the same image under three seeds is not three independent pairs."""
  a, b = [], []
  if same_data:
    for name in original[0]['per_image_iou']:
      a.append(np.mean([o['per_image_iou'][name] for o in original]))
      b.append(np.mean([l['per_image_iou'][name] for l in lowlevel]))
  else:
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


def make_table(results: dict, kinds, names, num_seeds: int, lrs: dict | None = None,
               same_data: bool = False) -> tuple[str, list[dict], str]:
  """(Markdown table, CSV rows, verdict) from results[(kind, name, variant)] = [per seed].

  `lrs[(kind, name, variant)]`: each cell's chosen learning rate (a sweep preset); then the
  table also gives it and how many seeds plateaued (PLATEAU_RULE). `same_data`: every seed
  tested the same images (see `paired_test`)."""
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
               'delta_iou': '', 'p_value': '', 'pairs': '',
               'lr': f'{lrs[kind, name, variant]:g}' if lrs and (kind, name, variant) in lrs
                     else '',
               'plateau': f'{sum(plateaued(c.get("val_curve", [])) for c in cells)}/'
                          f'{len(cells)}'}
        if variant == 'lowlevel':
          orig = results.get((kind, name, 'original'), [])
          n = min(len(orig), len(cells))
          if n:
            p, pairs = paired_test(orig[:n], cells[:n], same_data)
            delta = np.mean(ious[:n]) - np.mean([c['iou'] for c in orig[:n]])
            row.update(delta_iou=f'{delta:+.3f}', p_value=f'{p:.2g}', pairs=pairs)
        rows.append(row)
  extra = ' lr | plateaued seeds |' if lrs is not None else ''
  lines = ['| kind | model | variant | test IoU | test F1 | lowlevel − original IoU | '
           'p (Wilcoxon, pairs) |' + extra, '|---|---|---|---|---|---|---|' +
           '---|---|' * bool(extra)]
  for r in rows:
    test = f'{r["p_value"]} ({r["pairs"]})' if r['p_value'] else ''
    lines.append(f'| {r["kind"]} | {r["model"]} | {r["variant"]} | {r["iou"]} | {r["f1"]} | '
                 f'{r["delta_iou"]} | {test} |' +
                 (f' {r["lr"]} | {r["plateau"]} |' if extra else ''))
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


def compare_claims(rows: list[dict], before: list[dict], label: str) -> str:
  """Markdown: each lowlevel-vs-original claim of `rows` next to the same claim in `before`
  (rows of another table.csv, e.g. the 60-step one), with its fate: 'holds' (lowlevel still
  significantly better, p < 0.05) and 'grows' or 'shrinks' by the difference's change,
  'not significant', or 'reverses' (original significantly better)."""
  old = {(r['kind'], r['model']): r for r in before if r.get('delta_iou')}
  lines = [f'| kind | model | lowlevel − original, {label} | lowlevel − original, this table '
           '| p | claim |', '|---|---|---|---|---|---|']
  for r in rows:
    if not r['delta_iou']:
      continue
    delta, p = float(r['delta_iou']), float(r['p_value'])
    prev = old.get((r['kind'], r['model']))
    if p >= 0.05:
      fate = 'not significant'
    elif delta < 0:
      fate = 'reverses'
    elif prev is None:
      fate = 'holds'
    else:
      fate = 'holds, grows' if delta > float(prev['delta_iou']) else 'holds, shrinks'
    lines.append(f'| {r["kind"]} | {r["model"]} | {prev["delta_iou"] if prev else "–"} | '
                 f'{r["delta_iou"]} | {r["p_value"]} | {fate} |')
  return '\n'.join(lines)


def plot_curves(results: dict, kinds, names, path: pathlib.Path) -> None:
  """Validation IoU against steps (mean over seeds) for each original/lowlevel pair."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pairs = [n for n in names if n in GENERAL]
  kinds = [k for k in kinds if any((k, n, 'original') in results for n in pairs)]
  if not pairs or not kinds:
    return
  fig, axes = plt.subplots(len(kinds), len(pairs), figsize=(3.2 * len(pairs), 2.6 * len(kinds)),
                           squeeze=False, sharey=True)
  for row, kind in enumerate(kinds):
    for col, name in enumerate(pairs):
      ax = axes[row, col]
      for variant, color in (('original', 'tab:blue'), ('lowlevel', 'tab:orange')):
        curves = [c['val_curve'] for c in results.get((kind, name, variant), [])
                  if c.get('val_curve')]
        if curves:
          n = min(map(len, curves))
          steps = [s for s, _ in curves[0][:n]]
          ious = np.array([[iou for _, iou in c[:n]] for c in curves])
          ax.plot(steps, ious.mean(0), 'o-', ms=3, color=color,
                  label=f'{variant} ({len(curves)} seeds)')
          if len(curves) > 1:
            ax.fill_between(steps, ious.min(0), ious.max(0), color=color, alpha=0.2)
      ax.set_title(f'{kind}: {name}', fontsize=9)
      ax.set_ylim(0, 1)
      ax.grid(alpha=0.3)
      if row == len(kinds) - 1:
        ax.set_xlabel('step')
      if col == 0:
        ax.set_ylabel('validation IoU')
      ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  console.setup()  # progress and results; library log lines (orbax's notes) stay off
  root = pathlib.Path(FLAGS.workdir)
  num_seeds = FLAGS.seeds or (1 if FLAGS.preset == 'tiny' else 3)
  unknown = [n for n in FLAGS.models if n not in GENERAL + SPECIFIC]
  bad_kinds = [k for k in FLAGS.kinds if k not in KINDS]
  if unknown or bad_kinds:
    raise app.UsageError(f'unknown --models {unknown} or --kinds {bad_kinds}; valid: '
                         f'{", ".join(GENERAL + SPECIFIC)} and {", ".join(KINDS)}')
  if FLAGS.train_list and len(FLAGS.kinds) != 1:
    raise app.UsageError('--train_list: give exactly one --kinds (the preprocessing kind)')
  sweep = FLAGS.preset in SWEEPS
  try:
    sweep_lrs = [float(lr) for lr in FLAGS.lrs] if FLAGS.lrs else list(CONVERGED_LRS)
  except ValueError:
    raise app.UsageError(f'--lrs: numbers, e.g. 1e-3,3e-3 (got {",".join(FLAGS.lrs)})') \
        from None
  if (FLAGS.lrs or FLAGS.lrs_from) and not sweep:
    raise app.UsageError(f'--lrs, --lrs_from: only preset {" or ".join(SWEEPS)} sweeps '
                         'learning rates')
  if FLAGS.lrs and FLAGS.lrs_from:
    raise app.UsageError('--lrs and --lrs_from: give one (a fixed grid, or a climb from '
                         'the rates other kinds chose)')
  lrs_from = [pathlib.Path(d) for d in FLAGS.lrs_from]
  missing = [str(d) for d in lrs_from if not d.is_dir()]
  if missing:
    raise app.UsageError(f'--lrs_from: no folder {", ".join(missing)}')

  def run(kind, name, variant, seed, lr=None):
    cell = pathlib.Path(kind, f'{name}_{variant}')
    cell = (cell / f'lr{lr:g}' if lr is not None else cell) / f'seed{seed}'
    record = pathlib.Path(FLAGS.results) / cell / 'result.json' if FLAGS.results else None
    if record and record.exists():  # finished in an earlier sitting, maybe on another machine
      result = json.loads(record.read_text())
    else:
      config = cell_config(FLAGS.preset, kind, name, variant, seed,
                           train_list=FLAGS.train_list, test_list=FLAGS.test_list,
                           synthetic_dir=FLAGS.synthetic_dir, lr=lr)
      result = run_cell(root / cell, config)
      if record:
        record.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / cell / 'result.json', record)
    print(json.dumps({'kind': kind, 'model': name, 'variant': variant, 'seed': seed,
                      **({'lr': lr} if lr is not None else {}),
                      'best_val_iou': round(best_val(result), 4),
                      'iou': round(result['iou'], 4), 'f1': round(result['f1'], 4),
                      'seconds': round(result['seconds'])}), flush=True)
    return result

  results, chosen = {}, {}
  for seed in range(num_seeds):
    for kind in FLAGS.kinds:
      for name in FLAGS.models:
        for variant in variants(name):
          key = (kind, name, variant)
          if not sweep:
            results.setdefault(key, []).append(run(kind, name, variant, seed))
          elif seed == 0:  # the sweep: its winner is seed 0 of the table
            start = sweep_start([recorded_choice(d, name, variant) for d in lrs_from])
            if start is None:  # a fixed grid (--lrs), or no other kind to start from
              by_lr = {lr: run(kind, name, variant, 0, lr) for lr in sweep_lrs}
            elif start[1]:  # every other kind chose this rate: reused, not swept
              by_lr = {start[0]: run(kind, name, variant, 0, start[0])}
            else:
              by_lr = climb(start[0], lambda lr: run(kind, name, variant, 0, lr))
            chosen[key] = choose_lr(by_lr)
            results[key] = [by_lr[chosen[key]]]
            sweep_file = root / kind / f'{name}_{variant}' / 'sweep.json'
            sweep_file.parent.mkdir(parents=True, exist_ok=True)  # cells may all be recorded
            sweep_file.write_text(json.dumps(
                {'chosen_lr': chosen[key], 'best_val_iou': {
                    f'{lr:g}': best_val(r) for lr, r in by_lr.items()}}, indent=1) + '\n')
          else:
            results[key].append(run(kind, name, variant, seed, chosen[key]))
  table, rows, verdict = make_table(results, FLAGS.kinds, FLAGS.models, num_seeds,
                                    chosen if sweep else None,
                                    same_data=FLAGS.preset == 'converged')
  how_swept = (f'among {", ".join(f"{lr:g}" for lr in sweep_lrs)}' if not lrs_from else
               'climbing from the rates chosen in ' + ', '.join(map(str, lrs_from)))
  header = (f'Preset `{FLAGS.preset}`, {num_seeds} seed(s); mean ± std over seeds of the '
            'test-set mean per-image IoU / F1.' +
            (f' Learning rate chosen on validation, {how_swept}; plateau: {PLATEAU_RULE}.'
             if sweep else '') + '\n\n')
  (root / 'table.md').write_text(header + table + '\n\n' + verdict + '\n')
  with open(root / 'table.csv', 'w', newline='') as f:
    fields = ['kind', 'model', 'variant', 'seeds', 'iou_mean', 'iou_std', 'f1_mean', 'f1_std',
              'delta_iou', 'p_value', 'pairs'] + ['lr', 'plateau'] * sweep
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  plot_curves(results, FLAGS.kinds, FLAGS.models, root / 'curves.png')
  claims = ''
  if FLAGS.compare_to:
    with open(FLAGS.compare_to, newline='') as f:
      claims = compare_claims(rows, list(csv.DictReader(f)), FLAGS.compare_to)
    (root / 'claims.md').write_text(claims + '\n')
  print(header + table + '\n\n' + verdict + ('\n\n' + claims if claims else ''))


if __name__ == '__main__':
  define_flags()
  app.run(main)
