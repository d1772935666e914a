"""flmiseg/store/settings.py: each inference setting is the one given, else the one calibrated
for the loaded checkpoint, else the config's; calibration.json read from a folder or a dict."""

from flmiseg.configs import default
from flmiseg.objects import instances
from flmiseg.store import settings


def test_threshold_given_else_calibrated_for_the_step_else_the_configs(tmp_path):
  config = default.get_config()
  config.eval.threshold = 0.45
  assert settings.threshold(config, tmp_path, 6) == (0.45, 'config.eval.threshold')
  settings.write_calibration(tmp_path, {'threshold': 0.3, 'checkpoint_step': 6,
                                        'seed_dynamic': 0.2})
  for calibration in (tmp_path, settings.read_calibration(tmp_path)):
    assert settings.threshold(config, calibration, 6) == (0.3, 'calibrated')
    assert settings.threshold(config, calibration, 6, given=0.7) == (0.7, 'threshold')
    # A calibration made for another checkpoint counts as none.
    assert settings.threshold(config, calibration, 4) == (0.45, 'config.eval.threshold')
  assert settings.threshold(config, None, 6) == (0.45, 'config.eval.threshold')


def test_seed_dynamic_and_min_size(tmp_path):
  config = default.get_config()
  config.eval.seed_dynamic, config.eval.min_size = 0.05, 9
  calibration = {'threshold': 0.3, 'checkpoint_step': 6, 'seed_dynamic': 0.2}
  assert settings.seed_dynamic(config, calibration, 6) == 0.2
  assert settings.seed_dynamic(config, calibration, 6, given=0.15) == 0.15
  assert settings.seed_dynamic(config, calibration, 5) == 0.05
  # Binary validation masks: calibrated without a dynamic, so the config's.
  assert settings.seed_dynamic(config, dict(calibration, seed_dynamic=None), 6) == 0.05
  assert settings.seed_dynamic(config, tmp_path, 6) == 0.05  # no calibration.json
  del config.eval.seed_dynamic
  assert settings.seed_dynamic(config, None, 6) == instances.SEED_DYNAMIC
  assert (settings.min_size(config), settings.min_size(config, 0)) == (9, 0)


def test_an_unreadable_calibration_counts_as_none(tmp_path):
  (tmp_path / settings.CALIBRATION_FILE).write_text('{"threshold": ')
  assert settings.read_calibration(tmp_path) is None
  assert settings.calibrated_threshold(tmp_path, 6) is None
  (tmp_path / settings.CALIBRATION_FILE).write_text('{"checkpoint_step": 6}')
  assert settings.calibrated_dynamic(tmp_path, 6) is None


def test_diameter_given_else_measured_where_the_config_says_and_nothing_else_decides():
  config = default.get_config()
  assert settings.diameter(config, None) is None  # measure_diameter off
  assert settings.diameter(config, 12.0) == 12.0
  config.eval.measure_diameter = True
  assert settings.diameter(config, None) is None  # no object_diameter recorded
  config.data.object_diameter = 31.0
  assert settings.diameter(config, None) == settings.MEASURED == 0.0
  assert settings.diameter(config, 20.0) == 20.0
  # The image's pixel size alone cannot decide: the model knows none.
  assert settings.diameter(config, None, pixel_size=0.3) == 0.0
  assert settings.diameter(config, None, rescale=False) is None
  assert settings.diameter(config, None, measure=False) is None  # block by block
  config.data.pixel_size = 0.5  # with the image's, the model's own pixel size decides
  assert settings.diameter(config, None, pixel_size=0.3) is None
  assert settings.diameter(config, None) == 0.0
