"""Mixed training: real and simulated images drawn in a configurable ratio.

`MixedSource(real, synthetic, synthetic_fraction)` is the training source of a run with
config.data.synthetic_fraction > 0 (flmiseg/data/loader.py). The training pipeline
(pipeline.train_dataset) turns it into one stream: draw k is a simulated image with
probability `synthetic_fraction`, independently of the other draws, else a real one. Each
kind is taken in its own seeded shuffled order, reshuffled every pass, so every real image
is seen once before any is seen again, and so is every simulated image.

All of it is a function of the seed and the position in the stream (grain's random-access
MapDataset.select_from_datasets with `MixtureDraws` below), so the data iterator's state is
just its position: a checkpointed run resumes the same draw, and P processes read the blocks
of the same global batches as one process does.
"""

import dataclasses
import math

import grain
import numpy as np

# Mixes the seed for the draws and the two orders, so they differ from each other and from
# the shuffle seeds of an unmixed run.
_MIX_TAG = 0x6D6978


class MixtureDraws(grain.transforms.DatasetSelectionMap):
  """Position k of a mixed stream -> (0, j): the j-th real draw, or (1, j): the j-th
  simulated one; position k is simulated with probability `synthetic_fraction`, drawn from
  a generator seeded by `seed` (the same seed, the same sequence)."""

  def __init__(self, length: int, synthetic_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    self._synthetic = rng.random(length) < synthetic_fraction
    # How many simulated draws come before each position.
    self._before = np.cumsum(self._synthetic) - self._synthetic

  def __len__(self) -> int:
    return len(self._synthetic)

  def __getitem__(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f'mixture position {index} out of range({len(self)})')
    before = int(self._before[index])
    return (1, before) if self._synthetic[index] else (0, index - before)

  def counts(self) -> tuple[int, int]:
    """(real, simulated) draws over the whole stream."""
    synthetic = int(self._synthetic.sum())
    return len(self) - synthetic, synthetic


@dataclasses.dataclass(frozen=True)
class MixedSource:
  """Real and simulated training sources (dataset.PreparedSource each) drawn in a ratio.

  It answers what the trainer asks of a training source: `len` (the draws of one epoch, in
  which each real image comes once on average), `files` and `shapes` (both sources', for the
  input statistics and the crop size), `has_labels`.
  """
  real: object
  synthetic: object
  synthetic_fraction: float

  def __post_init__(self):
    if not 0.0 < self.synthetic_fraction < 1.0:
      raise ValueError(f'config.data.synthetic_fraction={self.synthetic_fraction} must be in '
                       '(0, 1) to mix (0: real images only)')
    if not len(self.real) or not len(self.synthetic):
      raise ValueError('mixed training needs real and simulated images; got '
                       f'{len(self.real)} and {len(self.synthetic)}')

  def __len__(self) -> int:
    return math.ceil(len(self.real) / (1.0 - self.synthetic_fraction))

  @property
  def files(self) -> tuple:
    return tuple(self.real.files) + tuple(self.synthetic.files)

  @property
  def shapes(self) -> tuple:
    return tuple(self.real.shapes) + tuple(self.synthetic.shapes)

  @property
  def has_labels(self) -> bool:
    return bool(self.real.has_labels or self.synthetic.has_labels)

  def stream(self, seed: int, count: int) -> grain.MapDataset:
    """A MapDataset of `count` elements: the mixture (module docstring) seeded by `seed`
    (the run's config.seed); element k depends on (seed, k) only."""
    mix_seed, real_seed, synthetic_seed = (
        int(s) for s in np.random.SeedSequence([seed, _MIX_TAG]).generate_state(3))
    draws = MixtureDraws(count, self.synthetic_fraction, mix_seed)
    streams = []
    for source, source_seed, drawn in zip((self.real, self.synthetic),
                                          (real_seed, synthetic_seed), draws.counts()):
      epochs = max(1, math.ceil(drawn / len(source)))
      streams.append(grain.MapDataset.source(source).shuffle(seed=source_seed).repeat(epochs))
    return grain.MapDataset.select_from_datasets(streams, draws)
