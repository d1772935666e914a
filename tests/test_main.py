"""The command line, end to end in a process of its own (tests/helpers.py: run_cli)."""

import json

import ml_collections
import pytest

from flmiseg.cli import flags as cli_flags
from flmiseg.configs import default
from flmiseg.train import config_checks
from tests import helpers


def run_main(*args, timeout=600):
  return helpers.run_cli(args, timeout=timeout)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return helpers.write_blob_dataset(tmp_path_factory.mktemp('blobs'), num_train=8, num_test=3)


def _tiny_flags(data_root):
  return ['--config=configs/default.py', '--config.data.source=lists',
          f'--config.data.train_list={data_root}/train.txt',
          f'--config.data.test_list={data_root}/test.txt', '--config.data.crop_size=32',
          '--config.model.width=4', '--config.train.num_steps=4',
          '--config.train.batch_size=4', '--config.eval.every_steps=2',
          '--config.eval.batch_size=2', '--config.data.val_fraction=0.25']


def test_train_then_eval_through_the_cli(data_root, tmp_path):
  result = run_main(*_tiny_flags(data_root), f'--workdir={tmp_path}/run')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Test set (3 images' in result.stdout and 'iou' in result.stdout
  summary = json.loads((tmp_path / 'run/eval/summary.json').read_text())
  assert summary['num_images'] == 3
  config = json.loads((tmp_path / 'run/config.json').read_text())
  assert config['model']['width'] == 4 and config['train']['num_steps'] == 4
  again = run_main(*_tiny_flags(data_root), f'--workdir={tmp_path}/run', '--mode=eval')
  assert again.returncode == 0, again.stderr[-2000:]
  assert json.loads((tmp_path / 'run/eval/summary.json').read_text())['iou'] == summary['iou']


def test_summary_mode_writes_counts(tmp_path):
  result = run_main('--config=configs/default.py', '--config.model.width=64',
                    '--config.data.crop_size=64', f'--workdir={tmp_path}', '--mode=summary')
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((tmp_path / 'model_summary.json').read_text())
  assert summary['params'] == 31042369 and summary['flops'] > 5e9
  assert '31,042,369 parameters' in result.stdout


@pytest.mark.parametrize('flag, message', [
    ('--config.model.name=unett', "config.model.name='unett' is not a model; valid names:"),
    ('--config.train.loss=bcee', "'bcee' is not a loss; valid names:"),
    ('--config.train.batch_size=3', 'config.train.batch_size=3 is not divisible by the 2'),
])
def test_bad_settings_give_one_line_errors(data_root, tmp_path, flag, message):
  result = run_main(*_tiny_flags(data_root), flag, f'--workdir={tmp_path}/bad')
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


def test_a_stock_config_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'default').mkdir()  # e.g. a run directory called default
  argv = cli_flags.resolve_config_arg(['flmiseg', '--config=default'])
  assert argv == ['flmiseg', f'--config={cli_flags.CONFIGS_DIR / "default.py"}']
  (tmp_path / 'mine').write_text('')  # a file of that name is the user's config
  assert cli_flags.resolve_config_arg(['flmiseg', '--config=mine']) == ['flmiseg',
                                                                        '--config=mine']


def test_free_sections_are_the_config_sections_left_empty():
  # The command line takes --config.<section>.<field>=... for exactly the sections whose rule
  # is a free section, and a section a config adds empty is one (model.backbone_kwargs).
  assert set(cli_flags.FREE_SECTIONS) == {
      f for f, rule in config_checks.RULES.items() if rule.check is config_checks.section}
  assert 'model.fusion_kwargs' in cli_flags.FREE_SECTIONS
  config = default.get_config()
  config.model.backbone_kwargs = ml_collections.ConfigDict()
  assert set(cli_flags.free_sections(config)) == {'model.fusion_kwargs', 'model.backbone_kwargs'}
