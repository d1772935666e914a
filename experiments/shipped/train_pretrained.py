"""The shipped er, mito and nucleus models: trained on domain-randomised simulations, packed
into flmiseg/pretrained/<kind>/, and measured.

  python -m experiments.shipped.train_pretrained --workdir=runs/pretrained   # train + pack
  python -m experiments.shipped.train_pretrained --workdir=runs/pretrained --measure
      # figures only
  python -m experiments.shipped.train_pretrained --measure --tta  # the same figures with --tta
  python -m experiments.shipped.train_pretrained --workdir=runs/pretrained_cycle2 --kinds=er \
      --steps=3000 --init_from=runs/pretrained/er --lr=5e-4  # a second cycle from a run
  python -m experiments.shipped.train_pretrained --kinds=er --steps=6000 --masks=geometry
      # the first cycle of the shipped er and mito models (docs/models.md)

Each kind trains `common.pretrained_config(kind)` (experiments/common.py: default U-Net
recipe, simulated images whose microscope knobs are drawn per image from the simulator's
'wide' distribution, and the pipeline's intensity/noise/blur/illumination/scale augmentation)
in WORKDIR/<kind>, then packs its best checkpoint as float16 (flmiseg/store/weights.py: `pack`).
--measure reports, for each shipped model: mean IoU on simulated test images of an unseen seed
drawn with the kind's default knobs and with the 'shifted' knobs (for a model trained with the
'invert' augmentation also on the default-knob test images with their contrast inverted, dark
objects on a bright background as in brightfield), and the wall time of a cold
`flmiseg --mode=predict --model=KIND` on a 1024x1024 16-bit image.
"""

import dataclasses
import json
import pathlib
import shutil
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tifffile

from experiments import common
from flmiseg.core import console
from flmiseg.core import files
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import weights
from flmiseg.train import trainer


def inverted_pairs(pairs, folder: pathlib.Path):
  """`pairs` with each image's contrast inverted (its dtype's maximum minus the value; a
  float image: its max + min minus the value), written into `folder`; masks unchanged."""
  folder.mkdir(parents=True, exist_ok=True)
  out = []
  for pair in pairs:
    image = tifffile.imread(pair.image)
    if np.issubdtype(image.dtype, np.integer):
      flipped = (np.iinfo(image.dtype).max - image).astype(image.dtype)
    else:
      flipped = image.max() + image.min() - image
    path = folder / pathlib.Path(pair.image).name
    tifffile.imwrite(path, flipped)
    out.append(dataclasses.replace(pair, image=path))
  return out


def train_and_pack(kind: str, workdir: pathlib.Path, steps: int, init_from: str = '',
                   lr: float = 0.0, masks: str = '', pack: bool = True) -> dict:
  """Trains the recipe `common.pretrained_config(kind, steps, init_from, lr, masks, --real,
  --synthetic_fraction, --width, --scale_range, --augment, --dim_range)` in `workdir` and, with `pack`, packs it as
  the shipped model `kind` (pack_shipped); returns weights.json's content, or the test summary without `pack`."""
  start = time.perf_counter()
  config = common.pretrained_config(
      kind, steps, init_from, lr, masks, real=FLAGS.real,
      synthetic_fraction=FLAGS.synthetic_fraction, width=FLAGS.width,
      scale_range=[float(v) for v in FLAGS.scale_range] or None,
      augment=','.join(FLAGS.augment), dim_range=[float(v) for v in FLAGS.dim_range] or None)
  result = trainer.train_and_evaluate(config, workdir)
  if not pack:
    return result
  return pack_shipped(kind, workdir, steps, time.perf_counter() - start, result.get('iou'),
                      init_from, lr, masks)


def pack_shipped(kind: str, workdir: pathlib.Path, steps: int, seconds: float,
                 test_iou_wide: float | None, init_from: str = '', lr: float = 0.0,
                 masks: str = '') -> dict:
  """Packs the finished run `workdir` (the recipe of `common.pretrained_config(kind, steps,
  init_from, lr, masks)`) as the shipped model `kind`, replacing the folder in the package in
  one rename."""
  out = pretrained.PRETRAINED_DIR / kind
  staged = out.with_name(f'.{kind}.new')
  shutil.rmtree(staged, ignore_errors=True)
  real = pathlib.Path(FLAGS.real) if FLAGS.real else None
  command = (f'python -m experiments.shipped.train_pretrained --workdir={workdir.parent} '
             f'--kinds={kind} --steps={steps}' + (f' --init_from={init_from}' if init_from
                                                  else '') + (f' --lr={lr:g}' if lr else '')
             + (f' --masks={masks}' if masks else '')
             + (f' --real=data/{real.name} --synthetic_fraction={FLAGS.synthetic_fraction:g}'
                if real else '') + (f' --width={FLAGS.width}' if FLAGS.width else '')
             + (f' --scale_range={",".join(FLAGS.scale_range)}' if FLAGS.scale_range else '')
             + (f' --augment={",".join(FLAGS.augment)}' if FLAGS.augment else '')
             + (f' --dim_range={",".join(FLAGS.dim_range)}' if FLAGS.dim_range else ''))
  info = weights.pack(workdir, staged, 'float16', provenance={
      'command': command, 'train_seconds': round(seconds), 'steps': steps,
      'machine': common.machine(), 'date': time.strftime('%Y-%m-%d'),
      'test_iou_wide': test_iou_wide})
  portable_config(staged / rundir.CONFIG_FILE, kind, real)
  # Swap the finished folder in, so a reader never sees a half-written shipped model.
  old = out.with_name(f'.{kind}.old')
  shutil.rmtree(old, ignore_errors=True)
  if out.exists():
    out.rename(old)
  staged.rename(out)
  shutil.rmtree(old, ignore_errors=True)
  return info


FLAGS = flags.FLAGS


def portable_config(path: pathlib.Path, kind: str, real: pathlib.Path | None) -> None:
  """Makes a packed model's config.json what the package needs on any machine: the real
  dataset's lists as the documented command builds them (data/<name>/<split>, not the training
  machine's folders) and the recipe's inference settings (config.eval.measure_diameter)."""
  saved = json.loads(path.read_text())
  if real is not None:
    for split in ('train', 'val', 'test'):
      if saved['data'].get(f'{split}_list', '').startswith(str(real.resolve())):
        saved['data'][f'{split}_list'] = f'data/{real.name}/{split}'
  saved['eval']['measure_diameter'] = bool(
      common.pretrained_config(kind, 1).eval.get('measure_diameter', False))
  files.write_json_atomic(path, saved)


def main(argv):
  del argv
  console.setup()
  rows = []
  for kind in FLAGS.kinds:
    if not FLAGS.measure:
      info = train_and_pack(kind, pathlib.Path(FLAGS.workdir) / kind, FLAGS.steps,
                            FLAGS.init_from, FLAGS.lr, FLAGS.masks, FLAGS.pack)
      print(f'{kind}: {"packed" if FLAGS.pack else "trained"}, {json.dumps(info)}')
      if not FLAGS.pack:
        continue
    folder = pretrained.PRETRAINED_DIR / kind
    row = {'kind': kind, 'tta': FLAGS.tta, **common.test_scores(folder, kind, FLAGS.tta)}
    if 'invert' in common.pretrained_config(kind, 1).data.augment:
      with tempfile.TemporaryDirectory() as tmp:
        pairs = inverted_pairs(common.test_pairs(kind, 'default'), pathlib.Path(tmp))
        inverted = common.scores(folder, pairs, FLAGS.tta)
        row.update({f'{k}_inverted': v for k, v in inverted.items()})
    row['cold_predict_1024_s'] = common.cold_predict_seconds(kind, tta=FLAGS.tta)
    rows.append(row)
    print(json.dumps(row))
  lines = ['| model | IoU, default knobs | IoU, shifted knobs | cold predict 1024x1024 (s) |',
           '|---|---|---|---|']
  lines += [f'| {r["kind"]} | {r["iou_default"]:.3f} | {r["iou_shifted"]:.3f} | '
            f'{r["cold_predict_1024_s"]:.1f} |' for r in rows]
  print('\n'.join(lines))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', 'runs/pretrained', 'Where each kind trains.')
  flags.DEFINE_list('kinds', list(common.KINDS), 'Which models.')
  flags.DEFINE_integer('steps', 1500, 'Training steps per model.')
  flags.DEFINE_bool('measure', False, 'Only measure the shipped models.')
  flags.DEFINE_string('init_from', '', 'A further training cycle from this run folder or '
                      'shipped model (one kind at a time).')
  flags.DEFINE_float('lr', 0.0, 'Peak learning rate (0: the recipe\'s, 2e-3).')
  flags.DEFINE_enum('masks', '', ['', 'geometry', 'visible'], 'How the training masks are '
                    "drawn ('': the kind's recipe; simulate.MASKS).")
  flags.DEFINE_string('real', '', 'Also train on this real dataset (a folder python -m '
                      'flmiseg.data.public wrote), validating and testing on its val/ and test/.')
  flags.DEFINE_float('synthetic_fraction', 0.5, 'With --real: the share of simulated draws.')
  flags.DEFINE_list('scale_range', [], 'The scale augmentation\'s zoom factors LOW,HIGH (e.g. '
                    '0.5,2; empty: the default\'s, 0.7,1.4).')
  flags.DEFINE_list('augment', [], 'More augmentation groups on top of the recipe\'s (e.g. '
                    'dim: real nuclei dimmed 1.4-14x, flmiseg/data/pipeline.py).')
  flags.DEFINE_list('dim_range', [], 'The dim augmentation\'s factors LOW,HIGH (e.g. '
                    '0.15,0.7; default: config.data.dim_range\'s).')
  flags.DEFINE_integer('width', 0, 'The U-Net\'s width (0: the recipe\'s, 16).')
  flags.DEFINE_bool('pack', True, 'Pack the trained model into flmiseg/pretrained/KIND and '
                    'measure it (--nopack: train only).')
  flags.DEFINE_bool('tta', False, 'Measure with --tta (the 8 flips/rotations averaged).')
  app.run(main)
