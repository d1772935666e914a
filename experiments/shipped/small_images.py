"""Images smaller than a tile: the shipped models on crops against the same pixels in context.

  python -m experiments.shipped.small_images [--size=100] [--images=10] [--seed=79]

For each shipped model (er, mito, nucleus), simulates `--images` test images of 256x256 on the
kind's default knobs (an unseen seed), and compares the mean mask IoU of the top-left
`--size` x `--size` crop predicted on its own (smaller than the 128-px tile, so
`inference.sliding_window` pads it) with the IoU of the same pixels predicted inside the whole
image. docs/inference.md ("Tiles") has the figures with both paddings.
"""

from absl import app
from absl import flags
import numpy as np

import flmiseg
from flmiseg.core import console
from flmiseg.evaluation import metrics
from flmiseg.store import pretrained
from flmiseg.data import simulate
from flmiseg.data import synthetic


def measure(kind: str, size: int, images: int, seed: int) -> dict:
  """{'crop': [IoU per image], 'whole': [IoU per image]} of the shipped `kind` model."""
  model = flmiseg.load(kind)
  crop, whole = [], []
  for index in range(images):
    image, mask = simulate.simulate(kind, 256, synthetic.image_rng(seed, 'test', index))
    truth = mask[:size, :size] > 0
    whole.append(metrics.mask_iou(model.segment(image).mask[:size, :size] > 0, truth))
    crop.append(metrics.mask_iou(model.segment(image[:size, :size]).mask > 0, truth))
  return {'crop': crop, 'whole': whole}


def main(argv):
  del argv
  console.setup(False)
  for kind in pretrained.SHIPPED:
    result = measure(kind, FLAGS.size, FLAGS.images, FLAGS.seed)
    print(f'{kind}: {FLAGS.size}x{FLAGS.size} crop alone {np.mean(result["crop"]):.3f} '
          f'(lowest {np.min(result["crop"]):.3f}); the same pixels inside the whole image '
          f'{np.mean(result["whole"]):.3f}', flush=True)


if __name__ == '__main__':
  flags.DEFINE_integer('size', 100, 'Side of the crop, pixels (below the 128-px tile).')
  flags.DEFINE_integer('images', 10, 'Simulated test images per kind.')
  flags.DEFINE_integer('seed', 79, 'Seed of the simulated test images.')
  FLAGS = flags.FLAGS
  app.run(main)
