"""Draws what the simulator makes: docs/simulated_samples.png.

  python -m experiments.figures.sample_grid [--out=docs/simulated_samples.png] [--seed=0]
  python -m experiments.figures.sample_grid --randomize=wide [--contours]
      # docs/simulated_wide_samples.png

For each kind (rows), three samples, each shown as the image (contrast-stretched between its
1st and 99.8th percentiles) and the same image with the ground-truth mask contour in red.
With --randomize=wide|shifted: six images per kind, each with its own knobs drawn as
write_dataset(randomize=...) draws them, titled with the main ones (--contours: mask in red).
"""

import pathlib

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from flmiseg.data import simulate  # noqa: E402  pylint: disable=g-import-not-at-top
from flmiseg.data import simulate_random  # noqa: E402  pylint: disable=g-import-not-at-top
from flmiseg.data import synthetic  # noqa: E402  pylint: disable=g-import-not-at-top


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_string('out', '', "Output PNG; '' = docs/simulated_samples.png, or "
                      'docs/simulated_<randomize>_samples.png.')
  flags.DEFINE_string('randomize', '', "'' (the kinds' defaults) or a preset: wide, shifted.")
  flags.DEFINE_bool('contours', False, 'With --randomize: draw the mask contours too.')
  flags.DEFINE_integer('seed', 0, 'Seed of the samples.')
  flags.DEFINE_integer('size', 256, 'Image side, pixels.')


FLAGS = flags.FLAGS
SAMPLES = 3


def stretch(image: np.ndarray) -> np.ndarray:
  lo, hi = np.percentile(image, [1, 99.8])
  return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


def _title(kind: str, p: simulate.Params, dtype) -> str:
  return (f'{kind} {p.bit_depth or dtype} ph={p.photons:.0f} psf={p.psf_sigma:.1f}'
          f'{"a" if p.psf == "airy" else ""}\nscale={p.scale:.2f} oof={p.out_of_focus:.1f} '
          f'debris={p.debris:.0f}')


def randomized(kinds, preset: str):
  """A len(kinds) x 6 figure of images with knobs drawn from `preset`."""
  fig, axes = plt.subplots(len(kinds), 6, figsize=(13, 2.5 * len(kinds)))
  for row, kind in enumerate(kinds):
    for s in range(6):
      index = 6 * row + s  # each row its own draws (a dataset of each kind repeats them)
      p = simulate_random.random_params(kind, synthetic.params_rng(FLAGS.seed, 'train', index),
                                        preset)
      image, mask = simulate.simulate(kind, FLAGS.size,
                                      simulate.image_rng(FLAGS.seed, 'train', index), p)
      axes[row, s].imshow(stretch(image), cmap='gray')
      if FLAGS.contours:
        axes[row, s].contour(mask > 0, [0.5], colors='red', linewidths=0.4)
      axes[row, s].set_title(_title(kind, p, image.dtype), fontsize=7)
  return fig


def main(_):
  kinds = simulate.KINDS
  if FLAGS.randomize:
    fig = randomized(kinds, FLAGS.randomize)
    for ax in fig.axes:
      ax.axis('off')
    fig.tight_layout()
    save(fig, FLAGS.out or f'docs/simulated_{FLAGS.randomize}_samples.png')
    return
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
  save(fig, FLAGS.out or 'docs/simulated_samples.png')


def save(fig, path: str) -> None:
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  print(f'wrote {out}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
