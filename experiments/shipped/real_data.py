"""A model on a real annotated dataset that `python -m flmiseg.data.public` built, as users run
it: `flmiseg.load(model).segment(image, instances=True)` with default settings.

  python -m experiments.shipped.real_data --data=data/dsb --split=val --model=nucleus \
      [--model=runs/nucleus_dsb] [--diameter=25 | --no_rescale] [--out=dsb_val.json]
  python -m experiments.shipped.real_data --data=data/ernet --split=all --model=er

--split names DATA/<split>/ (images/ + masks/, the DSB's train, val, test) or the list
DATA/<split>.txt (ERNet's all, leave_out_stack1/test). Per stratum of the dataset (the DSB's
acquisition types from DATA/manifest.csv, ERNet's stacks from DATA/summary.json) and over
every image: the mean per-image IoU and, where the masks are label images (the DSB's), the
instance AP@0.5 pooled over the images (StarDist's `matching_dataset`), of the model's
instances and, for comparison, of the connected components of its mask. Where the masks are
binary (ERNet's, one annotated cell per image) also where the prediction disagrees: the
pixel precision and recall, the predicted over the annotated pixels, and the IoU inside the
annotated region (`flmiseg.data.public.annotated_region`: the annotation's convex hull grown
by 10 px), which leaves out whatever is predicted in cells nobody annotated. Each image is read
as flmiseg reads it (grey stored as RGBA as its grey) and scored by `common.mask_scores`
and `common.pooled`. Prints a table per model with the machine and the wall time (loading
once, then segmenting every image); --out also writes the figures as JSON.
"""

import csv
import json
import pathlib
import sys
import time

from absl import app
from absl import flags
import numpy as np

import flmiseg
from experiments import common
from flmiseg.core import console
from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import public
from flmiseg.objects import matching
from flmiseg.store import settings

FLAGS = flags.FLAGS
RECORDS = ('manifest.csv', 'summary.json')  # what flmiseg.data.public writes beside the data


def split_pairs(data: pathlib.Path, split: str) -> list[lists.Pair]:
  """The (image, mask) pairs of `split` of the dataset folder `data`: DATA/<split>/images and
  masks, or the list DATA/<split>.txt. UserError (one line) when `data` is no dataset that
  flmiseg.data.public wrote, or has no such split."""
  if not data.is_dir():
    raise UserError(f'--data={data}: not a folder')
  if not any((data / name).is_file() for name in RECORDS):
    raise UserError(f'--data={data}: not a dataset built by python -m flmiseg.data.public '
                    f'(it has no {" or ".join(RECORDS)})')
  folder, listed = data / split, data / f'{split}.txt'
  if (folder / 'images').is_dir():
    return lists.read_folder(folder)
  if listed.is_file():
    return lists.read_list(listed)
  found = sorted([p.name for p in data.iterdir() if (p / 'images').is_dir()] +
                 [p.relative_to(data).with_suffix('').as_posix() for p in data.rglob('*.txt')])
  raise UserError(f'--split={split}: {data} has no {split}/images/ folder or {split}.txt '
                  f'list; its splits: {", ".join(found) or "none"}')


def strata(data: pathlib.Path) -> dict[str, str]:
  """{image name (file stem): stratum} as the dataset records them: the DSB's manifest.csv
  (its 'stratum' column), else ERNet's summary.json (each pair's 'stack'); {} if neither."""
  if (data / 'manifest.csv').is_file():
    with open(data / 'manifest.csv', newline='') as f:
      return {row['id']: row['stratum'] for row in csv.DictReader(f)}
  summary = json.loads((data / 'summary.json').read_text())
  return {pair['name']: pair['stack'] for pair in summary.get('pairs', [])}


def disagreement(truth: np.ndarray, pred: np.ndarray) -> dict:
  """Of a binary annotation `truth` and a predicted mask `pred` (H, W): 'precision' and
  'recall' of the pixels, 'pred_to_truth' (predicted over annotated pixels) and
  'iou_in_region' (the IoU inside `annotated_region(truth)`)."""
  truth, pred = truth > 0, pred > 0
  tp, n_pred, n_truth = (truth & pred).sum(), pred.sum(), truth.sum()
  inside = pred & public.annotated_region(truth)
  return {'precision': float(tp / max(n_pred, 1)), 'recall': float(tp / max(n_truth, 1)),
          'pred_to_truth': float(n_pred / max(n_truth, 1)),
          'iou_in_region': float((inside & truth).sum() / max((inside | truth).sum(), 1))}


DISAGREEMENT = ('iou_in_region', 'precision', 'recall', 'pred_to_truth')


def segmented(model, pairs, truths, diameter: float | None, rescale: bool = True,
              dim_gain: float | None = None):
  """Yields (pair, image, truth, found, seconds) for each pair and its annotation in
  `truths`: the image as flmiseg reads it, segmented by `model` (a flmiseg Model) as users
  run it (instances on; `diameter`, `rescale` and `dim_gain` as predict's), and the seconds
  that took."""
  for pair, truth in zip(pairs, truths):
    image = io.read_image(pair.image)
    begin = time.perf_counter()
    found = model.segment(image, instances=True, diameter=diameter, rescale=rescale,
                          dim_gain=dim_gain, name=pair.image.name)
    yield pair, image, truth, found, time.perf_counter() - begin


def segment_all(model_name: str, pairs, diameter: float | None, rescale: bool = True,
                dim_gain: float | None = None) -> tuple[list[dict], dict]:
  """(per image `common.mask_scores` with 'name', timing {'load_s', 'segment_s'}) of the model
  `model_name` (shipped name or folder) on `pairs`, each segmented as users do. When the
  dataset's masks are label images (any one is) the instances are matched and each row
  counts its annotated objects ('objects')."""
  start = time.perf_counter()
  model = flmiseg.load(model_name)
  loaded = time.perf_counter()
  truths = [io.read_mask_values(pair.mask) for pair in pairs]
  labelled = any(matching.is_label_image(t) for t in truths)
  min_size = settings.min_size(model.config)
  seconds, rows = 0.0, []
  for pair, _, truth, found, spent in segmented(model, pairs, truths, diameter, rescale,
                                                dim_gain):
    seconds += spent
    one = common.mask_scores(truth, found.mask > 0, found.labels if labelled else None,
                             min_size)
    del one['pred'], one['truth']  # the scores alone: a split's masks need not stay in memory
    counted = ({'objects': int(len(np.unique(truth)) - 1)} if labelled else
               disagreement(truth, found.mask))
    rows.append({'name': pair.image.stem, **counted, **one})
  return rows, {'load_s': loaded - start, 'segment_s': seconds}


def summarize(rows: list[dict], named: dict[str, str]) -> dict:
  """{stratum: figures, ..., 'all': figures}; figures: `common.pooled` of its images with
  'images' and, for label images, 'objects' (annotated objects) added."""
  groups = {}
  for row in rows:
    groups.setdefault(named.get(row['name'], 'unrecorded'), []).append(row)

  def figures(group):
    counted = ({'objects': sum(r['objects'] for r in group)} if 'objects' in group[0]
               else {})
    means = {key: float(np.mean([r[key] for r in group])) for key in DISAGREEMENT
             if key in group[0]}
    return {'images': len(group), **counted, **common.pooled(group), **means}

  return {**{name: figures(group) for name, group in sorted(groups.items())},
          'all': figures(rows)}


def table(name: str, result: dict) -> str:
  """The markdown table of one model's `summarize` result (binary masks: with the means of
  DISAGREEMENT over the images)."""
  binary = 'precision' in result['all']
  extra = (' IoU in the annotated region | pixel precision | pixel recall | predicted / '
           'annotated pixels |' if binary else '')
  lines = [f'| {name} | images | objects | IoU | AP@0.5 | AP@0.5, connected components |' +
           extra, '|---|---|---|---|---|---|' + '---|' * (4 * binary)]
  for stratum, f in result.items():
    ap = lambda key: f'{f[key]:.3f}' if key in f else '-'  # noqa: E731
    bold = '**' if stratum == 'all' else ''
    lines.append(f'| {bold}{stratum}{bold} | {f["images"]} | {f.get("objects", "-")} | '
                 f'{f["iou"]:.3f} | {ap("ap_0.5")} | {ap("ap_0.5_connected_components")} |' +
                 ''.join(f' {f[key]:.3f} |' for key in DISAGREEMENT if binary))
  return '\n'.join(lines)


def measure(data: pathlib.Path, split: str, model_names, diameter: float | None,
            rescale: bool = True, dim_gain: float | None = None) -> dict:
  """Every model's figures on the split (`summarize`) with its timing, the machine and the
  command's settings, as --out writes them."""
  pairs = split_pairs(data, split)
  named = strata(data)
  result = {'data': str(data), 'split': split, 'diameter': diameter, 'rescale': rescale,
            'dim_gain': dim_gain, 'machine': common.machine(), 'models': {}}
  for name in model_names:
    rows, timing = segment_all(name, pairs, diameter, rescale, dim_gain)
    result['models'][name] = {**timing, 'figures': summarize(rows, named)}
  return result


def check_resizing_flags() -> None:
  """Exits with one line for a negative --diameter, or --diameter with --no_rescale."""
  if FLAGS.diameter is not None and FLAGS.diameter < 0:
    sys.exit(f'error: --diameter={FLAGS.diameter:g}: a size in pixels > 0, or 0 to measure it')
  if FLAGS.diameter is not None and FLAGS.no_rescale:
    sys.exit(f'error: --diameter={FLAGS.diameter:g} with --no_rescale: give one')


def resizing_label() -> str:
  """', --no_rescale', ', --diameter=D' or '', then ', --dim_gain=G' when given, for the
  printed tables' titles."""
  gain = '' if FLAGS.dim_gain is None else f', --dim_gain={FLAGS.dim_gain:g}'
  if FLAGS.no_rescale:
    return ', --no_rescale' + gain
  return ('' if FLAGS.diameter is None else f', --diameter={FLAGS.diameter:g}') + gain


def main(argv):
  del argv
  console.setup()
  check_resizing_flags()
  try:
    result = measure(pathlib.Path(FLAGS.data), FLAGS.split, FLAGS.model, FLAGS.diameter,
                     not FLAGS.no_rescale, FLAGS.dim_gain)
  except UserError as e:
    sys.exit(f'error: {e}')
  how = resizing_label()
  for name, one in result['models'].items():
    print(f'\n{FLAGS.data} {FLAGS.split}, {name}{how}: load {one["load_s"]:.1f} s, segment '
          f'{one["segment_s"]:.1f} s ({result["machine"]})\n')
    print(table(name, one['figures']))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(result, indent=1) + '\n')


def define_flags(data_help: str, model_help: str) -> None:
  """The flags this script shares with experiments/shipped/failure_modes.py."""
  flags.DEFINE_string('data', None, data_help, required=True)
  flags.DEFINE_string('split', 'val', 'DATA/<split>/ (images/ + masks/) or DATA/<split>.txt.')
  flags.DEFINE_multi_string('model', ['nucleus'], model_help)
  flags.DEFINE_float('diameter', None, 'The objects\' diameter in pixels, as predict\'s '
                     '--diameter (0: measured per image); default: the model\'s choice, as '
                     'users run it (the shipped nucleus model measures them).')
  flags.DEFINE_bool('no_rescale', False, 'Never resize the images, as predict\'s '
                    '--no_rescale (the images at their own size).')
  flags.DEFINE_float('dim_gain', None, 'The dim pass\'s gain, as predict\'s --dim_gain (0: '
                     'off); default: the model\'s choice.')
  flags.DEFINE_string('out', '', 'Also write the figures to this JSON file.')


if __name__ == '__main__':
  define_flags('A dataset folder that python -m flmiseg.data.public wrote.',
               'A shipped model (er, mito, nucleus) or a run or packed folder; repeat to '
               'measure several.')
  app.run(main)
