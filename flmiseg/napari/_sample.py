"""napari sample data: one simulated image of each kind with its ground truth
(flmiseg/data/simulate.py, the kind's default microscope)."""

from flmiseg.data import simulate
from flmiseg.data import synthetic

SIZE = 256  # pixels per side
SEED = 0


def sample(kind: str) -> list[tuple]:
  """napari layer data: the simulated image and its ground-truth labels (hidden)."""
  image, labels = simulate.simulate(kind, SIZE, synthetic.image_rng(SEED, 'test', 0),
                                    labels=True)
  return [(image, {'name': f'simulated {kind}'}, 'image'),
          (labels, {'name': f'simulated {kind} truth', 'visible': False}, 'labels')]


def nucleus() -> list[tuple]:
  return sample('nucleus')


def er() -> list[tuple]:
  return sample('er')


def mito() -> list[tuple]:
  return sample('mito')
