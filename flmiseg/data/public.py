"""Real annotated datasets, built from a local clone of their public repositories.

  python -m flmiseg.data.public dsb --src=kaggle-dsbowl-2018-dataset-fixes --out=data/dsb
  python -m flmiseg.data.public ernet --src=ERNet --out=data/ernet

dsb: the 2018 Data Science Bowl stage-1 training set (BBBC038; CC0; Caicedo et al., Nature
Methods 16, 1247-1253, 2019) in its community-fixed copy, github.com/lopuhin/kaggle-dsbowl-
2018-dataset-fixes (SRC/stage1_train/<id>/images/<id>.png + masks/*.png, one mask per
nucleus). Each image's modality is read from its pixels (`describe`): 'fluorescence' (grey,
dark background: the core, always kept), 'brightfield' (grey, bright background) and
'histology' (colour: H&E), kept with --brightfield and --histology. The images are split by
image into train / val / test, stratified by acquisition type: modality and image size
(`split`): within each stratum, the images in the order of a salted hash of their id, the
first round(val_fraction x n) to val, the next round(test_fraction x n) to test, the rest
to train; strata under MIN_STRATUM images are pooled per modality ('<modality> other
sizes'). The split depends on the ids and the salt (--seed) only: fixed whatever the order
of the files, the machine or a library's version. val is for model selection (checkpoints,
thresholds); test is held out for the figures to report, since validation figures are
tuned on. Writes OUT/{train,val,test}/images/<id>.png (the files as they are: grey stored as
RGBA) and OUT/{train,val,test}/masks/<id>.tif (uint16 label images: objectmasks.py's rule,
a contested pixel to the smallest nucleus), OUT/manifest.csv (one row per image: split,
stratum, size, objects) and OUT/summary.json (counts per split and stratum):

  --config.data.source=lists --config.data.train_list=OUT/train
  --config.data.val_list=OUT/val --config.data.test_list=OUT/test

ernet: the labelled images of ERNet (github.com/charlesnchr/ERNet; Lu et al., Science
Advances 6, eabc7209, 2020): 5 widefield ER images in 3 stacks (SRC/trainingdata/
labelled_data/stack1..3). The repository states no licence: evaluate on them and fine-tune
for yourself, do not ship weights trained on them. The pairs and the mask rule are ERNet's
own (buildTrainingData.py): the annotation is the mask PNG's alpha channel above 10. Writes
OUT/images/<stack>_<frame>.<ext> (the files as they are), OUT/masks/<stack>_<frame>.png
(0/255), OUT/all.txt (every pair: evaluation) and, for leave-one-stack-out fine-tuning,
OUT/leave_out_<stack>/{train,test}.txt (train on the other stacks, test on it), and
OUT/summary.json. Only one cell per image is annotated: ER in the other cells counts as
background. So the build also writes OUT/regions/<stack>_<frame>.png, the mask with the
pixels outside the annotated region (`annotated_region`: the annotation's convex hull grown
by REGION_MARGIN px) set to UNLABELLED (128), and OUT/leave_out_<stack>/train_region.txt
listing them: fine-tuning with --config.data.ignore_value=128 learns from the annotated cell
only, not from the unannotated ones as background.

Both refuse a non-empty --out unless --overwrite, and build in a folder beside it that
replaces it at the end (an interrupted build leaves nothing half-written).
"""

import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys

import cv2
import numpy as np
from scipy import ndimage
from skimage import morphology

from flmiseg.core.errors import UserError
from flmiseg.data import io
from flmiseg.data import objectmasks

MODALITIES = ('fluorescence', 'brightfield', 'histology')
SPLITS = ('train', 'val', 'test')
MIN_STRATUM = 5  # strata with fewer images are pooled per modality
# Colour: the mean spread of a pixel's R, G, B above this fraction of the luminance's
# 0.1-99.9th percentile range. Grey stored as RGB(A) has 0; the DSB's H&E images 0.084-0.74.
COLOUR_SPREAD = 0.03
# Bright background: the median (the background, in images of cells) above this fraction of
# the 0.1-99.9th percentile range. DSB fluorescence images: at most 0.19 (a field with one
# nucleus has its 1st-99th percentiles in the noise, hence the wider range); brightfield:
# 0.865 and above.
BRIGHT_BACKGROUND = 0.5
# ERNet's labelled pairs (image, annotation), as its buildTrainingData.py lists them.
ERNET_PAIRS = (
    ('stack1', 'raw_0000.jpg', '0_segmented.png'),
    ('stack1', '126_input_0.png', '126_segmented.png'),
    ('stack2', 'raw_0000.jpg', '0_segmented.png'),
    ('stack2', 'raw_0126.jpg', '126_segmented.png'),
    ('stack3', 'raw_0000.jpg', 'segmented_0.png'),
)
ERNET_ALPHA_THRESHOLD = 10  # ERNet's: foreground where the alpha channel exceeds it
REGION_MARGIN = 10  # px the annotated region reaches beyond the annotation's convex hull
UNLABELLED = 128  # the region masks' value outside it (--config.data.ignore_value=128)


def describe(path: pathlib.Path) -> tuple[str, tuple[int, int]]:
  """(modality, (H, W)) of an image file. The modality from its pixels: 'histology' (colour),
  'brightfield' (grey, bright background) or 'fluorescence' (grey, dark background); the
  thresholds: COLOUR_SPREAD, BRIGHT_BACKGROUND."""
  image = io.read_image_file(path, rgb_as_channels=True)
  shape = (image.data.shape[image.axes.index('Y')], image.data.shape[image.axes.index('X')])
  data = image.data.astype(np.float64)
  if image.channel_names == ('red', 'green', 'blue'):
    rgb = np.moveaxis(data, image.axes.index('C'), -1)
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    spread = float(np.mean(rgb.max(-1) - rgb.min(-1)))
  else:
    grey, spread = io.read_image(path).astype(np.float64), 0.0
  lo, median, hi = np.percentile(grey, (0.1, 50.0, 99.9))
  span = max(hi - lo, 1e-9)
  if spread > COLOUR_SPREAD * span:
    return 'histology', shape
  return ('brightfield' if (median - lo) / span > BRIGHT_BACKGROUND else 'fluorescence'), shape


def _share(n: int, fraction: float) -> int:
  return int(np.floor(n * fraction + 0.5))  # round half up (Python's round goes to even)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
  if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
    raise UserError(f'--val_fraction={val_fraction} --test_fraction={test_fraction}: each '
                    'must be >= 0 and together < 1')


def split(strata: dict[str, str], val_fraction: float, test_fraction: float,
          seed: int = 0) -> dict[str, str]:
  """{id: 'train' | 'val' | 'test'} for images {id: stratum} (module docstring): per
  stratum, ids ordered by sha256('<seed>:<id>'), round(n x val_fraction) to val, then
  round(n x test_fraction) to test, the rest to train."""
  _check_fractions(val_fraction, test_fraction)
  by_stratum = {}
  for name, stratum in strata.items():
    by_stratum.setdefault(stratum, []).append(name)
  out = {}
  for names in by_stratum.values():
    names.sort(key=lambda n: hashlib.sha256(f'{seed}:{n}'.encode()).hexdigest())
    val, test = _share(len(names), val_fraction), _share(len(names), test_fraction)
    for i, name in enumerate(names):
      out[name] = 'val' if i < val else 'test' if i < val + test else 'train'
  return out


def strata(images: dict[str, tuple[str, tuple[int, int]]]) -> dict[str, str]:
  """{id: stratum} from {id: (modality, (H, W))}: '<modality> <H>x<W>', or '<modality> other
  sizes' for sizes with fewer than MIN_STRATUM images of that modality."""
  named = {k: f'{m} {h}x{w}' for k, (m, (h, w)) in images.items()}
  counts = {}
  for stratum in named.values():
    counts[stratum] = counts.get(stratum, 0) + 1
  return {k: s if counts[s] >= MIN_STRATUM else f'{images[k][0]} other sizes'
          for k, s in named.items()}


@contextlib.contextmanager
def _building(out: pathlib.Path, overwrite: bool):
  """Yields a fresh folder beside `out` to build in, which replaces `out` when the block
  ends without an exception and is removed when it raises; UserError for a non-empty `out`
  without `overwrite`."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise UserError(f'{out} is not empty; choose another folder or pass --overwrite')
  tmp = out.with_name(f'.{out.name}.partial-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if out.exists():
    shutil.rmtree(out) if out.is_dir() else out.unlink()
  os.replace(tmp, out)


def _map(function, items) -> list:
  # Thousands of small PNGs: OpenCV and zlib release the GIL, so threads help.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(function, items))


def _dsb_samples(src: pathlib.Path) -> list[objectmasks.Sample]:
  root = src / 'stage1_train' if (src / 'stage1_train').is_dir() else src
  if not root.is_dir():
    raise UserError(f'--src={src}: not a folder (a clone of kaggle-dsbowl-2018-dataset-fixes)')
  return objectmasks.read_samples(root)


def build_dsb(src, out, *, keep=('fluorescence',), val_fraction: float = 0.1,
              test_fraction: float = 0.1, seed: int = 0, overwrite: bool = False) -> dict:
  """Builds the DSB dataset (module docstring) into `out`; returns the summary it writes:
  {'images': {modality: count}, 'kept': [...], 'splits': {split: {stratum: count}},
  'objects': {split: count}}."""
  src, out = pathlib.Path(src), pathlib.Path(out)
  unknown = set(keep) - set(MODALITIES)
  if unknown:
    raise UserError(f'modalities {sorted(unknown)} unknown; valid: {", ".join(MODALITIES)}')
  _check_fractions(val_fraction, test_fraction)  # before any work
  samples = _dsb_samples(src)
  kinds = _map(lambda s: describe(s.image), samples)
  found = {m: sum(k[0] == m for k in kinds) for m in MODALITIES}
  chosen = {s.folder.name: (s, k) for s, k in zip(samples, kinds) if k[0] in keep}
  if not chosen:
    raise UserError(f'{src}: none of its {len(samples)} images is {" or ".join(keep)}')
  stratum = strata({name: k for name, (_, k) in chosen.items()})
  assigned = split(stratum, val_fraction, test_fraction, seed)
  with _building(out, overwrite) as tmp:
    rows = _write_dsb(tmp, chosen, stratum, assigned)
    summary = {'source': str(src), 'images': found, 'kept': list(keep), 'seed': seed,
               'val_fraction': val_fraction, 'test_fraction': test_fraction,
               'splits': {p: {} for p in SPLITS}, 'objects': {p: 0 for p in SPLITS}}
    for row in rows:
      counts = summary['splits'][row['split']]
      counts[row['stratum']] = counts.get(row['stratum'], 0) + 1
      summary['objects'][row['split']] += row['objects']
    (tmp / 'summary.json').write_text(json.dumps(summary, indent=1, sort_keys=True) + '\n')
  return summary


def _write_dsb(tmp: pathlib.Path, chosen: dict, stratum: dict, assigned: dict) -> list[dict]:
  """Writes the chosen samples {id: (Sample, (modality, shape))} into tmp/<split>/ and
  tmp/manifest.csv; returns the manifest's rows."""
  for part in SPLITS:
    (tmp / part / 'images').mkdir(parents=True)
    (tmp / part / 'masks').mkdir()

  def write(name):
    sample, (kind, (h, w)) = chosen[name]
    folder = tmp / assigned[name]
    shutil.copyfile(sample.image, folder / 'images' / f'{name}{sample.image.suffix}')
    labels = objectmasks.label_image(sample)
    io.write_tiff(folder / 'masks' / f'{name}.tif', labels)
    return dict(id=name, split=assigned[name], modality=kind, stratum=stratum[name],
                height=h, width=w, objects=int(labels.max()), masks=len(sample.masks))
  rows = _map(write, sorted(chosen))
  with open(tmp / 'manifest.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return rows


def _ernet_mask(path: pathlib.Path) -> np.ndarray:
  """uint8 (H, W) 0/255: ERNet's annotation, the alpha channel above ERNET_ALPHA_THRESHOLD."""
  pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if pixels is None:
    raise UserError(f'{path}: not a readable image')
  if pixels.ndim != 3 or pixels.shape[2] != 4:
    raise UserError(f'{path}: expected an RGBA PNG (ERNet\'s annotation is its alpha channel)')
  return np.where(pixels[..., 3] > ERNET_ALPHA_THRESHOLD, 255, 0).astype(np.uint8)


def annotated_region(truth: np.ndarray, margin: int = REGION_MARGIN) -> np.ndarray:
  """bool (H, W): the convex hull of the annotated pixels, grown by `margin` px (a disc)."""
  hull = morphology.convex_hull_image(truth > 0)
  # Within `margin` of the hull, as a dilation by disk(margin) grows it: one distance
  # transform instead of a dilation by a (2 margin + 1)^2 disc.
  return ndimage.distance_transform_edt(~hull) <= margin if margin else hull


def build_ernet(src, out, *, overwrite: bool = False) -> dict:
  """Builds the ERNet pairs (module docstring) into `out`; returns the summary it writes:
  {'pairs': [{name, stack, image, mask, height, width, foreground}], 'stacks': [...]}."""
  src, out = pathlib.Path(src), pathlib.Path(out)
  root = src / 'trainingdata' / 'labelled_data'
  for stack, image, mask in ERNET_PAIRS:
    for path in (root / stack / image, root / stack / mask):
      if not path.is_file():
        raise UserError(f'{path}: not found (--src should be a clone of charlesnchr/ERNet)')
  with _building(out, overwrite) as tmp:
    for folder in ('images', 'masks', 'regions'):
      (tmp / folder).mkdir()
    pairs = [_write_ernet_pair(tmp, root / stack, image, mask)
             for stack, image, mask in ERNET_PAIRS]
    line = lambda p, up='': f'{up}{p["image"]} {up}{p["mask"]}\n'  # noqa: E731
    (tmp / 'all.txt').write_text(''.join(line(p) for p in pairs))
    stacks = sorted({p['stack'] for p in pairs})
    for stack in stacks:
      fold = tmp / f'leave_out_{stack}'
      fold.mkdir()
      (fold / 'train.txt').write_text(''.join(line(p, '../') for p in pairs
                                              if p['stack'] != stack))
      (fold / 'test.txt').write_text(''.join(line(p, '../') for p in pairs
                                             if p['stack'] == stack))
      (fold / 'train_region.txt').write_text(''.join(
          line({**p, 'mask': p['region']}, '../') for p in pairs if p['stack'] != stack))
    summary = {'source': str(src), 'pairs': pairs, 'stacks': stacks}
    (tmp / 'summary.json').write_text(json.dumps(summary, indent=1, sort_keys=True) + '\n')
  return summary


def _write_ernet_pair(tmp: pathlib.Path, folder: pathlib.Path, image_name: str,
                      mask_name: str) -> dict:
  """Copies an ERNet image into tmp/images/<stack>_<frame>.<ext> and writes its mask into
  tmp/masks/<stack>_<frame>.png and its region mask (UNLABELLED outside
  `annotated_region`) into tmp/regions/; returns its summary entry."""
  frame = re.search(r'\d+', image_name).group().zfill(4)  # raw_0126.jpg, 126_input_0.png
  name = f'{folder.name}_{frame}'
  shape = objectmasks.image_shape(folder / image_name)
  mask = _ernet_mask(folder / mask_name)
  if mask.shape != shape:
    raise UserError(f'{folder / mask_name}: mask shape {mask.shape} differs from the '
                    f'image\'s {shape} ({image_name})')
  image = f'images/{name}{pathlib.Path(image_name).suffix.lower()}'
  shutil.copyfile(folder / image_name, tmp / image)
  cv2.imwrite(str(tmp / 'masks' / f'{name}.png'), mask)
  region = np.where(annotated_region(mask), mask, UNLABELLED).astype(np.uint8)
  cv2.imwrite(str(tmp / 'regions' / f'{name}.png'), region)
  return dict(name=name, stack=folder.name, image=image, mask=f'masks/{name}.png',
              region=f'regions/{name}.png',
              height=shape[0], width=shape[1], foreground=round(float(np.mean(mask > 0)), 4))


def _report_dsb(summary: dict, out) -> str:
  found, kept = summary['images'], summary['kept']
  left = [f'{m} {found[m]}' for m in MODALITIES if m not in kept]
  lines = [f'dsb: {sum(found.values())} images: ' + ', '.join(
      f'{found[m]} {m}' for m in MODALITIES) + f'; kept {", ".join(kept)}' +
           (f' (left out: {", ".join(left)})' if left else '') + f'; written to {out}']
  names = sorted({s for counts in summary['splits'].values() for s in counts})
  lines.append(f'{"stratum":<28}' + ''.join(f'{p:>7}' for p in SPLITS))
  for name in names + ['all']:
    counts = [summary['splits'][p].get(name, 0) if name != 'all' else
              sum(summary['splits'][p].values()) for p in SPLITS]
    lines.append(f'{name:<28}' + ''.join(f'{c:>7}' for c in counts))
  lines.append(f'{"objects":<28}' + ''.join(f'{summary["objects"][p]:>7}' for p in SPLITS))
  return '\n'.join(lines)


def _report_ernet(summary: dict, out) -> str:
  lines = [f'ernet: {len(summary["pairs"])} image/mask pairs in {len(summary["stacks"])} '
           f'stacks written to {out}']
  lines += [f'  {p["name"]}: {p["height"]}x{p["width"]}, foreground {p["foreground"]:.1%}'
            for p in summary['pairs']]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m flmiseg.data.public',
                                   description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='dataset', required=True)
  dsb = commands.add_parser('dsb', help='2018 Data Science Bowl stage 1 (fixed), nuclei')
  ernet = commands.add_parser('ernet', help='ERNet labelled ER images')
  for command in (dsb, ernet):
    command.add_argument('--src', required=True, help='a clone of the source repository')
    command.add_argument('--out', required=True, help='the folder to write')
    command.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  dsb.add_argument('--brightfield', action='store_true', help='keep brightfield images too')
  dsb.add_argument('--histology', action='store_true', help='keep H&E images too')
  dsb.add_argument('--val_fraction', type=float, default=0.1, help='per stratum')
  dsb.add_argument('--test_fraction', type=float, default=0.1, help='per stratum')
  dsb.add_argument('--seed', type=int, default=0, help='salt of the split\'s hash order')
  args = parser.parse_args(argv)
  try:
    if args.dataset == 'dsb':
      keep = ('fluorescence',) + ('brightfield',) * args.brightfield + (
          'histology',) * args.histology
      summary = build_dsb(args.src, args.out, keep=keep, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, seed=args.seed,
                          overwrite=args.overwrite)
      print(_report_dsb(summary, args.out))
    else:
      print(_report_ernet(build_ernet(args.src, args.out, overwrite=args.overwrite), args.out))
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
