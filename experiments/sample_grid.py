"""Draws what the simulator makes: docs/simulated_samples.png.

  python -m experiments.sample_grid [--out=docs/simulated_samples.png] [--seed=0]

For each kind (rows), three samples, each shown as the image (contrast-stretched between its
1st and 99.8th percentiles) and the same image with the ground-truth mask contour in red.
"""

import pathlib

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from flmiseg.data import simulate  # noqa: E402  pylint: disable=g-import-not-at-top


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('out', 'docs/simulated_samples.png', 'Output PNG.')
  flags.DEFINE_integer('seed', 0, 'Seed of the samples.')
  flags.DEFINE_integer('size', 256, 'Image side, pixels.')


FLAGS = flags.FLAGS
SAMPLES = 3


def stretch(image: np.ndarray) -> np.ndarray:
  lo, hi = np.percentile(image, [1, 99.8])
  return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


def main(_):
  kinds = simulate.KINDS
  fig, axes = plt.subplots(len(kinds), 2 * SAMPLES, figsize=(4 * SAMPLES, 2.1 * len(kinds)))
  for row, kind in enumerate(kinds):
    for s in range(SAMPLES):
      image, mask = simulate.simulate(kind, FLAGS.size,
                                      simulate.image_rng(FLAGS.seed, 'train', s))
      shown = stretch(image)
      axes[row, 2 * s].imshow(shown, cmap='gray')
      axes[row, 2 * s + 1].imshow(shown, cmap='gray')
      axes[row, 2 * s + 1].contour(mask > 0, [0.5], colors='red', linewidths=0.5)
      axes[row, 2 * s].set_title(f'{kind} #{s} ({image.dtype})', fontsize=8)
      axes[row, 2 * s + 1].set_title('with mask contour', fontsize=8)
  for ax in axes.flat:
    ax.axis('off')
  fig.tight_layout()
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  print(f'wrote {out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
