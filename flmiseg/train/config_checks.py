"""The config checked once, at the command line's boundary: `validate(config)`.

Every field of flmiseg/configs/default.py has a rule in `RULES` (its type and range); then the
fields that depend on each other are checked together (`_check_consistency`), and the names
(model, variant, fusion operator and its fields, backbone, instance head, loss terms) are
resolved as training will resolve them, in the registries that `config.imports` may have
added to. The first invalid value raises a UserError of one line naming the field, the value
and what is valid, before anything is built, loaded or written.

The library's modules raise ValueError for a bad argument (a Python API user sees where);
`flmiseg.main` calls `validate` first, so on the command line those are never reached.
Fields a config holds that are not in `RULES` (a run directory made by another version) are
left alone.
"""

import math
from typing import Callable

import ml_collections
import numpy as np

from flmiseg.store import weights
from flmiseg.objects import instances
from flmiseg.train import losses
from flmiseg.evaluation import metrics
from flmiseg import models
from flmiseg.train import optim
from flmiseg.train import trainer
from flmiseg.data import loader
from flmiseg.data import pipeline
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.core.errors import UserError

MAX_SEED = 2 ** 31 - 1
MIN_SYNTHETIC_SIZE = 16  # the simulator's smallest image side

# A rule takes (field, value) and returns what is wrong ('' when nothing is).
Rule = Callable[[str, object], str]


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
  return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
  """'in [0, 1)', '>= 1', '> 0', ... ('' when unbounded)."""
  show = lambda x: str(x) if isinstance(x, int) else f'{x:g}'
  if low is not None and high is not None:
    return (f'in {"(" if low_open else "["}{show(low)}, {show(high)}'
            f'{")" if high_open else "]"}')
  if low is not None:
    return f'{">" if low_open else ">="} {show(low)}'
  return f'{"<" if high_open else "<="} {show(high)}' if high is not None else ''


def _in_range(value, low, high, low_open: bool, high_open: bool) -> bool:
  return ((low is None or (value > low if low_open else value >= low)) and
          (high is None or (value < high if high_open else value <= high)))


def integer(low: int | None = None, high: int | None = None, note: str = '') -> Rule:
  """An int (not a bool) in [low, high] (None: unbounded); `note` explains the range."""
  valid = (f'{low}' if low is not None and low == high else
           f'an integer {_range_text(low, high, False, False)}'.strip()) + note

  def rule(field, value):
    ok = _is_int(value) and _in_range(value, low, high, False, False)
    return '' if ok else f'config.{field}={value!r}: must be {valid}'
  return rule


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, note: str = '') -> Rule:
  """A finite int or float in the range (open at an end when asked)."""
  valid = f'a number {_range_text(low, high, low_open, high_open)}'.strip() + note

  def rule(field, value):
    ok = _is_number(value) and _in_range(value, low, high, low_open, high_open)
    return '' if ok else f'config.{field}={value!r}: must be {valid}'
  return rule


def boolean(field, value) -> str:
  if isinstance(value, (bool, np.bool_)):
    return ''
  return f'config.{field}={value!r}: must be True or False'


def text(field, value) -> str:
  return '' if isinstance(value, str) else f'config.{field}={value!r}: must be a string'


def choice(values, what: str = 'valid', label: str = 'valid') -> Rule:
  """One of the strings `values`: else "config.<field>=<value> is not <what>; <label>: ..."."""
  values = tuple(values)

  def rule(field, value):
    if isinstance(value, str) and value in values:
      return ''
    return (f'config.{field}={value!r} is not {what}; {label}: '
            f'{", ".join(repr(v) if v == "" else v for v in values)}')
  return rule


def augment(field, value) -> str:
  try:
    pipeline.parse_augment(value)
  except ValueError as e:
    return str(e)
  return ''


def ignore_value(field, value) -> str:
  if _is_int(value) and (value == -1 or value >= 1):
    return ''
  return (f'config.{field}={value!r}: must be -1 (none) or a positive integer mask value '
          '(e.g. 2) marking unlabelled pixels')


def calibrate_metric(field, value) -> str:
  if isinstance(value, str) and (not value or value in metrics.OVERLAP_NAMES):
    return ''
  return (f'config.{field}={value!r} is not a per-image overlap metric; valid: '
          f'{", ".join(metrics.OVERLAP_NAMES)}, or \'\' to keep config.eval.threshold')


def loss_weights(field, value) -> str:
  ok = isinstance(value, (tuple, list)) and all(_is_number(w) and w >= 0 for w in value)
  return '' if ok else (f'config.{field}={value!r}: must be a tuple of numbers >= 0, one per '
                        'loss term (() = all 1)')


def section(field, value) -> str:
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return ''
  return f'config.{field}={value!r}: must be a section of fields (--config.{field}.<name>=...)'


_SEED = integer(0, MAX_SEED)
_STEPS = integer(1, note=' (steps)')

# Field -> rule, for every field of flmiseg/configs/default.py.
RULES: dict[str, Rule] = {
    'seed': _SEED,
    'imports': text,
    'authors': text,
    'license': text,
    'data.source': choice(loader.SOURCES, 'a source'),
    'data.seed': _SEED,
    'data.kind': text,  # a kind where it matters: `_check_consistency`
    'data.train_list': text,
    'data.test_list': text,
    'data.val_list': text,
    'data.synthetic_fraction': number(0, 1, high_open=True, note=' (0: real images only)'),
    'data.synthetic_dir': text,
    'data.num_synthetic_train': integer(1),
    'data.num_synthetic_test': integer(1),
    'data.synthetic_size': integer(MIN_SYNTHETIC_SIZE, note=' (pixels)'),
    'data.synthetic_params': choice(('default',) + simulate.RANDOMIZE),
    'data.synthetic_masks': choice(simulate.MASKS),
    'data.crop_size': integer(1, note=' (pixels)'),
    'data.val_fraction': number(0, 1, high_open=True),
    'data.normalization': choice(preprocess.METHODS, 'a method'),
    'data.pixel_size': number(0, note=' (micrometres per pixel; 0 = unknown)'),
    'data.object_diameter': number(0, note=' (pixels; 0 = not recorded)'),
    'data.flips': boolean,
    'data.augment': augment,
    'data.ignore_value': ignore_value,
    'data.channel': integer(-1, note=' (a channel number; -1: single-channel images)'),
    'data.num_workers': integer(0),
    'model.name': text,  # resolved with the variant, fusion and backbone in create_model
    'model.variant': text,
    'model.width': integer(1),
    'model.fusion': text,
    'model.fusion_kwargs': section,
    'model.backbone': text,
    'model.backbone_kwargs': section,
    'model.num_classes': integer(1, 1, note=' (one foreground logit)'),
    'model.instance_head': choice(instances.HEADS, 'an instance head'),
    'train.num_epochs': integer(0),
    'train.num_steps': integer(0, note=' (0: use num_epochs)'),
    'train.batch_size': integer(1),
    'train.loss': text,  # its terms: `_check_consistency`
    'train.loss_weights': loss_weights,
    'train.dtype': choice(weights.DTYPES, 'a dtype'),
    'train.log_every_steps': _STEPS,
    'train.checkpoint_every_steps': integer(0, note=' (0: at every evaluation)'),
    'train.max_checkpoints': integer(1),
    'train.resume_mismatch': choice(trainer.RESUME_MISMATCH),
    'train.init_from': text,
    'train.early_stop_patience': integer(0, note=' (0: off)'),
    'train.freeze_batch_stats': boolean,
    'train.instance_weight': number(0),
    'optim.name': choice(optim.OPTIMIZERS, 'an optimiser', 'valid names'),
    'optim.lr': number(0, low_open=True),
    'optim.momentum': number(0, 1, high_open=True),
    'optim.weight_decay': number(0),
    'optim.schedule': choice(optim.SCHEDULES, 'a schedule', 'valid names'),
    'optim.decay_epochs': number(0, low_open=True),
    'optim.decay_rate': number(0, 1, low_open=True),
    'optim.end_lr_factor': number(0, 1),
    'optim.power': number(0, low_open=True),
    'optim.warmup_steps': integer(0),
    'optim.grad_clip': number(0, note=' (0: off)'),
    'eval.every_steps': _STEPS,
    'eval.batch_size': integer(1),
    'eval.threshold': number(0, 1),
    'eval.calibrate_metric': calibrate_metric,
    'eval.seed_dynamic': number(0, 1, note=' (of the normalised distance)'),
    'eval.min_size': integer(0, note=' (pixels)'),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError (one line: the field, its value, what is valid) for the first invalid
  field of `config`; returns None when every field is valid.

  Checks each field's type and range (`RULES`), the fields that go together, then resolves
  the model and the loss as training will (so registered names of `config.imports` count).
  """
  for field, rule in RULES.items():
    found, value = _lookup(config, field)
    if found:
      problem = rule(field, value)
      if problem:
        raise UserError(problem)
  _check_consistency(config)
  _check_names(config)


def _lookup(config, field: str) -> tuple[bool, object]:
  """(True, value) of the dotted `field`, or (False, None) when the config lacks it."""
  node = config
  for part in field.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _check_consistency(config) -> None:
  """The rules between fields."""
  data, train = config.data, config.train
  synthetic = data.source == 'synthetic'
  if (synthetic or data.normalization == 'auto') and data.kind not in simulate.KINDS:
    why = 'simulated data' if synthetic else 'config.data.normalization=auto'
    raise UserError(f'config.data.kind={data.kind!r} is not a kind; valid: '
                    f'{", ".join(simulate.KINDS)} ({why} needs one)')
  if synthetic and data.crop_size > data.synthetic_size:
    raise UserError(f'config.data.crop_size={data.crop_size} is larger than the simulated '
                    f'images (config.data.synthetic_size={data.synthetic_size}); set it to at '
                    f'most {data.synthetic_size}')
  if not train.num_steps and not train.num_epochs:
    raise UserError('config.train.num_steps=0 and config.train.num_epochs=0: no training; '
                    'set one of them to at least 1')


def _check_names(config) -> None:
  """Resolves the model (name, variant, fusion operator and its fields, backbone, instance
  head) and the loss terms and weights as training does; their errors name the setting."""
  try:
    models.create_model(config.model, np.float32)
    losses.from_config(config)
  except (ValueError, TypeError) as e:
    raise UserError(' '.join(str(e).split())) from e
