"""config.data.seed seeds the simulated dataset, config.seed the model: runs that differ only in
config.seed train on the same data. Run directories made before data.seed existed simulated
their data with config.seed, and keep finding it."""

import json

import ml_collections
import pytest

from flmiseg.store import rundir
from flmiseg.train import trainer
from flmiseg.configs import default
from flmiseg.data import loader
from flmiseg.core.errors import UserError


def _tiny_synthetic(tmp_path, **seeds):
  config = default.get_config()
  config.data.update(synthetic_dir=str(tmp_path / 'cache'), num_synthetic_train=2,
                     num_synthetic_test=1, synthetic_size=32, crop_size=32)
  for key, value in seeds.items():
    if key == 'seed':
      config.seed = value
    else:
      config.data.seed = value
  return config


def test_the_model_seed_does_not_change_the_simulated_data(tmp_path):
  a, _ = loader.list_paths(_tiny_synthetic(tmp_path, seed=0))
  b, _ = loader.list_paths(_tiny_synthetic(tmp_path, seed=7))
  c, _ = loader.list_paths(_tiny_synthetic(tmp_path, seed=7, data_seed=3))
  assert a == b and a.parent.name == 'er_2+1_32px_seed0'  # the folder default runs already use
  assert c.parent.name == 'er_2+1_32px_seed3'
  first_image = lambda listing: (listing.parent / listing.read_text().split()[0]).read_bytes()
  assert first_image(a) != first_image(c)


def _old_run(workdir, seed: int, source: str = 'synthetic'):
  """A run directory whose config.json predates data.seed."""
  workdir.mkdir(parents=True)
  config = json.loads(default.get_config().to_json())
  del config['data']['seed']
  config['seed'], config['data']['source'] = seed, source
  config['data'].update(synthetic_dir=str(workdir.parent / 'cache'), num_synthetic_train=2,
                        num_synthetic_test=1, synthetic_size=32, crop_size=32)
  (workdir / 'config.json').write_text(json.dumps(config))
  return workdir


def test_an_old_run_keeps_the_data_of_its_seed(tmp_path):
  config = rundir.read_config(_old_run(tmp_path / 'synthetic', 3))
  assert (config.seed, config.data.seed) == (3, 3)
  assert loader.list_paths(config)[1].parent.name.endswith('_seed3')
  old_lists = rundir.read_config(_old_run(tmp_path / 'lists', 3, source='lists'))
  assert old_lists.data.seed == 0  # no simulated data: nothing to keep


def test_a_config_without_data_seed_simulates_with_its_seed():
  config = ml_collections.ConfigDict({'seed': 5, 'data': {'source': 'synthetic'}})
  assert loader.data_seed(config) == 5


def test_resuming_an_old_run_needs_its_data_seed(tmp_path):
  workdir = _old_run(tmp_path / 'run', 3)
  config = rundir.read_config(workdir)  # the run's config, as today's flmiseg writes it ...
  config.data.seed = 0  # ... but with the default data.seed
  with pytest.raises(UserError, match=r'\(data.seed differ\);.*add --config.data.seed=3\)$'):
    trainer.prepare_workdir(config, workdir)
  config.data.seed = 3
  trainer.prepare_workdir(config, workdir)  # the same run: accepted
  assert json.loads((workdir / 'config.json').read_text())['data']['seed'] == 3
