"""Mixed training (config.data.synthetic_fraction): real and simulated images drawn in a
ratio, deterministic per seed, part of the data iterator's state; validation stays real."""

import math

import numpy as np
import pytest

from flmiseg.core.errors import UserError
from flmiseg.data import loader
from flmiseg.data import mixing
from flmiseg.data import pipeline
from tests import helpers
from tests import test_objectmasks

SYNTHETIC = 1000  # simulated elements carry ids from here


class _Source:
  """n elements whose 8x8 image is constant at `first` + i (the element's id)."""

  def __init__(self, n, first=0, has_labels=False):
    self.n, self.first, self.has_labels = n, first, has_labels
    self.shapes = ((8, 8),) * n
    self.files = tuple((f'image{first + i}', f'mask{first + i}') for i in range(n))

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((8, 8), self.first + i, np.float32),
            'mask': np.zeros((8, 8), np.uint8), 'index': i}


def _mixed(fraction, real=7, simulated=5):
  return mixing.MixedSource(_Source(real), _Source(simulated, SYNTHETIC), fraction)


def _ids(source, seed, count):
  stream = source.stream(seed, count)
  return [int(stream[k]['image'][0, 0]) for k in range(count)]


def test_the_same_seed_draws_the_same_sequence_another_seed_another():
  a, b, c = (_ids(_mixed(0.4), seed, 300) for seed in (3, 3, 4))
  assert a == b
  assert a != c
  # Another seed changes which draws are simulated, not only the order within each kind.
  assert [i >= SYNTHETIC for i in a] != [i >= SYNTHETIC for i in c]


@pytest.mark.parametrize('fraction', [0.1, 0.5, 0.8])
def test_the_ratio_is_honoured_over_many_draws(fraction):
  draws = 100000
  for seed in range(3):
    real, simulated = mixing.MixtureDraws(draws, fraction, seed).counts()
    assert real + simulated == draws
    # Independent draws: within 4 binomial standard deviations (0.005 here).
    assert abs(simulated - fraction * draws) <= 4 * math.sqrt(draws * fraction * (1 - fraction))
  # And so in the stream of elements (a shorter one: grain shuffles cost ~3 ms a draw).
  simulated = sum(i >= SYNTHETIC for i in _ids(_mixed(fraction), 0, 600))
  assert abs(simulated - fraction * 600) <= 4 * math.sqrt(600 * fraction * (1 - fraction))


def test_each_kind_comes_once_per_pass_in_a_seeded_order():
  ids = _ids(_mixed(0.5, real=7, simulated=5), 0, 100)
  real = [i for i in ids if i < SYNTHETIC]
  simulated = [i - SYNTHETIC for i in ids if i >= SYNTHETIC]
  for kind, n in ((real, 7), (simulated, 5)):
    for start in range(0, len(kind) - n + 1, n):
      assert sorted(kind[start:start + n]) == list(range(n))  # every image once per pass
    assert kind[:n] != kind[n:2 * n]  # reshuffled every pass


def test_draws_map_positions_to_each_kind_in_turn():
  draws = mixing.MixtureDraws(1000, 0.3, seed=1)
  picks = [draws[k] for k in range(len(draws))]
  real, simulated = draws.counts()
  assert real + simulated == 1000
  assert [j for kind, j in picks if kind == 0] == list(range(real))
  assert [j for kind, j in picks if kind == 1] == list(range(simulated))
  with pytest.raises(IndexError):
    draws[1000]  # pylint: disable=pointless-statement


def test_mixed_source_describes_both_sources():
  source = mixing.MixedSource(_Source(7), _Source(5, SYNTHETIC, has_labels=True), 0.3)
  assert len(source) == 10  # ceil(7 / 0.7): each real image once per epoch on average
  assert len(source.files) == len(source.shapes) == 12 and source.has_labels
  for bad in (0.0, 1.0):
    with pytest.raises(ValueError, match='synthetic_fraction'):
      mixing.MixedSource(_Source(7), _Source(5), bad)


def _batches(source, seed=5, **kw):
  return iter(pipeline.train_dataset(source, crop_size=6, global_batch=4, num_steps=40,
                                     seed=seed, **kw))


def test_training_batches_mix_and_the_iterator_state_round_trips():
  it = _batches(_mixed(0.5))
  for _ in range(6):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(8)]
  ids = np.concatenate([b['image'][:, 0, 0, 0] for b in expected])
  assert (ids >= SYNTHETIC).any() and (ids < SYNTHETIC).any()
  resumed = _batches(_mixed(0.5))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  # Another seed, other batches.
  other = _batches(_mixed(0.5), seed=6)
  first = [next(other) for _ in range(7)][-1]
  assert not np.array_equal(first['image'], expected[0]['image'])


def test_processes_read_blocks_of_the_same_mixed_global_batches():
  whole = list(_batches(_mixed(0.3)))
  parts = [list(_batches(_mixed(0.3), process_index=p, process_count=2)) for p in range(2)]
  assert len(whole) == len(parts[0]) == len(parts[1]) == 40 + 3  # + ceil(10 / 4): an epoch
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
        np.concatenate([parts[0][step]['image'], parts[1][step]['image']]), batch['image'])


def test_loader_mixes_simulated_images_into_training_only(tmp_path):
  data = tmp_path / 'data'
  test_objectmasks._object_dataset(data / 'train', 4)  # pylint: disable=protected-access
  test_objectmasks._object_dataset(data / 'test', 2, seed=2)  # pylint: disable=protected-access
  config = helpers.tiny_config(data, **{
      'data.source': 'object_masks', 'data.kind': 'nucleus',
      'data.train_list': str(data / 'train'), 'data.test_list': str(data / 'test'),
      'data.synthetic_fraction': 0.25, 'data.synthetic_params': 'wide',
      'data.synthetic_size': 32, 'data.num_synthetic_train': 3, 'data.num_synthetic_test': 1,
      'data.synthetic_dir': str(tmp_path / 'sim')})
  sets = loader.load(config, tmp_path / 'cache')
  assert isinstance(sets.train, mixing.MixedSource)
  assert (len(sets.train.real), len(sets.train.synthetic)) == (3, 3)
  assert set(sets.train.synthetic.names) == {'nucleus_00000', 'nucleus_00001', 'nucleus_00002'}
  assert len(sets.val) == 1 and set(sets.val.names) <= {f'img{i}' for i in range(4)}
  assert set(sets.test.names) == {'img0', 'img1'}
  assert len(sets.train) == 4  # ceil(3 / 0.75)
  batch = next(iter(pipeline.train_dataset(sets.train, crop_size=16, global_batch=4,
                                            num_steps=2, seed=0)))
  assert batch['image'].shape == (4, 16, 16, 1)
  # Evaluation alone reads the test set and never the simulated images.
  assert loader.load(config, tmp_path / 'cache', need_train=False).train is None
  config.data.source = 'synthetic'
  with pytest.raises(UserError, match='synthetic_fraction=0.25 mixes simulated images into '
                     'real ones: it needs config.data.source=lists or object_masks'):
    loader.load(config, tmp_path / 'cache')
