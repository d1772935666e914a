"""`config_checks.validate`: every stock config passes; each bad value stops with one line
naming the field, the value and what is valid (no training, no JAX compilation); the rules'
roles say which fields eval/predict and a resumed run may change."""

import importlib
import math
import pathlib

import pytest

from flmiseg.train import config_checks
from flmiseg.train import trainer
from flmiseg.store import rundir
from flmiseg.configs import default
from flmiseg.core.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
STOCK = sorted(p.stem for p in (REPO / 'flmiseg' / 'configs').glob('*.py')
               if not p.stem.startswith('_'))
SHIPPED = sorted(p.name for p in (REPO / 'flmiseg' / 'pretrained').iterdir()
                 if (p / 'config.json').is_file())


def _with(**changes):
  """The default config with `changes` ({'optim__lr': 0.0}: field optim.lr), types not
  enforced (a config file or a run's config.json can hold any type)."""
  config = default.get_config()
  for key, value in changes.items():
    *sections, field = key.split('__')
    node = config
    for section in sections:
      node = node[section]
    with node.ignore_type():
      node[field] = value
  return config


def _error(config) -> str:
  """The one-line error of `config` as training meets it: `validate`, then the loss
  (`trainer.make_loss`, which resolves its names)."""
  with pytest.raises(UserError) as e:
    config_checks.validate(config)
    trainer.make_loss(config)
  message = str(e.value)
  assert '\n' not in message
  return message


@pytest.mark.parametrize('name', STOCK)
def test_every_stock_config_is_valid(name):
  config_checks.validate(importlib.import_module(f'flmiseg.configs.{name}').get_config())


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_model_config_is_valid(name):
  config_checks.validate(rundir.read_config(REPO / 'flmiseg' / 'pretrained' / name))


def test_every_default_field_has_a_rule():
  def fields(tree, prefix=''):  # leaves, and sections without fields (the free ones)
    for key, value in tree.items():
      if isinstance(value, dict) and value:
        yield from fields(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}'
  assert set(fields(default.get_config().to_dict())) == set(config_checks.RULES)
  roles = (config_checks.MODEL, config_checks.TRAINING, config_checks.INFERENCE,
           config_checks.RUN)
  for field, rule in config_checks.RULES.items():
    assert isinstance(rule, config_checks.Rule) and rule.role in roles, field
    assert callable(rule.check), field


@pytest.mark.parametrize('field, inference, resume, model', [
    # field: may eval/predict set it; may a resumed run change it; does it define the model.
    ('eval.threshold', True, True, False),
    ('eval.calibrate_metric', True, True, False),
    ('data.num_workers', True, True, False),
    ('data.test_list', True, False, False),
    ('license', True, False, False),
    ('optim.lr', False, False, False),
    ('train.loss', False, False, False),
    ('imports', False, False, False),
    ('data.crop_size', False, False, True),
    ('model.width', False, False, True),
    ('model.fusion_kwargs.reduction', False, False, True),  # a free section's field
    ('eval.a_field_of_another_version', True, True, False),  # its section's role
])
def test_each_rules_role_says_who_may_change_the_field(field, inference, resume, model):
  assert config_checks.matches(field, config_checks.INFERENCE_FIELDS) == inference
  assert config_checks.may_differ_on_resume(field) == resume
  assert field.startswith(config_checks.MODEL_FIELDS) == model


BAD = {
    # field: value, the exact error line.
    'seed': (-1, 'config.seed=-1: must be an integer in [0, 2147483647]'),
    'data__seed': (1.5, 'config.data.seed=1.5: must be an integer in [0, 2147483647]'),
    'imports': (3, 'config.imports=3: must be a string'),
    'data__source': ('disk', "config.data.source='disk' is not a source; valid: synthetic, "
                     'lists, object_masks'),
    'data__train_list': (None, 'config.data.train_list=None: must be a string'),
    'data__val_list': (3, 'config.data.val_list=3: must be a string'),
    'data__synthetic_fraction': (1.0, 'config.data.synthetic_fraction=1.0: must be a number in '
                                 '[0, 1) (0: real images only)'),
    'data__num_synthetic_train': (0, 'config.data.num_synthetic_train=0: must be an integer '
                                  '>= 1'),
    'data__num_synthetic_test': (-2, 'config.data.num_synthetic_test=-2: must be an integer '
                                 '>= 1'),
    'data__synthetic_size': (8, 'config.data.synthetic_size=8: must be an integer >= 16 '
                             '(pixels)'),
    'data__synthetic_params': ('broad', "config.data.synthetic_params='broad' is not valid; "
                               'valid: default, wide, shifted'),
    'data__crop_size': (0, 'config.data.crop_size=0: must be an integer >= 1 (pixels)'),
    'data__val_fraction': (1.0, 'config.data.val_fraction=1.0: must be a number in [0, 1)'),
    'data__normalization': ('magic', "config.data.normalization='magic' is not a method; "
                            'valid: auto, clahe_zscore, clahe_unit, percentile, zscore, '
                            'reference_clahe_zscore, reference_clahe_unit'),
    'data__pixel_size': (-0.1, 'config.data.pixel_size=-0.1: must be a number >= 0 '
                         '(micrometres per pixel; 0 = unknown)'),
    'data__flips': (1, 'config.data.flips=1: must be True or False'),
    'data__augment': ('noise,sharpen', "config.data.augment='noise,sharpen': 'sharpen' is not "
                      'an augmentation; valid: intensity, noise, blur, scale, illumination, '
                      "invert, dim or all (all but invert, dim), comma-separated ('' = off)"),
    'data__dim_range': ((0.5, 0.2), 'config.data.dim_range=(0.5, 0.2): must be two factors '
                        '(low, high) with 0 < low <= high <= 1, e.g. (0.15, 0.7)'),
    'data__ignore_value': (0, 'config.data.ignore_value=0: must be -1 (none) or a positive '
                           'integer mask value (e.g. 2) marking unlabelled pixels'),
    'data__num_workers': (-1, 'config.data.num_workers=-1: must be an integer >= 0'),
    'data__channel': (-2, 'config.data.channel=-2: must be an integer >= -1 (a channel '
                      'number; -1: single-channel images)'),
    'model__width': (0, 'config.model.width=0: must be an integer >= 1'),
    'model__num_classes': (2, 'config.model.num_classes=2: must be 1 (one foreground logit)'),
    'model__fusion_kwargs': (8, 'config.model.fusion_kwargs=8: must be a section of fields '
                             '(--config.model.fusion_kwargs.<name>=...)'),
    'model__instance_head': ('stardist', "config.model.instance_head='stardist' is not an "
                             "instance head; valid: '', distance"),
    'train__num_epochs': (-1, 'config.train.num_epochs=-1: must be an integer >= 0'),
    'train__num_steps': (2.5, 'config.train.num_steps=2.5: must be an integer >= 0 (0: use '
                         'num_epochs)'),
    'train__batch_size': (0, 'config.train.batch_size=0: must be an integer >= 1'),
    'train__loss_weights': ((1.0, -1.0), 'config.train.loss_weights=(1.0, -1.0): must be a '
                            'tuple of numbers >= 0, one per loss term (() = all 1)'),
    'train__dtype': ('float16', "config.train.dtype='float16' is not a dtype; valid: float32, "
                     'bfloat16'),
    'train__log_every_steps': (0, 'config.train.log_every_steps=0: must be an integer >= 1 '
                               '(steps)'),
    'train__checkpoint_every_steps': (-1, 'config.train.checkpoint_every_steps=-1: must be an '
                                      'integer >= 0 (0: at every evaluation)'),
    'train__max_checkpoints': (0, 'config.train.max_checkpoints=0: must be an integer >= 1'),
    'train__resume_mismatch': ('force', "config.train.resume_mismatch='force' is not valid; "
                               'valid: refuse, allow'),
    'train__early_stop_patience': (True, 'config.train.early_stop_patience=True: must be an '
                                   'integer >= 0 (0: off)'),
    'train__instance_weight': (-0.5, 'config.train.instance_weight=-0.5: must be a number >= '
                               '0'),
    'optim__name': ('lion', "config.optim.name='lion' is not an optimiser; valid names: sgd, "
                    'adam, adamw'),
    'optim__lr': (0.0, 'config.optim.lr=0.0: must be a number > 0'),
    'optim__momentum': (1.0, 'config.optim.momentum=1.0: must be a number in [0, 1)'),
    'optim__weight_decay': (-1e-4, 'config.optim.weight_decay=-0.0001: must be a number >= 0'),
    'optim__schedule': ('linear', "config.optim.schedule='linear' is not a schedule; valid "
                        'names: step, cosine, poly, constant'),
    'optim__decay_epochs': (0.0, 'config.optim.decay_epochs=0.0: must be a number > 0'),
    'optim__decay_rate': (0.0, 'config.optim.decay_rate=0.0: must be a number in (0, 1]'),
    'optim__end_lr_factor': (1.5, 'config.optim.end_lr_factor=1.5: must be a number in [0, 1]'),
    'optim__power': (-1.0, 'config.optim.power=-1.0: must be a number > 0'),
    'optim__warmup_steps': (-10, 'config.optim.warmup_steps=-10: must be an integer >= 0'),
    'optim__grad_clip': (math.inf, 'config.optim.grad_clip=inf: must be a number >= 0 (0: '
                         'off)'),
    'eval__every_steps': (0, 'config.eval.every_steps=0: must be an integer >= 1 (steps)'),
    'eval__batch_size': (-8, 'config.eval.batch_size=-8: must be an integer >= 1'),
    'eval__threshold': (math.nan, 'config.eval.threshold=nan: must be a number in [0, 1]'),
    'eval__calibrate_metric': ('auc', "config.eval.calibrate_metric='auc' is not a per-image "
                               'overlap metric; valid: iou, dice, f1, precision, recall, '
                               "accuracy, specificity, iou_bg, miou, or '' to keep "
                               'config.eval.threshold'),
    'eval__seed_dynamic': (-0.1, 'config.eval.seed_dynamic=-0.1: must be a number in [0, 1] '
                           '(of the normalised distance)'),
    'eval__min_size': ('16', "config.eval.min_size='16': must be an integer >= 0 (pixels)"),
}


@pytest.mark.parametrize('field', BAD)
def test_a_bad_value_is_one_line_naming_field_and_valid_range(field):
  value, line = BAD[field]
  assert _error(_with(**{field: value})) == line


@pytest.mark.parametrize('changes, line', [
    ({'data__crop_size': 512}, 'config.data.crop_size=512 is larger than the simulated images '
     '(config.data.synthetic_size=256); set it to at most 256'),
    ({'data__kind': 'golgi'}, "config.data.kind='golgi' is not a kind; valid: er, mito, "
     'nucleus (simulated data needs one)'),
    ({'data__source': 'lists', 'data__train_list': 'l.txt', 'data__kind': 'golgi'},
     "config.data.kind='golgi' is not a kind; valid: er, mito, nucleus "
     '(config.data.normalization=auto needs one)'),
    ({'train__num_steps': 0, 'train__num_epochs': 0}, 'config.train.num_steps=0 and '
     'config.train.num_epochs=0: no training; set one of them to at least 1'),
    ({'train__loss_weights': (1.0,)}, 'config.train.loss_weights=(1.0,) has 1 weights'),
    ({'data__synthetic_fraction': 0.5}, 'config.data.synthetic_fraction=0.5 mixes simulated '
     "images into real ones: it needs config.data.source=lists or object_masks (not "
     "'synthetic')"),
    ({'data__source': 'lists', 'data__train_list': 'l.txt', 'data__kind': 'golgi',
      'data__normalization': 'zscore', 'data__synthetic_fraction': 0.5},
     'config.data.synthetic_fraction=0.5 mixes simulated images'),
    ({'eval__measure_diameter': True}, 'config.eval.measure_diameter=True resizes images so '
     'their objects match config.data.object_diameter, which is 0 (not recorded); set it in '
     'pixels'),
])
def test_fields_that_go_together(changes, line):
  assert _error(_with(**changes)).startswith(line)


def test_lists_with_an_explicit_normalization_take_any_kind():
  config_checks.validate(_with(data__source='lists', data__train_list='l.txt',
                               data__kind='cells', data__normalization='zscore'))


@pytest.mark.parametrize('changes, start', [
    ({'model__name': 'unett'}, "config.model.name='unett' is not a model; valid names: agnet, "),
    ({'model__variant': 'lowlevl'}, "config.model.variant='lowlevl' is not a variant of "
     "'unet'; valid variants: original"),
    ({'model__fusion': 'sum'}, "config.model.fusion='sum' is not a fusion operator; valid "
     'names: add, '),
    ({'model__name': 'deeplabv3p', 'model__backbone': 'vgg'},
     "config.model.backbone='vgg' is not a backbone of deeplabv3p"),
    ({'train__loss': 'bce+dcie'}, "config.train.loss='bce+dcie': 'dcie' is not a loss; valid "
     'names: bce, '),
])
def test_names_resolve_as_training_resolves_them(changes, start):
  assert _error(_with(**changes)).startswith(start)
