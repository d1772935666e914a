"""A shipped model on real, annotated images: no training, and for one image also
fine-tuned on crops of its top half and trained from scratch on them, measured on its bottom
half.

  python -m experiments.shipped.real_image --image=img2d.tif --labels=mask2d.tif --kind=nucleus \
      --workdir=runs/real_nuclei [--seeds=2] [--recipes=finetuned,scratch] [--model=DIR]
  python -m experiments.shipped.real_image --image=a.png,b.png --labels=a_mask.png,b_mask.png \
      --kind=er --seeds=0 [--model=DIR]     # several images, the model without training
  python -m experiments.shipped.real_image --image=img2d.tif --labels=mask2d.tif --kind=nucleus \
      --seeds=0 --scales=0.33,0.5,1,2,3 [--diameter=25]   # the images resized: other
                                            # pixel sizes [, predicted with --diameter]

Without training, each image: IoU; IoU away from saturation (pixels at the image's largest
value, with 10 px around them, left out: annotators often leave a saturated blob unlabelled);
instance AP@0.5 where the labels are a label image and the model has the instance head; and
the predicted over the annotated pixels. With --scales, the same for each image resized by
each factor (the image by area averaging or bilinearly, as predict resizes, the labels by
nearest neighbour): the specimen seen at another pixel size. With one image and --seeds > 0:
it is split in two at its middle row, 12 seeded 128x128 crops (image and mask) of the top
half are the annotated data (configs/finetune.py holds a quarter of them out for
validation), the bottom half is the test image no run sees; the table also gives AP@0.5 of
the connected components of the same mask.
The labels may be a binary mask or a label image (0 background, one value per object, as
StarDist and Cellpose write them). Every figure goes through the predict path
(`common.scores`).
"""

import pathlib

from absl import app
from absl import flags
import numpy as np
from scipy import ndimage
import tifffile

from experiments import common
from flmiseg.core import console
from flmiseg.evaluation import metrics
from flmiseg.inference import segment
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.data import io
from flmiseg.data import lists

CROP = common.CROP


def split(image: np.ndarray, labels: np.ndarray, root: pathlib.Path, num: int = 12,
          seed: int = 0):
  """Writes `num` seeded CROPxCROP crops of the top half of (image, labels) into root/crops
  with root/train.txt listing them, and the bottom half into root/test; returns (train list,
  test list, test pairs)."""
  middle = image.shape[0] // 2
  if middle < CROP or image.shape[1] < CROP:
    raise app.UsageError(f'--image: {image.shape[0]}x{image.shape[1]} pixels; the top half '
                         f'must hold {CROP}x{CROP} crops (at least {2 * CROP} rows, {CROP} '
                         'columns)')
  rng = np.random.default_rng(seed)
  (root / 'crops').mkdir(parents=True, exist_ok=True)
  (root / 'test').mkdir(parents=True, exist_ok=True)
  lines = []
  for i in range(num):
    y, x = rng.integers(0, middle - CROP + 1), rng.integers(0, image.shape[1] - CROP + 1)
    tifffile.imwrite(root / 'crops' / f'{i:02d}.tif', image[y:y + CROP, x:x + CROP])
    tifffile.imwrite(root / 'crops' / f'{i:02d}_mask.tif', labels[y:y + CROP, x:x + CROP])
    lines.append(f'crops/{i:02d}.tif crops/{i:02d}_mask.tif')
  (root / 'train.txt').write_text('\n'.join(lines) + '\n')
  tifffile.imwrite(root / 'test' / 'bottom.tif', image[middle:])
  tifffile.imwrite(root / 'test' / 'bottom_mask.tif', labels[middle:])
  (root / 'test.txt').write_text('test/bottom.tif test/bottom_mask.tif\n')
  return root / 'train.txt', root / 'test.txt', lists.load_pairs(root / 'test.txt')


FLAGS = flags.FLAGS
SATURATION_MARGIN = 10  # pixels around saturated ones left out of 'IoU away from saturation'


def unsaturated(image: np.ndarray) -> np.ndarray:
  """bool (H, W): pixels more than SATURATION_MARGIN px from any pixel at the image's largest
  value, when that value is its integer type's maximum (a saturated camera); else all."""
  if not np.issubdtype(image.dtype, np.integer) or image.max() < np.iinfo(image.dtype).max:
    return np.ones(image.shape[:2], bool)
  return ~ndimage.binary_dilation(image == image.max(), iterations=SATURATION_MARGIN)


def rescaled(image: np.ndarray, labels: np.ndarray, factor: float
             ) -> tuple[np.ndarray, np.ndarray]:
  """(image, labels) resized by `factor`: the image as predict resizes (`segment.resize`),
  rounded back to its type, the labels by nearest neighbour (pixel centres), values kept."""
  h, w = (max(1, round(n * factor)) for n in labels.shape)
  resized = segment.resize(image, (h, w))
  if np.issubdtype(image.dtype, np.integer):
    info = np.iinfo(image.dtype)
    resized = np.clip(np.rint(resized), info.min, info.max)
  rows = np.minimum(((np.arange(h) + 0.5) / factor).astype(int), labels.shape[0] - 1)
  cols = np.minimum(((np.arange(w) + 0.5) / factor).astype(int), labels.shape[1] - 1)
  return resized.astype(image.dtype), labels[rows[:, None], cols[None, :]]


def zero_shot(model: pathlib.Path, pairs, images, diameter: float | None = None
              ) -> list[dict]:
  """Per pair (and its image, as read): the scores of `common.scores` on it alone,
  'iou_unsaturated' and 'area_ratio' (each image predicted once, with --diameter=`diameter`
  when given)."""
  config, threshold, dynamic, each = common.outputs(model, pairs, diameter=diameter)
  results = []
  for pair, image, out in zip(pairs, images, each):
    one = common.image_scores(config, threshold, dynamic, pair, out)
    pred, truth = one['pred'], one['truth']
    keep = unsaturated(image)
    results.append({**common.pooled([one]),
                    'iou_unsaturated': metrics.mask_iou(pred & keep, truth & keep),
                    'area_ratio': pred.sum() / max(truth.sum(), 1)})
  return results


def print_scales(model: pathlib.Path, name: str, whole, arrays, factors: list[float],
                 root: pathlib.Path, diameter: float | None = None) -> None:
  """The zero-shot table of the images resized by each factor (files in root/scaled), pooled
  over the images per factor; with `diameter` (the objects' at the images' own size, pixels)
  each predicted as --diameter=diameter x factor predicts it, with 0 as --diameter=0."""
  (root / 'scaled').mkdir(parents=True, exist_ok=True)
  segment.check_diameter(rundir.read_config(model), diameter, model)
  how = {None: '', 0.0: ' (--diameter=0)'}.get(diameter, f' (--diameter: {diameter:g} px x '
                                                         'the factor)')
  print(f'| {name}, no training: image resized by{how}'
        + ' | IoU | instance AP@0.5 | predicted / annotated pixels |\n|---|---|---|---|')
  for factor in factors:
    pairs, images = [], []
    for pair, (image, labels) in zip(whole, arrays):
      small, small_labels = rescaled(image, labels, factor)
      images.append(small)
      paths = [root / 'scaled' / f'{pathlib.Path(pair.image).stem}_x{factor:g}{suffix}.tif'
               for suffix in ('', '_mask')]
      tifffile.imwrite(paths[0], small)
      tifffile.imwrite(paths[1], small_labels)
      pairs.append(lists.Pair(*paths, origin='--scales'))
    shots = zero_shot(model, pairs, images, diameter and diameter * factor)
    mean = lambda k: np.mean([s[k] for s in shots])
    ap = f'{mean("ap_0.5"):.3f}' if 'ap_0.5' in shots[0] else '-'
    print(f'| x{factor:g} | {mean("iou"):.3f} | {ap} | {mean("area_ratio"):.2f} |')


def main(argv):
  del argv
  console.setup()
  if len(FLAGS.image) != len(FLAGS.labels):
    raise app.UsageError(f'--image names {len(FLAGS.image)} file(s), --labels '
                         f'{len(FLAGS.labels)}: one mask per image')
  if FLAGS.diameter is not None and (not FLAGS.scales or not FLAGS.diameter >= 0):
    raise app.UsageError(f'--diameter={FLAGS.diameter:g}: a positive size in pixels (0: '
                         'measured), and only with --scales')
  if FLAGS.scales and FLAGS.seeds:
    raise app.UsageError('--scales measures the model without training: give --seeds=0')
  try:
    factors = [float(f) for f in FLAGS.scales]
  except ValueError:
    factors = [0.0]
  if not all(f > 0 for f in factors):
    raise app.UsageError(f'--scales={",".join(FLAGS.scales)}: each factor must be a number > 0')
  if len(FLAGS.image) > 1 and FLAGS.seeds:
    raise app.UsageError('--seeds: fine-tuning splits one image; give one --image, or '
                         '--seeds=0 to measure the model without training')
  root = pathlib.Path(FLAGS.workdir).resolve()
  model = pathlib.Path(FLAGS.model) if FLAGS.model else pretrained.PRETRAINED_DIR / FLAGS.kind
  name = FLAGS.model or f'shipped {FLAGS.kind}'
  whole, arrays = [], []
  for image_path, labels_path in zip(FLAGS.image, FLAGS.labels):
    image, labels = io.read_image(image_path), io.read_mask_values(labels_path)
    if labels.shape != image.shape[:2]:
      raise app.UsageError(f'--labels: {labels_path} is {labels.shape}, its image '
                           f'{image.shape[:2]}')
    whole.append(lists.Pair(pathlib.Path(image_path).resolve(),
                            pathlib.Path(labels_path).resolve(), origin='--image'))
    arrays.append((image, labels))
  if FLAGS.scales:
    print_scales(model, name, whole, arrays, factors, root, FLAGS.diameter)
    return
  shots = zero_shot(model, whole, [image for image, _ in arrays])
  print(f'| {name}, no training | IoU | IoU away from saturation | instance AP@0.5 | '
        'predicted / annotated pixels |\n|---|---|---|---|---|')
  for pair, shot in list(zip(whole, shots)) + ([('mean', {
      k: np.mean([s[k] for s in shots]) for k in shots[0]})] if len(shots) > 1 else []):
    ap = f'{shot["ap_0.5"]:.3f}' if 'ap_0.5' in shot else '-'
    print(f'| {pair if isinstance(pair, str) else pathlib.Path(pair.image).name} | '
          f'{shot["iou"]:.3f} | {shot["iou_unsaturated"]:.3f} | {ap} | '
          f'{shot["area_ratio"]:.2f} |')
  if not FLAGS.seeds:
    return
  train_list, test_list, pairs = split(*arrays[0], root)
  rows = {f'{name}, no training': [{**common.scores(model, pairs), 'seconds': 0.0}]}
  recipes = {'finetuned': ('fine-tuned from it', str(model)),
             'scratch': ('from scratch', '')}
  for recipe in FLAGS.recipes:
    label, init = recipes[recipe]
    rows[label] = [common.run_cell(FLAGS.kind, root, train_list, test_list, init, False, s, pairs,
                                   FLAGS.lr) for s in range(FLAGS.seeds)]
  print(f'\n| {pathlib.Path(FLAGS.image[0]).name}, bottom half; 12 crops of {CROP}x{CROP} of '
        'the top half | IoU | instance AP@0.5 | AP@0.5, connected components | wall s per '
        'run |\n|---|---|---|---|---|')

  def cell(cells, key):
    values = [c[key] for c in cells if key in c]
    return f'{np.mean(values):.3f} ± {np.std(values):.3f}' if values else '-'

  for label, cells in rows.items():
    print(f'| {label} | {cell(cells, "iou")} | {cell(cells, "ap_0.5")} | '
          f'{cell(cells, "ap_0.5_connected_components")} | '
          f'{np.mean([c["seconds"] for c in cells]):.0f} |')


if __name__ == '__main__':
  flags.DEFINE_list('image', None, 'Real images (TIFF/PNG, one channel), comma-separated.',
                    required=True)
  flags.DEFINE_list('labels', None, 'Their annotations: masks or label images, in the same '
                    'order.', required=True)
  flags.DEFINE_enum('kind', 'nucleus', list(pretrained.SHIPPED), 'The shipped model.')
  flags.DEFINE_string('workdir', 'runs/real_image', 'Where the crops and runs go.')
  flags.DEFINE_string('model', '', 'A run or packed folder to measure and fine-tune instead '
                      'of the shipped model.')
  flags.DEFINE_integer('seeds', 2, 'Seeds per recipe (0: the model without training only).')
  flags.DEFINE_list('scales', [], 'Without training: measure each image resized by each of '
                    'these factors (e.g. 0.33,0.5,1,2,3).')
  flags.DEFINE_float('diameter', None, 'With --scales: the objects\' diameter in the images '
                     'as given, pixels; each resized image is predicted with --diameter at '
                     'its size (0: --diameter=0, measured on each).')
  flags.DEFINE_float('lr', 0.0, 'Learning rate (0: configs/finetune.py\'s).')
  flags.DEFINE_multi_enum('recipes', ['finetuned', 'scratch'], ['finetuned', 'scratch'],
                          'Rows to train.')
  app.run(main)
