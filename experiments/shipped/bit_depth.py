"""Bit depth and exposure invariance of a trained run, measured through --mode=predict.

  python -m experiments.shipped.bit_depth --workdir=runs/nucleus [--workdir=runs/nucleus_ref] \
      [--out=docs/bit_depth.md]

Takes the simulated test images of each run's config (8-bit for nucleus, 16-bit for er/mito),
stores the same intensities as uint8 (where they fit), uint16, 12-bit-in-16 (x16), float in
[0, 1] and float camera counts, plus a copy at 0.3x the exposure (same dtype), predicts every
variant with the run (flmiseg.cli.predict, the code behind --mode=predict), and reports the mean
mask IoU of each variant against the masks of the file as simulated, and against the ground
truth.
"""

import pathlib
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tifffile

from flmiseg.core import console
from flmiseg.evaluation import metrics
from flmiseg.cli import predict
from flmiseg.store import rundir
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import loader


def variants(image: np.ndarray) -> dict[str, np.ndarray]:
  """The same intensities in the containers cameras and converters write, and 0.3x exposure."""
  x = image.astype(np.float64)
  full = 255.0 if image.dtype == np.uint8 else 65535.0
  out = {'as simulated': image}
  if image.max() <= 255:
    out['uint8'] = image.astype(np.uint8)
  out['uint16'] = image.astype(np.uint16)
  if image.max() <= 4095:
    out['12-bit in 16 (x16)'] = (image.astype(np.uint16) * 16)
  out['float in [0, 1]'] = (x / full).astype(np.float32)
  out['float counts (x12.5 + 100)'] = (x * 12.5 + 100).astype(np.float32)
  out['0.3x exposure'] = np.round(x * 0.3).astype(image.dtype)
  return out


def measure(workdir: pathlib.Path, max_images: int) -> dict:
  """{variant: (mean IoU vs the as-simulated masks, mean IoU vs truth)} for one run."""
  config = rundir.read_config(workdir)
  _, test_list = loader.list_paths(config)
  pairs = lists.load_pairs(test_list)[:max_images]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    names = list(variants(io.read_image(pairs[0].image)))
    for k, name in enumerate(names):
      (tmp / f'in{k}').mkdir()
      for i, pair in enumerate(pairs):
        tifffile.imwrite(tmp / f'in{k}' / f'{i:03d}.tif', variants(io.read_image(pair.image))[name])
      predict.run(config, workdir, predict.Options(input=str(tmp / f'in{k}'),
                                                   output=str(tmp / f'out{k}')))
    masks = {name: [tifffile.imread(tmp / f'out{k}' / f'{i:03d}_mask.tif') > 0
                    for i in range(len(pairs))] for k, name in enumerate(names)}
  truth = [io.read_mask(p.mask) > 0 for p in pairs]
  base = masks['as simulated']
  return {name: (float(np.mean([metrics.mask_iou(a, b) for a, b in zip(m, base)])),
                 float(np.mean([metrics.mask_iou(a, t) for a, t in zip(m, truth)])))
          for name, m in masks.items()}


FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup()
  lines = ['| run | normalisation | stored as | mask IoU vs as simulated | IoU vs truth |',
           '|---|---|---|---|---|']
  for workdir in map(pathlib.Path, FLAGS.workdir):
    start = time.perf_counter()
    config = rundir.read_config(workdir)
    results = measure(workdir, FLAGS.max_images)
    for name, (same, truth) in results.items():
      lines.append(f'| {workdir.name} | {config.data.normalization} ({config.data.kind}) | '
                   f'{name} | {same:.4f} | {truth:.4f} |')
    print(f'{workdir}: {time.perf_counter() - start:.0f} s')
  table = '\n'.join(lines)
  print(table)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).write_text(table + '\n')


if __name__ == '__main__':
  flags.DEFINE_multi_string('workdir', None, 'Trained run directories.', required=True)
  flags.DEFINE_integer('max_images', 20, 'Test images per run.')
  flags.DEFINE_string('out', '', 'Also write the Markdown table here.')
  app.run(main)
