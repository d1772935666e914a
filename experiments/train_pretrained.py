"""The shipped er, mito and nucleus models: trained on domain-randomised simulations, packed
into flmiseg/pretrained/<kind>/, and measured.

  python -m experiments.train_pretrained --workdir=runs/pretrained            # train + pack
  python -m experiments.train_pretrained --workdir=runs/pretrained --measure  # figures only
  python -m experiments.train_pretrained --measure --tta  # the same figures with --tta
  python -m experiments.train_pretrained --workdir=runs/pretrained_cycle2 --kinds=er \
      --steps=3000 --init_from=runs/pretrained/er --lr=5e-4  # a second cycle from a run
  python -m experiments.train_pretrained --kinds=er --steps=6000 --masks=geometry  # the
      # first cycle of the shipped er and mito models (docs/models.md)

Each kind trains `pretrained_config(kind)` (below: default U-Net recipe, simulated images
whose microscope knobs are drawn per image from the simulator's 'wide' distribution, and the
pipeline's intensity/noise/blur/illumination/scale augmentation) in WORKDIR/<kind>, then packs
its best checkpoint as float16 (flmiseg/store/pretrained.py). --measure reports, for each shipped
model: mean IoU on simulated test images of an unseen seed drawn with the kind's default knobs
and with the 'shifted' knobs (for a model trained with the 'invert' augmentation also on the
default-knob test images with their contrast inverted, dark objects on a bright background as
in brightfield), and the wall time of a cold `flmiseg --mode=predict --model=KIND`
on a 1024x1024 16-bit image.
"""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tifffile

from flmiseg.core import console
from flmiseg.inference import tiling
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.core import sharding
from flmiseg.train import trainer
from flmiseg.configs import default
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import loader
from flmiseg.data import preprocess

KINDS = pretrained.SHIPPED
TEST_SEED = 1000  # the simulated test sets: a seed no shipped model was trained on
# How each recipe's simulated masks are drawn: er and mito as people annotate, a tubule
# narrower than the PSF as wide as it looks (out to the half maximum of its blur), not its
# sub-resolution geometry; for nuclei the two ways differ by under 0.5 % (docs/models.md).
RECIPE_MASKS = {'er': 'visible', 'mito': 'visible', 'nucleus': 'geometry'}
# The diameter of the simulator's nuclei at object scale 1 (the middle of the scales the
# nucleus model learned, 0.35-2.5, on a log scale), pixels, as predict.object_diameter
# measures one: the area-weighted median of the diameters of circles of the same areas.
# Recorded as its config.data.object_diameter, what predict's --diameter resizes to.
NUCLEUS_DIAMETER = 31.0


def pretrained_config(kind: str, steps: int, init_from: str = '', lr: float = 0.0,
                      masks: str = ''):
  """The recipe of a shipped model; with `init_from` (a run folder or shipped model) a further
  training cycle that starts from its weights, at learning rate `lr` (0: the recipe's); with
  `masks` ('geometry' or 'visible') its masks drawn so instead of the recipe's way."""
  config = default.get_config()
  config.data.kind = kind
  config.data.synthetic_params = 'wide'
  config.data.num_synthetic_train = 600
  config.data.num_synthetic_test = 20
  config.data.augment = 'all'
  if kind == 'nucleus':
    # Nuclei are also imaged dark on bright (brightfield, the luminance of H&E stains; a part
    # of BBBC038, the paper's NUCLEUS data): the model learns both contrasts.
    config.data.augment = 'all,invert'
  # Percentile scaling is what the bioimage.io format expresses, so the shipped models export
  # without loss; it matched CLAHE in the ablation once uneven illumination and gamma are in
  # the training data (docs/models.md).
  config.data.normalization = 'percentile'
  config.data.synthetic_masks = masks or RECIPE_MASKS[kind]
  if kind == 'nucleus':
    config.data.object_diameter = NUCLEUS_DIAMETER
    # Counting nuclei needs touching ones apart: the distance head of configs/
    # nucleus_instances.py (its weight), trained on the simulator's label images.
    config.model.instance_head = 'distance'
    config.train.instance_weight = 8.0
  config.train.num_steps = steps
  config.train.init_from = init_from
  config.optim.lr = lr or config.optim.lr
  config.optim.warmup_steps = 50
  config.eval.every_steps = max(50, steps // 10)
  return config


def test_pairs(kind: str, params: str, num: int = 20, masks: str = ''):
  """(image, mask) paths of `num` simulated test images of an unseen seed, masks drawn as
  `masks` says ('': as the shipped kind's recipe draws them, RECIPE_MASKS)."""
  config = default.get_config()
  config.data.kind, config.data.synthetic_params = kind, params
  config.data.synthetic_masks = masks or RECIPE_MASKS[kind]
  config.data.num_synthetic_train, config.data.num_synthetic_test = 0, num
  config.data.seed = TEST_SEED
  _, test_list = loader.list_paths(config)
  return lists.load_pairs(test_list)


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


def outputs(folder: pathlib.Path, pairs, tta: bool = False, diameter: float | None = None):
  """(config, threshold, seed dynamic, iterator of each pair's outputs (H, W, C)) of the
  packed/run model in `folder` at its calibrated threshold, through the predict path
  (`preprocess.repair`, whole-image normalisation, blended tiles; with `tta` averaged over the
  8 flips/rotations, as --tta does; with `diameter` each image resized for the network and
  the outputs back as --diameter resizes, 0 measuring it); no-data pixels output 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from flmiseg.evaluation import calibration  # pylint: disable=g-import-not-at-top
  from flmiseg.objects import instances
  from flmiseg.cli import predict
  config = rundir.read_config(folder)
  mesh = sharding.make_mesh(jax.local_devices())
  state, step = tiling.load(config, folder, mesh)
  threshold = calibration.calibrated_threshold(folder, step) or config.eval.threshold
  dynamic = calibration.calibrated_dynamic(folder, step) or instances.SEED_DYNAMIC
  predictor = predict.Predictor(tiling.prob_fn(state, mesh, tta), config,
                                config.data.crop_size, 0.25,
                                tiling.round_up_batch(8, len(jax.local_devices())))

  options = predict.instance_options(config, folder, step, predict.Options(
      input='', output='', diameter=diameter))

  def each():
    for pair in pairs:
      planes, missing, _ = preprocess.repair(io.read_image(pair.image)[None], pair.image)
      factor, _, first = predict.planes_factor(predictor, planes, threshold, options, None,
                                               missing)
      out = first[0][0] if first else predictor.plane(planes[0], factor)[0]
      if missing is not None:
        out[missing[0]] = 0.0
      yield out

  return config, threshold, dynamic, each()


def predictions(folder: pathlib.Path, pairs, tta: bool = False):
  """Each pair's mask (bool (H, W)) as predict draws it with the model in `folder`."""
  _, threshold, _, each = outputs(folder, pairs, tta)
  return (out[..., 0] > threshold for out in each)


def image_scores(config, threshold: float, dynamic: float, pair, out: np.ndarray) -> dict:
  """One pair's scores from its outputs (an item of `outputs`): 'pred' and 'truth' (bool
  masks), 'iou', and for a model with an instance head and a label-image mask the
  `matching.match` results at IoU 0.5 of its instances ('found') and of the connected
  components of its mask ('merged')."""
  from flmiseg.objects import instances  # pylint: disable=g-import-not-at-top
  from flmiseg.objects import matching
  from flmiseg.evaluation import metrics
  truth = io.read_mask_values(pair.mask)  # a label image for instance kinds
  pred = out[..., 0] > threshold
  result = {'pred': pred, 'truth': truth > 0, 'iou': metrics.mask_iou(pred, truth)}
  if config.model.get('instance_head') and len(np.unique(truth)) > 2:
    min_size = config.eval.get('min_size', 16)
    result['found'] = matching.match(truth, instances.from_outputs(
        out, threshold, dynamic, min_size), (0.5,))
    result['merged'] = matching.match(truth, instances.connected_components(pred, min_size),
                                      (0.5,))
  return result


def pooled(per_image) -> dict:
  """{'iou': the mean per-image IoU, and where instances were matched 'ap_0.5' and
  'ap_0.5_connected_components', pooled over the images} of `image_scores` results."""
  from flmiseg.objects import matching  # pylint: disable=g-import-not-at-top
  ious, found, merged = [], [], []
  for one in per_image:
    ious.append(one['iou'])
    if 'found' in one:
      found.append(one['found'])
      merged.append(one['merged'])
  result = {'iou': float(np.mean(ious))}
  if found:
    result['ap_0.5'] = matching.combine(found)[0]['ap']
    result['ap_0.5_connected_components'] = matching.combine(merged)[0]['ap']
  return result


def scores(folder: pathlib.Path, pairs, tta: bool = False) -> dict:
  """Mean per-image IoU of the packed/run model in `folder` at its calibrated threshold,
  through the predict path (`outputs`); for a model with an instance head and label-image
  masks also the pooled instance AP@0.5 of its instances and of the connected components of
  its mask (flmiseg/objects/matching.py)."""
  config, threshold, dynamic, each = outputs(folder, pairs, tta)
  return pooled(image_scores(config, threshold, dynamic, pair, out)
                for pair, out in zip(pairs, each))


def test_scores(folder: pathlib.Path, kind: str, tta: bool = False) -> dict:
  """`scores` on the kind's default-knob and 'shifted' test sets, masks drawn as the model in
  `folder` learned them (config.data.synthetic_masks): keys '<score>_<knobs>'."""
  masks = loader.synthetic_masks(rundir.read_config(folder).data)
  return {f'{name}_{knobs}': value for knobs in ('default', 'shifted')
          for name, value in scores(folder, test_pairs(kind, knobs, masks=masks), tta).items()}


def mean_iou(folder: pathlib.Path, pairs) -> float:
  """`scores(folder, pairs)['iou']`."""
  return scores(folder, pairs)['iou']


def cold_predict_seconds(kind: str, model: str = '', tta: bool = False) -> float:
  """Wall time of `flmiseg --mode=predict --model=MODEL [--tta]` (default: the shipped KIND)
  on one 1024x1024 uint16 image of that kind."""
  model = model or kind
  pair = test_pairs(kind, 'default', 20)[0]
  tile = np.tile(io.read_image(pair.image).astype(np.uint16), (4, 4))[:1024, :1024]
  with tempfile.TemporaryDirectory() as tmp:
    tifffile.imwrite(f'{tmp}/big.tif', tile)
    start = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'flmiseg.main', '--mode=predict', f'--model={model}',
                    f'--input={tmp}/big.tif', f'--output={tmp}/out'] + ['--tta'] * tta,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def machine() -> str:
  """'<cores>-core <CPU model>' from /proc/cpuinfo (or the platform's processor name)."""
  import os, platform  # pylint: disable=g-import-not-at-top,multiple-imports
  name = platform.processor() or 'CPU'
  try:
    with open('/proc/cpuinfo') as f:
      name = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), name)
  except OSError:
    pass
  return f'{os.cpu_count()}-core {name}'


def train_and_pack(kind: str, workdir: pathlib.Path, steps: int, init_from: str = '',
                   lr: float = 0.0, masks: str = '') -> dict:
  start = time.perf_counter()
  result = trainer.train_and_evaluate(pretrained_config(kind, steps, init_from, lr, masks),
                                    workdir)
  return pack_shipped(kind, workdir, steps, time.perf_counter() - start, result.get('iou'),
                      init_from, lr, masks)


def pack_shipped(kind: str, workdir: pathlib.Path, steps: int, seconds: float,
                 test_iou_wide: float | None, init_from: str = '', lr: float = 0.0,
                 masks: str = '') -> dict:
  """Packs the finished run `workdir` (the recipe of `pretrained_config(kind, steps,
  init_from, lr, masks)`) as the shipped model `kind`, replacing the folder in the package in
  one rename."""
  out = pretrained.PRETRAINED_DIR / kind
  staged = out.with_name(f'.{kind}.new')
  shutil.rmtree(staged, ignore_errors=True)
  command = (f'python -m experiments.train_pretrained --workdir={workdir.parent} '
             f'--kinds={kind} --steps={steps}' + (f' --init_from={init_from}' if init_from
                                                  else '') + (f' --lr={lr:g}' if lr else '')
             + (f' --masks={masks}' if masks else ''))
  info = pretrained.pack(workdir, staged, 'float16', provenance={
      'command': command, 'train_seconds': round(seconds), 'steps': steps,
      'machine': machine(), 'date': time.strftime('%Y-%m-%d'),
      'test_iou_wide': test_iou_wide})
  # Swap the finished folder in, so a reader never sees a half-written shipped model.
  old = out.with_name(f'.{kind}.old')
  shutil.rmtree(old, ignore_errors=True)
  if out.exists():
    out.rename(old)
  staged.rename(out)
  shutil.rmtree(old, ignore_errors=True)
  return info


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  rows = []
  for kind in FLAGS.kinds:
    if not FLAGS.measure:
      info = train_and_pack(kind, pathlib.Path(FLAGS.workdir) / kind, FLAGS.steps,
                            FLAGS.init_from, FLAGS.lr, FLAGS.masks)
      print(f'{kind}: packed, {json.dumps(info)}')
    folder = pretrained.PRETRAINED_DIR / kind
    row = {'kind': kind, 'tta': FLAGS.tta, **test_scores(folder, kind, FLAGS.tta)}
    if 'invert' in pretrained_config(kind, 1).data.augment:
      with tempfile.TemporaryDirectory() as tmp:
        pairs = inverted_pairs(test_pairs(kind, 'default'), pathlib.Path(tmp))
        row.update({f'{k}_inverted': v for k, v in scores(folder, pairs, FLAGS.tta).items()})
    row['cold_predict_1024_s'] = cold_predict_seconds(kind, tta=FLAGS.tta)
    rows.append(row)
    print(json.dumps(row))
  lines = ['| model | IoU, default knobs | IoU, shifted knobs | cold predict 1024x1024 (s) |',
           '|---|---|---|---|']
  lines += [f'| {r["kind"]} | {r["iou_default"]:.3f} | {r["iou_shifted"]:.3f} | '
            f'{r["cold_predict_1024_s"]:.1f} |' for r in rows]
  print('\n'.join(lines))


if __name__ == '__main__':
  flags.DEFINE_string('workdir', 'runs/pretrained', 'Where each kind trains.')
  flags.DEFINE_list('kinds', list(KINDS), 'Which models.')
  flags.DEFINE_integer('steps', 1500, 'Training steps per model.')
  flags.DEFINE_bool('measure', False, 'Only measure the shipped models.')
  flags.DEFINE_string('init_from', '', 'A further training cycle from this run folder or '
                      'shipped model (one kind at a time).')
  flags.DEFINE_float('lr', 0.0, 'Peak learning rate (0: the recipe\'s, 2e-3).')
  flags.DEFINE_enum('masks', '', ['', 'geometry', 'visible'], 'How the training masks are '
                    "drawn ('': the kind's recipe; simulate.MASKS).")
  flags.DEFINE_bool('tta', False, 'Measure with --tta (the 8 flips/rotations averaged).')
  app.run(main)
