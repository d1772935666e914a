"""How the shipped models fare on objects smaller or larger than the simulator's defaults:
the same specimen imaged at another pixel size.

  python -m experiments.shipped.pretrained_scale [--kinds=er,mito,nucleus] [--scales=0.35,0.5,...]
      [--num_images=10] [--tta]

For each shipped model and each object scale s, `num_images` simulated 256x256 test images of
an unseen seed with the kind's default knobs except `simulate.Params(scale=s)` (widths, radii,
lengths and texture times s; the PSF and the noise per pixel stay: a microscope with s times
smaller pixels and the same resolution in pixels), segmented through the predict path at the
calibrated threshold (`common.scores`). Prints the mean IoU per kind and scale as a
Markdown table. The shipped models were trained on object scales 0.6-1.6 (nucleus:
0.35-2.5) with a 0.7-1.4 scale jitter (docs/models.md).
"""

import pathlib
import tempfile

from absl import app
from absl import flags
import tifffile

from experiments import common
from flmiseg.core import console
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.data import lists
from flmiseg.data import loader
from flmiseg.data import simulate
from flmiseg.data import synthetic

FLAGS = flags.FLAGS


def scale_pairs(kind: str, scale: float, num: int, folder: pathlib.Path,
                masks: str = 'geometry') -> list:
  """`num` simulated (image, mask) files of `kind` at object scale `scale` in `folder`, masks
  drawn as `masks` says (simulate.MASKS)."""
  folder.mkdir(parents=True, exist_ok=True)
  pairs = []
  for i in range(num):
    image, mask = simulate.simulate(
        kind, 256, synthetic.image_rng(common.TEST_SEED, 'test', i),
        simulate.Params(scale=scale), masks=masks)
    paths = folder / f'{i:03d}.tif', folder / f'{i:03d}_mask.tif'
    tifffile.imwrite(paths[0], image)
    tifffile.imwrite(paths[1], mask)
    pairs.append(lists.Pair(*paths, origin=str(folder)))
  return pairs


def main(argv):
  del argv
  console.setup()
  scales = [float(s) for s in FLAGS.scales]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for kind in FLAGS.kinds:
      folder = pretrained.PRETRAINED_DIR / kind
      masks = loader.synthetic_masks(rundir.read_config(folder).data)
      ious = [common.scores(folder, scale_pairs(
          kind, s, FLAGS.num_images, pathlib.Path(tmp) / f'{kind}_{s}', masks), FLAGS.tta)['iou']
              for s in scales]
      rows.append(f'| {kind} | ' + ' | '.join(f'{v:.3f}' for v in ious) + ' |')
  print('| model | ' + ' | '.join(f'scale {s:g}' for s in scales) + ' |')
  print('|---|' + '---|' * len(scales))
  print('\n'.join(rows))
  print(f'mean IoU over {FLAGS.num_images} images per cell' +
        (', 8x TTA' if FLAGS.tta else '') + f'; {common.machine()}')


if __name__ == '__main__':
  # Defined here, not at import: tests import this module beside others that define --tta.
  flags.DEFINE_list('kinds', list(pretrained.SHIPPED), 'Shipped models.')
  flags.DEFINE_list('scales', ['0.35', '0.5', '0.7', '1', '1.5', '2', '2.5'], 'Object scales.')
  flags.DEFINE_integer('num_images', 10, 'Simulated test images per kind and scale.')
  flags.DEFINE_bool('tta', False, 'Average over the 8 flips/rotations.')
  app.run(main)
