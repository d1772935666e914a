"""Every (name, variant) of the zoo builds from the config and reports the reference count;
a few train end to end from the default config with only the model changed."""

import jax.numpy as jnp
import pytest

from flmiseg.configs import default
from flmiseg import models
from flmiseg.models import summary
from flmiseg.train import trainer
from flmiseg.core.errors import UserError
from tests import helpers

REFERENCE = [  # (name, variant, backbone, fusion, parameters at the reference base width)
    ('unet', 'original', '', '', 31_042_369),
    ('unet_pp', 'original', '', '', 9_162_852),
    ('agnet', 'original', '', '', 9_326_216),
    ('fcn32s', 'original', '', '', 18_642_561),
    ('fcn8s', 'original', '', '', 18_642_561),
    ('fcn', 'original', '', '', 18_642_561),
    ('fcn', 'lowlevel', '', '', 20_209_281),
    ('segnet', 'original', '', '', 29_442_433),
    ('segnet', 'lowlevel', '', '', 34_935_169),
    ('deeplabv3p', 'original', '', '', 40_340_769),
    ('deeplabv3p', 'lowlevel', '', '', 43_048_129),
    ('deeplabv3p', 'lowlevel', '', 'add', 41_942_209),
    ('deeplabv3p', 'original', 'resnet101', '', 59_332_897),
    ('deeplabv3p', 'lowlevel', 'resnet101', '', 62_040_257),
    ('hrnetv2', 'original', '', '', 9_983_105),
    ('hrnetv2', 'lowlevel', '', '', 9_983_105),
]


def _model_config(name, variant, backbone='', fusion='', width=None):
  cfg = default.get_config().model
  cfg.name, cfg.variant, cfg.backbone, cfg.fusion = name, variant, backbone, fusion
  cfg.width = width or models.MODELS[name][2]
  return cfg


@pytest.mark.parametrize('name, variant, backbone, fusion, expected', REFERENCE)
def test_registry_builds_reference_counts(name, variant, backbone, fusion, expected):
  model = models.create_model(_model_config(name, variant, backbone, fusion), jnp.float32)
  assert summary.count_params(model) == expected


def test_unknown_names_list_the_valid_ones():
  cfg = _model_config('unet', 'original')
  cfg.name = 'vnet'
  with pytest.raises(UserError, match='valid names: agnet, deeplabv3p, fcn'):
    models.create_model(cfg, jnp.float32)
  with pytest.raises(UserError, match="variant='lowlevel' is not a variant of 'unet'"):
    models.create_model(_model_config('unet', 'lowlevel'), jnp.float32)


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  return helpers.write_blob_dataset(tmp_path_factory.mktemp('blobs'), num_train=8, num_test=2)


@pytest.mark.parametrize('name, variant', [('fcn', 'lowlevel'), ('unet_pp', 'original')])
def test_models_train_from_the_default_config(data_root, tmp_path, name, variant):
  config = helpers.tiny_config(data_root, **{'model.name': name, 'model.variant': variant,
                                             'train.num_steps': 2, 'eval.every_steps': 2})
  result = trainer.train_and_evaluate(config, tmp_path / name)
  assert result['num_images'] == 2 and 0.0 <= result['iou'] <= 1.0
