"""The run directory as the model: config merging, allowed overrides, input statistics."""

import json
import types

import numpy as np
import pytest

from flmiseg.store import rundir
from flmiseg.configs import default
from flmiseg.train import config_checks
from flmiseg.core.errors import UserError


def _run_dir(tmp_path, **changes):
  config = json.loads(default.get_config().to_json())
  for key, value in changes.items():
    section, field = key.split('.')
    config[section][field] = value
  (tmp_path / 'config.json').write_text(json.dumps(config))
  return tmp_path


def _inference_config(workdir, given):
  """rundir.inference_config as --mode=eval|predict|summary calls it (flmiseg/cli/modes.py):
  with the fields whose rules make them inference settings, or model fields."""
  return rundir.inference_config(workdir, given, config_checks.INFERENCE_FIELDS,
                                 config_checks.MODEL_FIELDS)


def test_an_old_run_gets_defaults_for_fields_added_since(tmp_path):
  saved = json.loads(default.get_config().to_json())
  del saved['data']['pixel_size']  # a run made before the field existed
  saved['model']['width'] = 8
  saved['train']['loss_weights'] = [1.0, 2.0]  # JSON lists become the config's tuples
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  config = rundir.read_config(tmp_path)
  assert config.data.pixel_size == 0.0 and config.model.width == 8
  assert config.train.loss_weights == (1.0, 2.0)


def test_only_inference_settings_may_differ(tmp_path):
  workdir = _run_dir(tmp_path, **{'model.width': 8, 'train.num_steps': 30})
  given = rundir.read_config(workdir)
  given.eval.batch_size = 3
  given.eval.threshold = 0.4
  given.data.test_list = '/data/other_test.txt'
  config = _inference_config(workdir, given)
  assert (config.eval.batch_size, config.eval.threshold, config.data.test_list) == (
      3, 0.4, '/data/other_test.txt')
  assert config.model.width == 8
  given.train.num_steps = 31
  given.data.normalization = 'zscore'  # both differ: the model's field is named first
  with pytest.raises(UserError, match=r"^--config.data.normalization='zscore', but the "
                     r"model in .* was trained with 'auto'"):
    _inference_config(workdir, given)
  given.data.normalization = 'auto'
  with pytest.raises(UserError, match=r'^--config.train.num_steps=31, .* trained with 30;'):
    _inference_config(workdir, given)


def test_a_folder_without_a_trained_model_is_named(tmp_path):
  with pytest.raises(UserError, match='not a trained run \\(no such folder\\)'):
    rundir.check_trained(tmp_path / 'missing')
  with pytest.raises(UserError, match='not a trained run \\(no config.json\\)'):
    rundir.check_trained(tmp_path)
  _run_dir(tmp_path)
  (tmp_path / 'checkpoints_best').mkdir()
  with pytest.raises(UserError, match='not a trained run \\(no checkpoint\\)'):
    rundir.check_trained(tmp_path)


def test_unusual_stats_and_foreground_notes():
  per_image = [{'p50': 0.2, 'p99': 1.0}, {'p50': 0.3, 'p99': 1.2}, {'p50': 0.25, 'p99': 1.1}]
  training = rundir.summarize_stats(per_image, [0.1, 0.2, 0.3])
  assert training['images'] == 3
  assert training['stats']['p50'] == pytest.approx(
      {'mean': 0.25, 'std': 0.0408248, 'min': 0.2, 'max': 0.3}, rel=1e-5)
  assert training['foreground']['max'] == 0.3
  # Inside the range widened by 25 % of it: fine. p50 0.35 is 0.025 beyond the widened
  # range (0.175..0.325) and 2.45 std from the mean (not more than 4): fine too.
  assert rundir.unusual_stats({'p50': 0.32, 'p99': 1.05}, training) == []
  assert rundir.unusual_stats({'p50': 0.35, 'p99': 1.1}, training) == []
  unusual = rundir.unusual_stats({'p50': 0.5, 'p99': 1.1}, training)
  assert unusual == ['p50 0.5 (training 0.2..0.3)']
  assert rundir.unusual_stats({'p50': 9.0}, None) == []
  assert rundir.foreground_note(0.0) == 'the mask is empty (0.00% foreground)'
  assert rundir.foreground_note(0.995) == 'the mask covers 99.50% of the image'
  assert rundir.foreground_note(0.3) is None


def test_input_stats_of_a_model_trained_on_both_contrasts_count_the_mirrored_images(tmp_path):
  image = np.array([[0., 0., 0., 1.], [0., 0., 0.2, 0.8]])  # dark background, bright object
  np.save(tmp_path / 'image.npy', image)
  np.save(tmp_path / 'mask.npy', (image > 0.5).astype(np.uint8))
  source = types.SimpleNamespace(files=[(tmp_path / 'image.npy', tmp_path / 'mask.npy')])
  plain, both = rundir.input_stats(source), rundir.input_stats(source, mirror=1.0)
  assert plain['images'] == both['images'] == 1
  assert plain['stats']['mean']['max'] == pytest.approx(0.25)
  assert both['stats']['mean']['min'] == pytest.approx(0.25)
  assert both['stats']['mean']['max'] == pytest.approx(0.75)  # 1 - image: bright background
  assert both['stats']['p50']['max'] == pytest.approx(1.0)
  # A bright-background image is unusual for the plain model only.
  bright = {'p50': 1.0, 'mean': 0.75}
  assert rundir.unusual_stats(bright, plain) and not rundir.unusual_stats(bright, both)
