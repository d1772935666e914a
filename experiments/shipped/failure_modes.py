"""The three failure modes an issue names for the shipped nucleus model on real images, one by
one: dim nuclei beside bright ones missed, large nuclei split, dense small nuclei merged.

  python -m experiments.shipped.failure_modes --data=data/dsb --split=val \
      --model=nucleus [--model=runs/nucleus_dsb] [--diameter=0 | --no_rescale] \
      [--simulated=20] [--dimmed=0.1] [--out=failure_modes.json]

Each model segments every image of the split as users do (`flmiseg.load(model).segment(image,
instances=True)`; --diameter as predict's, --no_rescale never resizes: the model's 'before'
and 'after' measuring each image's object size), and, with --simulated=N, N simulated
256x256 nucleus images ('wide' knobs, an unseen seed: `common.test_pairs`), and with
--dimmed=F the split again with half its nuclei (drawn with a fixed seed) keeping only F of
their signal above the background (`flmiseg.data.pipeline.dimmed`, the 'dim' augmentation's
arithmetic at a fixed factor): real dim nuclei beside bright ones, many more than the split's
own (the DSB validation split has 48). The annotated
nuclei (label images) fall into groups, per image:
  dim     relative brightness < DIM (0.25): the nucleus's mean raw intensity minus the image's
          background (the median of the pixels outside every nucleus), over the BRIGHT
          (90th) percentile of that difference among the image's nuclei;
  large   equivalent diameter sqrt(4 area / pi) >= LARGE (40) px;
  dense   equivalent diameter < SMALL (20) px and another nucleus within NEAR (2) px
          (a pixel of another label inside the nucleus dilated by a disc of radius 2).
Per nucleus, against the predicted instances (labels) and mask:
  matched   matched one-to-one at IoU >= 0.5 (as `matching.match` counts tp);
  found     its pixels inside the predicted mask (pooled over a group: 'pixels found');
  split     two or more predicted instances each cover >= SPLIT_SHARE (20 %) of its pixels;
  merged    one predicted instance covers >= MERGE_SHARE (50 %) of it and >= 50 % of another
            annotated nucleus (of any group) too.
A table per model and data: each group's nuclei, recall@0.5 (matched / nuclei), pixels found,
split rate and merge rate; the mode's own rate is the dim row's pixels found, the large row's
split rate and the dense row's merge rate. --out also writes the figures as JSON.
"""

import dataclasses
import json
import pathlib
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np
from scipy import ndimage
import tifffile

import flmiseg
from experiments import common
from experiments.shipped import real_data
from flmiseg.core import console
from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import pipeline
from flmiseg.objects import matching

FLAGS = flags.FLAGS
DIM = 0.25  # relative brightness below which a nucleus is dim
BRIGHT = 90  # the percentile of an image's nucleus brightness that counts as its bright ones
LARGE = 40.0  # equivalent diameter (px) from which a nucleus is large
SMALL = 20.0  # equivalent diameter (px) below which a nucleus is small
NEAR = 2  # px: a small nucleus with another this close is dense
SPLIT_SHARE = 0.2  # an instance covering this share of a nucleus is one of its pieces
MERGE_SHARE = 0.5  # an instance covering this share of two nuclei merges them
IOU = 0.5
DIMMED_SEED = 0  # which nuclei --dimmed dims
GROUPS = ('all', 'dim', 'large', 'dense')
NAMES = {'all': 'all nuclei', 'dim': f'dim (< {DIM:g} of bright)',
         'large': f'large (>= {LARGE:g} px)', 'dense': f'dense small (< {SMALL:g} px)'}


def diameters(truth: np.ndarray) -> np.ndarray:
  """(N,) the equivalent diameter sqrt(4 area / pi) in px of each object of the label image
  `truth` (H, W), in `matching.relabel` order."""
  truth = matching.relabel(truth)
  return np.sqrt(4 * np.bincount(truth.ravel())[1:] / np.pi)


def brightness(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """(N,) each object's mean intensity in `image` (H, W) minus the background (the median
  outside every object), over the BRIGHT percentile of that among the image's objects; NaN
  where that percentile is not above 0 (no contrast to compare with)."""
  truth = matching.relabel(truth)
  image = np.asarray(image, np.float64)
  count = truth.max()
  if not count:
    return np.zeros(0)
  background = np.median(image[truth == 0]) if (truth == 0).any() else 0.0
  means = ndimage.mean(image, truth, np.arange(1, count + 1)) - background
  top = np.percentile(means, BRIGHT)
  return means / top if top > 0 else np.full(count, np.nan)


def crowded(truth: np.ndarray, distance: int = NEAR) -> np.ndarray:
  """(N,) bool: another object lies within `distance` px (Euclidean) of each object of the
  label image `truth`, touching ones included."""
  truth = matching.relabel(truth)
  y, x = np.mgrid[-distance:distance + 1, -distance:distance + 1]
  disc = y ** 2 + x ** 2 <= distance ** 2
  # The largest and smallest label within the disc of each pixel: an object's pixel that
  # sees a label other than its own has a neighbour that close.
  top = ndimage.maximum_filter(truth, footprint=disc, mode='constant')
  lowest = ndimage.minimum_filter(np.where(truth > 0, truth, np.iinfo(np.int32).max),
                                  footprint=disc, mode='constant',
                                  cval=np.iinfo(np.int32).max)
  other = (truth > 0) & ((top != truth) | (lowest != truth))
  return np.bincount(truth[other], minlength=truth.max() + 1)[1:] > 0


def groups(image: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
  """{group: (N,) bool} of the objects of `truth` in each of GROUPS (module docstring)."""
  size = diameters(truth)
  return {'all': np.ones(size.size, bool), 'dim': brightness(image, truth) < DIM,
          'large': size >= LARGE, 'dense': (size < SMALL) & crowded(truth)}


def outcomes(truth: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> dict:
  """Per annotated object of `truth` (N,): 'matched', 'split', 'merged' (bool), 'area' and
  'found' (its pixels in `mask`, default labels > 0) against the predicted instances
  `labels`, all (H, W); see the module docstring."""
  truth, labels = matching.relabel(truth), matching.relabel(labels)
  n, m = int(truth.max()), int(labels.max())
  mask = labels > 0 if mask is None else np.asarray(mask) > 0
  # Pixels of each (object, instance) pair, background row and column 0 included.
  table = np.bincount(truth.ravel().astype(np.int64) * (m + 1) + labels.ravel(),
                      minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)
  area, inter = table[1:].sum(axis=1), table[1:, 1:]
  cover = inter / np.maximum(area, 1)[:, None]
  iou = inter / np.maximum(area[:, None] + table[:, 1:].sum(axis=0) - inter, 1)
  holds = cover >= MERGE_SHARE
  return {'matched': _matched(iou), 'split': (cover >= SPLIT_SHARE).sum(axis=1) >= 2,
          'merged': (holds & (holds.sum(axis=0) >= 2)).any(axis=1), 'area': area,
          'found': np.bincount(truth[mask], minlength=n + 1)[1:]}


def _matched(iou: np.ndarray) -> np.ndarray:
  """(N,) bool: the objects (rows of `iou`) matched one-to-one at IoU >= IOU. For IOU >= 0.5
  the candidates are disjoint pairs but for exact halves; `matching._assign`'s pick (first
  per object, then first per instance) keeps its tp."""
  rows, cols = np.nonzero(iou >= IOU)
  _, first = np.unique(rows, return_index=True)
  rows, cols = rows[first], cols[first]
  _, first = np.unique(cols, return_index=True)
  matched = np.zeros(iou.shape[0], bool)
  matched[rows[first]] = True
  return matched


def tally(per_image) -> dict:
  """{group: {'nuclei', 'recall', 'pixels_found', 'split_rate', 'merge_rate'}} pooled over
  the images, from (groups, outcomes) of each; rates of an empty group are NaN."""
  result = {}
  for name in GROUPS:
    picked = [(g[name], o) for g, o in per_image]
    total = lambda key: sum(int(o[key][g].sum()) for g, o in picked)  # noqa: E731
    count = sum(int(g.sum()) for g, _ in picked)
    rate = lambda k, d: total(k) / d if d else float('nan')  # noqa: E731
    result[name] = {'nuclei': count, 'recall': rate('matched', count),
                    'pixels_found': rate('found', total('area')),
                    'split_rate': rate('split', count), 'merge_rate': rate('merged', count)}
  return result


def evaluate(model, pairs, diameter: float | None, rescale: bool,
             dim_gain: float | None = None) -> tuple[dict, float]:
  """(`tally` of `model` (a flmiseg Model) on the (image, label image) `pairs`, seconds spent
  segmenting, as predict's --diameter, rescale and --dim_gain say); UserError when no mask is
  a label image."""
  truths = [io.read_mask_values(pair.mask) for pair in pairs]
  if not any(matching.is_label_image(truth) for truth in truths):
    raise UserError(f'{pairs[0].mask.parent}: binary masks; the failure modes need label '
                    'images (one value per nucleus)')
  per_image, seconds = [], 0.0
  for _, image, truth, found, spent in real_data.segmented(model, pairs, truths, diameter,
                                                           rescale, dim_gain):
    seconds += spent
    per_image.append((groups(image, truth), outcomes(truth, found.labels, found.mask)))
  return tally(per_image), seconds


def dimmed_pairs(pairs, factor: float, folder: pathlib.Path):
  """`pairs` with each image's nuclei (its label image), each with probability 1/2, keeping
  `factor` of their signal (`pipeline.dimmed`), written into `folder` as float32 TIFFs; masks
  unchanged."""
  rng = np.random.default_rng(DIMMED_SEED)
  out = []
  for pair in pairs:
    image = io.read_image(pair.image).astype(np.float32)
    truth = io.read_mask_values(pair.mask)
    count = int(truth.max())
    factors = np.where(rng.random(count + 1) < 0.5, factor, 1.0)
    if image.ndim == 3:  # channels last: each channel alike
      image = np.stack([pipeline.dimmed(c, truth, factors) for c in np.moveaxis(image, -1, 0)],
                       axis=-1)
    else:
      image = pipeline.dimmed(image, truth, factors)
    path = folder / f'{pathlib.Path(pair.image).stem}.tif'
    tifffile.imwrite(path, image)
    out.append(dataclasses.replace(pair, image=path))
  return out


def table(name: str, figures: dict) -> str:
  """The markdown table of one model's `tally` on one dataset."""
  lines = [f'| {name} | nuclei | recall@0.5 | pixels found | split rate | merge rate |',
           '|---|---|---|---|---|---|']
  for group, f in figures.items():
    lines.append(f'| {NAMES[group]} | {f["nuclei"]} | {f["recall"]:.3f} | '
                 f'{f["pixels_found"]:.3f} | {f["split_rate"]:.3f} | {f["merge_rate"]:.3f} |')
  return '\n'.join(lines)


def measure(data: pathlib.Path, split: str, model_names, diameter: float | None,
            rescale: bool, simulated: int, dimmed: float = 0.0,
            dim_gain: float | None = None) -> dict:
  """Every model's `tally` on the split and, with `simulated`, on that many simulated images,
  and with `dimmed`, on the split with half its nuclei dimmed to that factor (`dimmed_pairs`),
  with its timing, the machine and the command's settings, as --out writes them."""
  split_pairs = real_data.split_pairs(data, split)
  sets = {f'{data.name} {split}': split_pairs}
  if simulated:
    sets[f'simulated wide x{simulated}'] = common.test_pairs('nucleus', 'wide', simulated)
  result = {'data': str(data), 'split': split, 'diameter': diameter, 'rescale': rescale,
            'simulated': simulated, 'dimmed': dimmed, 'dim_gain': dim_gain,
            'machine': common.machine(), 'models': {}}
  with tempfile.TemporaryDirectory() as tmp:
    if dimmed:
      sets[f'{data.name} {split}, half the nuclei dimmed x{dimmed:g}'] = dimmed_pairs(
          split_pairs, dimmed, pathlib.Path(tmp))
    for name in model_names:
      model = flmiseg.load(name)
      one = result['models'][name] = {}
      for label, pairs in sets.items():
        figures, seconds = evaluate(model, pairs, diameter, rescale, dim_gain)
        one[label] = {'images': len(pairs), 'segment_s': seconds, 'figures': figures}
  return result


def main(argv):
  del argv
  console.setup()
  real_data.check_resizing_flags()
  if FLAGS.simulated < 0:
    sys.exit(f'error: --simulated={FLAGS.simulated}: a number of images >= 0')
  if not 0.0 <= FLAGS.dimmed < 1.0:
    sys.exit(f'error: --dimmed={FLAGS.dimmed}: a factor in (0, 1), or 0 for none')
  try:
    result = measure(pathlib.Path(FLAGS.data), FLAGS.split, FLAGS.model, FLAGS.diameter,
                     not FLAGS.no_rescale, FLAGS.simulated, FLAGS.dimmed, FLAGS.dim_gain)
  except UserError as e:
    sys.exit(f'error: {e}')
  how = real_data.resizing_label()
  for name, sets in result['models'].items():
    for label, one in sets.items():
      print(f'\n{label}, {name}{how}: {one["images"]} images, segment {one["segment_s"]:.1f} s '
            f'({result["machine"]})\n')
      print(table(name, one['figures']))
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  real_data.define_flags('A dataset folder that python -m flmiseg.data.public wrote, with '
                         'label-image masks (the DSB).',
                         'The shipped nucleus model or a run or packed folder; repeat to '
                         'measure several.')
  flags.DEFINE_integer('simulated', 0, 'Also measure on this many simulated 256x256 nucleus '
                       'images (\'wide\' knobs, an unseen seed).')
  flags.DEFINE_float('dimmed', 0.0, 'Also measure on the split with half its nuclei keeping '
                     'this factor of their signal (e.g. 0.1; 0: not).')
  app.run(main)
