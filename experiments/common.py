"""The code several experiments share; the only module of experiments/ that scripts import.

  * The shipped models' recipe (`pretrained_config`) and the simulated test sets they are
    measured on (`test_pairs`, an unseen seed).
  * Scoring a packed or run model through the predict path, as `--mode=predict` segments:
    `outputs`, `predictions`, `image_scores` (`mask_scores` for masks and labels already
    predicted), `pooled`, `scores`, `test_scores`, `mean_iou`.
  * Training one fine-tuning cell and measuring it the same way (`run_cell`), the wall time of
    a cold prediction (`cold_predict_seconds`) and the machine's name (`machine`).
  * The XLA flags of a CPU process with N fake devices (`cpu_xla_flags`).

It imports the package, never a script of experiments/; the package and the tests' shared
helpers (tests/helpers.py, tests/conftest.py) never import experiments/.
"""

import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import tifffile

from flmiseg.configs import default
from flmiseg.configs import finetune
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import loader
from flmiseg.data import preprocess
from flmiseg.evaluation import metrics
from flmiseg.inference import model as model_lib
from flmiseg.inference import segment
from flmiseg.objects import instances
from flmiseg.objects import matching
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import settings as stored
from flmiseg.train import trainer

KINDS = pretrained.SHIPPED
TEST_SEED = 1000  # the simulated test sets: a seed no shipped model was trained on
# How each recipe's simulated masks are drawn: er and mito as people annotate, a tubule
# narrower than the PSF as wide as it looks (out to the half maximum of its blur), not its
# sub-resolution geometry; for nuclei the two ways differ by under 0.5 % (docs/models.md).
RECIPE_MASKS = {'er': 'visible', 'mito': 'visible', 'nucleus': 'geometry'}
# The diameter of the simulator's nuclei at object scale 1 (the middle of the scales the
# nucleus model learned, 0.35-2.5, on a log scale), pixels, as segment.object_diameter
# measures one: the area-weighted median of the diameters of circles of the same areas.
# Recorded as its config.data.object_diameter, what predict's --diameter resizes to.
NUCLEUS_DIAMETER = 31.0
CROP = 128  # the side of the fine-tuning crops (shipped/finetune.py, shipped/real_image.py)


def pretrained_config(kind: str, steps: int, init_from: str = '', lr: float = 0.0,
                      masks: str = '', real: str = '', synthetic_fraction: float = 0.5,
                      width: int = 0, scale_range: tuple[float, float] | None = None,
                      augment: str = '', dim_range: tuple[float, float] | None = None):
  """The recipe of a shipped model; with `init_from` (a run folder or shipped model) a further
  training cycle that starts from its weights, at learning rate `lr` (0: the recipe's); with
  `masks` ('geometry' or 'visible') its masks drawn so instead of the recipe's way. With
  `real` (a folder that `python -m flmiseg.data.public` wrote: train/, val/, test/) the
  training draws real images too, simulated ones with probability `synthetic_fraction`, and
  validates and tests on the real val/ and test/ splits. `width`: the U-Net's (0: 16);
  `scale_range`: the 'scale' augmentation's zoom factors (None: the default's); `augment`:
  more augmentation groups (e.g. 'dim') on top of the recipe's; `dim_range`: the 'dim'
  group's factors (None: the default's)."""
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
    # Real images come at every magnification: predict measures each image's nuclei on a
    # first pass and resizes it to the learned diameter (docs/inference.md).
    config.eval.measure_diameter = True
  if real:
    folder = pathlib.Path(real).resolve()
    config.data.source = 'lists'
    config.data.train_list = str(folder / 'train')
    config.data.val_list = str(folder / 'val')
    config.data.test_list = str(folder / 'test')
    config.data.synthetic_fraction = synthetic_fraction
  config.model.width = width or config.model.width
  if augment:
    config.data.augment = f'{config.data.augment},{augment}'
  if scale_range:
    config.data.scale_range = tuple(scale_range)
  if dim_range:
    config.data.dim_range = tuple(dim_range)
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


def outputs(folder: pathlib.Path, pairs, tta: bool = False, diameter: float | None = None):
  """(config, threshold, seed dynamic, iterator of each pair's outputs (H, W, C)) of the
  packed/run model in `folder` at its calibrated threshold, through the predict path
  (`preprocess.repair`, whole-image normalisation, blended tiles; with `tta` averaged over the
  8 flips/rotations, as --tta does; with `diameter` each image resized for the network and
  the outputs back as --diameter resizes, 0 measuring it); no-data pixels output 0."""
  model = model_lib.load(folder)
  predictor = model.predictor(segment.Settings(tta=tta, batch_size=8))
  settings, _ = model.resolved(segment.Settings(diameter=diameter))

  def each():
    for pair in pairs:
      planes, missing, _ = preprocess.repair(io.read_image(pair.image)[None], pair.image)
      yield segment.segment_planes(predictor, planes, settings, None, missing).outputs[0]

  return model.config, model.threshold, model.seed_dynamic, each()


def predictions(folder: pathlib.Path, pairs, tta: bool = False):
  """Each pair's mask (bool (H, W)) as predict draws it with the model in `folder`."""
  _, threshold, _, each = outputs(folder, pairs, tta)
  return (out[..., 0] > threshold for out in each)


def image_scores(config, threshold: float, dynamic: float, pair, out: np.ndarray) -> dict:
  """One pair's scores from its outputs (an item of `outputs`): 'pred' and 'truth' (bool
  masks), 'iou', and for a model with an instance head and a label-image mask the
  `matching.match` results at IoU 0.5 of its instances ('found') and of the connected
  components of its mask ('merged')."""
  truth = io.read_mask_values(pair.mask)  # a label image for instance kinds
  pred = out[..., 0] > threshold
  min_size = stored.min_size(config)
  found = (instances.from_outputs(out, threshold, dynamic, min_size)
           if config.model.get('instance_head') and len(np.unique(truth)) > 2 else None)
  return mask_scores(truth, pred, found, min_size)


def mask_scores(truth: np.ndarray, pred: np.ndarray, found: np.ndarray | None = None,
                min_size: int = 0) -> dict:
  """One image's scores from its annotation `truth` (H, W) (a mask or a label image), its
  predicted mask `pred` (bool (H, W)) and, when `truth` is a label image, its predicted
  instance labels `found` (else None): 'pred' and 'truth' (bool masks), 'iou', and with
  `found` the `matching.match` results at IoU 0.5 of `found` ('found') and of the connected
  components of `pred` of at least `min_size` pixels ('merged'), which `pooled` pools."""
  result = {'pred': pred, 'truth': truth > 0, 'iou': metrics.mask_iou(pred, truth)}
  if found is not None:
    result['found'] = matching.match(truth, found, (0.5,))
    result['merged'] = matching.match(truth, instances.connected_components(pred, min_size),
                                      (0.5,))
  return result


def pooled(per_image) -> dict:
  """{'iou': the mean per-image IoU, and where instances were matched 'ap_0.5' and
  'ap_0.5_connected_components', pooled over the images} of `image_scores` results."""
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


def run_cell(kind, root, train_list, test_list, init_from: str, freeze: bool, seed: int,
             pairs, lr: float = 0.0) -> dict:
  """Trains one run (configs/finetune.py; `lr` 0: its learning rate); its test scores
  (`scores`: IoU, and instance AP@0.5 where the run has the head and the masks are label
  images) are measured as the shipped model's (predict path, the run's calibrated
  threshold), with the wall seconds of the training."""
  config = finetune.get_config()
  config.data.kind = kind
  config.data.train_list, config.data.test_list = str(train_list), str(test_list)
  config.train.init_from = init_from
  config.seed = seed
  config.optim.lr = lr or config.optim.lr
  config.train.freeze_batch_stats = freeze
  start = time.perf_counter()
  name = f'{"finetuned" if init_from else "scratch"}{"_frozen_bn" if freeze else ""}_seed{seed}'
  trainer.train_and_evaluate(config, root / name)
  seconds = time.perf_counter() - start
  return {**scores(root / name, pairs), 'seconds': seconds}


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
  name = platform.processor() or 'CPU'
  try:
    with open('/proc/cpuinfo') as f:
      name = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), name)
  except OSError:
    pass
  return f'{os.cpu_count()}-core {name}'


def cpu_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` devices: this process's XLA_FLAGS with its
  device count replaced."""
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join([f'--xla_force_host_platform_device_count={devices}', *kept])
