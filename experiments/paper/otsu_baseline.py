"""A classical baseline: Otsu's global threshold per image, scored like the networks.

  python -m experiments.paper.otsu_baseline --config=configs/default.py [--smooth=1.0]

Reads the test set the config points at (the simulated default, or your lists), thresholds
each raw image at its Otsu level (after an optional Gaussian smoothing of `smooth` pixels),
and prints the same metrics table as `flmiseg.main`. A network that does not clearly beat
this has not learned much.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import scipy.ndimage
import skimage.filters

from flmiseg.evaluation import metrics
from flmiseg.evaluation import report
from flmiseg.data import io
from flmiseg.data import lists
from flmiseg.data import loader


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  config_flags.DEFINE_config_file('config', None, 'Config naming the dataset.', lock_config=True)
  flags.DEFINE_float('smooth', 1.0, 'Gaussian sigma (pixels) before thresholding; 0: none.')
  flags.DEFINE_bool('json', False, 'Print the summary as JSON.')


FLAGS = flags.FLAGS


def otsu_rows(pairs, smooth: float) -> list[dict]:
  rows = []
  for pair in pairs:
    image = io.read_image(pair.image).astype(np.float32)
    if smooth > 0:
      image = scipy.ndimage.gaussian_filter(image, smooth)
    level = skimage.filters.threshold_otsu(image)
    # A probability-like score for AUC: the image itself, scaled to [0, 1].
    score = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
    cut = (level - image.min()) / max(float(np.ptp(image)), 1e-6)
    row = metrics.image_metrics(score, io.read_mask(pair.mask), threshold=float(cut))
    rows.append({'name': pair.image.stem, **row})
  return rows


def main(_):
  _, test_list = loader.list_paths(FLAGS.config)
  summary = metrics.summarize(otsu_rows(lists.load_pairs(test_list), FLAGS.smooth))
  if FLAGS.json:
    print(json.dumps(summary))
  else:
    print(f'Otsu baseline on {test_list}:')
    print(report.format_table(summary))


if __name__ == '__main__':
  define_flags()
  app.run(main)
