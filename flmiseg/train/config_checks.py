"""Every config field's rule, and the config checked once: `validate(config)`.

Every field of flmiseg/configs/default.py has a rule in `RULES`: its check (type and range)
and its role, which says who may change it:
  MODEL     defines the network or what it sees (eval/predict refuse another value, and name
            these fields first);
  TRAINING  the default: a setting of the training (eval/predict and a resumed run refuse
            another value);
  INFERENCE an inference setting (eval/predict may take it from the command line; a resumed
            run refuses another value): the test set, the data's channel;
  RUN       a setting of this process, not of the model (eval/predict may change it, and so
            may a resumed run): the evaluation, logging, workers.
So a new field needs its default (with its comment) in flmiseg/configs/default.py and its rule
here, nothing else. The run directory's `rundir.inference_config` and the trainer's resume check
take the roles from here (`INFERENCE_FIELDS`, `MODEL_FIELDS`, `may_differ_on_resume`).

`validate` checks each field, then the fields that depend on each other together
(`_check_consistency`), then resolves the model's names (model, variant, fusion operator and
its fields, backbone, instance head) as training will, in the registries that `config.imports`
may have added to. The first invalid value raises a UserError of one line naming the field, the
value and what is valid, before anything is built, loaded or written. The loss is built, and
its names resolved, once, by the trainer (`trainer.make_loss`): inference needs no loss.

The library's modules raise ValueError for a bad argument (a Python API user sees where); the
command line and `trainer.train_and_evaluate` call `validate` first, so there those are never
reached. Fields a config holds that are not in `RULES` (a run directory made by another
version) are left alone.
"""

import dataclasses
import math
from typing import Callable

import ml_collections
import numpy as np

from flmiseg.store import weights
from flmiseg.objects import instances
from flmiseg.evaluation import calibration
from flmiseg import models
from flmiseg.train import optim
from flmiseg.data import loader
from flmiseg.data import pipeline
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.core.errors import UserError

MAX_SEED = 2 ** 31 - 1
MIN_SYNTHETIC_SIZE = 16  # the simulator's smallest image side

# config.train.resume_mismatch: 'refuse' (or 'allow') a workdir made by another config.
RESUME_MISMATCH = ('refuse', 'allow')

# A check takes (field, value) and returns what is wrong ('' when nothing is).
Check = Callable[[str, object], str]
# The roles of a field (the module docstring); eval/predict may set those of INFERENCE_ROLES.
MODEL, TRAINING, INFERENCE, RUN = 'model', 'training', 'inference', 'run'
INFERENCE_ROLES = (INFERENCE, RUN)


@dataclasses.dataclass(frozen=True)
class Rule:
  """A field's check and its role (MODEL, TRAINING, INFERENCE or RUN)."""
  check: Check
  role: str


def model(check: Check) -> Rule:
  """The rule of a field that defines the network or what it sees."""
  return Rule(check, MODEL)


def training(check: Check) -> Rule:
  """The rule of a setting of the training."""
  return Rule(check, TRAINING)


def inference(check: Check) -> Rule:
  """The rule of an inference setting, which eval/predict may take from the command line."""
  return Rule(check, INFERENCE)


def run_setting(check: Check) -> Rule:
  """The rule of a setting of the process, which eval/predict and a resumed run may change."""
  return Rule(check, RUN)


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


def integer(low: int | None = None, high: int | None = None, note: str = '') -> Check:
  """An int (not a bool) in [low, high] (None: unbounded); `note` explains the range."""
  valid = (f'{low}' if low is not None and low == high else
           f'an integer {_range_text(low, high, False, False)}'.strip()) + note

  def rule(field, value):
    ok = _is_int(value) and _in_range(value, low, high, False, False)
    return '' if ok else f'config.{field}={value!r}: must be {valid}'
  return rule


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, note: str = '') -> Check:
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


def choice(values, what: str = 'valid', label: str = 'valid') -> Check:
  """One of the strings `values`: else "config.<field>=<value> is not <what>; <label>: ..."."""
  values = tuple(values)

  def rule(field, value):
    if isinstance(value, str) and value in values:
      return ''
    return (f'config.{field}={value!r} is not {what}; {label}: '
            f'{", ".join(repr(v) if v == "" else v for v in values)}')
  return rule


def _raised(check: Callable[[object], object], value) -> str:
  """The message of the ValueError `check(value)` raises ('' when it raises none)."""
  try:
    check(value)
  except ValueError as e:
    return str(e)
  return ''


def augment(field, value) -> str:
  return _raised(pipeline.parse_augment, value)


def scale_range(field, value) -> str:
  ok = (isinstance(value, (tuple, list)) and len(value) == 2 and
        all(_is_number(v) and v > 0 for v in value) and value[0] <= value[1])
  return '' if ok else (f'config.{field}={value!r}: must be two zoom factors (low, high) with '
                        '0 < low <= high, e.g. (0.5, 2.0)')


def dim_range(field, value) -> str:
  ok = (isinstance(value, (tuple, list)) and len(value) == 2 and
        all(_is_number(v) and 0 < v <= 1 for v in value) and value[0] <= value[1])
  return '' if ok else (f'config.{field}={value!r}: must be two factors (low, high) with '
                        '0 < low <= high <= 1, e.g. (0.15, 0.7)')


def dim_gain(field, value) -> str:
  if _is_number(value) and not isinstance(value, bool) and (value == 0 or value > 1):
    return ''
  return f'config.{field}={value!r}: must be 0 (off) or a gain above 1 (e.g. 4)'


def ignore_value(field, value) -> str:
  if _is_int(value) and (value == -1 or value >= 1):
    return ''
  return (f'config.{field}={value!r}: must be -1 (none) or a positive integer mask value '
          '(e.g. 2) marking unlabelled pixels')


def calibrate_metric(field, value) -> str:
  return _raised(calibration.check_calibrate_metric, value)


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

# Field -> rule (its check and its role), for every field of flmiseg/configs/default.py.
RULES: dict[str, Rule] = {
    'seed': training(_SEED),
    'imports': training(text),  # code, not a setting: rundir.CODE_FIELDS
    'authors': inference(text),  # they describe the model: --mode=export may set them
    'license': inference(text),
    'data.source': inference(choice(loader.SOURCES, 'a source')),
    'data.seed': training(_SEED),
    'data.kind': model(text),  # a kind where it matters: `_check_consistency`
    'data.train_list': training(text),
    'data.test_list': inference(text),
    'data.val_list': training(text),
    'data.synthetic_fraction': training(number(0, 1, high_open=True,
                                               note=' (0: real images only)')),
    'data.synthetic_dir': run_setting(text),
    'data.num_synthetic_train': training(integer(1)),
    'data.num_synthetic_test': inference(integer(1)),
    'data.synthetic_size': training(integer(MIN_SYNTHETIC_SIZE, note=' (pixels)')),
    'data.synthetic_params': inference(choice(('default',) + synthetic.RANDOMIZE)),
    'data.synthetic_masks': inference(choice(simulate.MASKS)),
    'data.crop_size': model(integer(1, note=' (pixels)')),
    'data.val_fraction': training(number(0, 1, high_open=True)),
    'data.normalization': model(choice(preprocess.METHODS, 'a method')),
    'data.pixel_size': model(number(0, note=' (micrometres per pixel; 0 = unknown)')),
    'data.object_diameter': training(number(0, note=' (pixels; 0 = not recorded)')),
    'data.flips': training(boolean),
    'data.augment': training(augment),
    'data.scale_range': training(scale_range),
    'data.dim_range': training(dim_range),
    'data.ignore_value': inference(ignore_value),
    'data.channel': inference(integer(-1, note=' (a channel number; -1: single-channel '
                                               'images)')),
    'data.num_workers': run_setting(integer(0)),
    'model.name': model(text),  # resolved with the variant, fusion and backbone: _check_names
    'model.variant': model(text),
    'model.width': model(integer(1)),
    'model.fusion': model(text),
    'model.fusion_kwargs': model(section),
    'model.backbone': model(text),
    'model.backbone_kwargs': model(section),
    'model.num_classes': model(integer(1, 1, note=' (one foreground logit)')),
    'model.instance_head': model(choice(instances.HEADS, 'an instance head')),
    'train.num_epochs': training(integer(0)),
    'train.num_steps': training(integer(0, note=' (0: use num_epochs)')),
    'train.batch_size': training(integer(1)),
    'train.loss': training(text),  # its terms: trainer.make_loss
    'train.loss_weights': training(loss_weights),
    'train.dtype': model(choice(weights.DTYPES, 'a dtype')),
    'train.log_every_steps': run_setting(_STEPS),
    'train.checkpoint_every_steps': training(integer(0, note=' (0: at every evaluation)')),
    'train.max_checkpoints': training(integer(1)),
    'train.resume_mismatch': run_setting(choice(RESUME_MISMATCH)),
    'train.init_from': training(text),
    'train.early_stop_patience': training(integer(0, note=' (0: off)')),
    'train.freeze_batch_stats': training(boolean),
    'train.instance_weight': training(number(0)),
    'optim.name': training(choice(optim.OPTIMIZERS, 'an optimiser', 'valid names')),
    'optim.lr': training(number(0, low_open=True)),
    'optim.momentum': training(number(0, 1, high_open=True)),
    'optim.weight_decay': training(number(0)),
    'optim.schedule': training(choice(optim.SCHEDULES, 'a schedule', 'valid names')),
    'optim.decay_epochs': training(number(0, low_open=True)),
    'optim.decay_rate': training(number(0, 1, low_open=True)),
    'optim.end_lr_factor': training(number(0, 1)),
    'optim.power': training(number(0, low_open=True)),
    'optim.warmup_steps': training(integer(0)),
    'optim.grad_clip': training(number(0, note=' (0: off)')),
    'eval.every_steps': run_setting(_STEPS),
    'eval.batch_size': run_setting(integer(1)),
    'eval.threshold': run_setting(number(0, 1)),
    'eval.calibrate_metric': run_setting(calibrate_metric),
    'eval.seed_dynamic': run_setting(number(0, 1, note=' (of the normalised distance)')),
    'eval.min_size': run_setting(integer(0, note=' (pixels)')),
    'eval.measure_diameter': run_setting(boolean),
    'eval.dim_gain': run_setting(dim_gain),
}


def fields_with_role(*roles: str) -> tuple[str, ...]:
  """The fields whose rule has one of `roles`, as prefixes: 'eval.' for a section whose every
  field has one (a field another version added there counts too), 'model.fusion_kwargs.' for
  a free section (its fields are the user's), else the field's name. A key matches a prefix
  that ends in '.' when it starts with it, any other when it equals it (`matches`)."""
  sections = {}
  for field in RULES:
    if '.' in field:
      sections.setdefault(field.split('.')[0], []).append(field)
  whole = [s for s, fields in sections.items() if all(RULES[f].role in roles for f in fields)]
  named = [f + ('.' if RULES[f].check is section else '') for f, rule in RULES.items()
           if rule.role in roles and f.split('.')[0] not in whole]
  return tuple(f'{s}.' for s in whole) + tuple(named)


# The fields eval/predict may take from the command line, and those that define the model
# (rundir.inference_config); those that may differ between runs on one workdir.
INFERENCE_FIELDS = fields_with_role(*INFERENCE_ROLES)
MODEL_FIELDS = fields_with_role(MODEL)
RESUMABLE_FIELDS = fields_with_role(RUN)


def matches(key: str, fields: tuple[str, ...]) -> bool:
  """Whether the dotted `key` is one of `fields` (`fields_with_role`)."""
  return any(key == f or (f.endswith('.') and key.startswith(f)) for f in fields)


def may_differ_on_resume(key: str) -> bool:
  """Whether field `key` may differ between runs on one workdir (role RUN)."""
  return matches(key, RESUMABLE_FIELDS)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError (one line: the field, its value, what is valid) for the first invalid
  field of `config`; returns None when every field is valid.

  Checks each field's type and range (`RULES`), the fields that go together, then resolves
  the model as training will (so registered names of `config.imports` count).
  """
  for field, rule in RULES.items():
    found, value = _lookup(config, field)
    if found:
      problem = rule.check(field, value)
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
  if data.get('synthetic_fraction', 0.0) and (synthetic or data.kind not in simulate.KINDS):
    raise UserError(f'config.data.synthetic_fraction={data.synthetic_fraction:g} mixes '
                    'simulated images into real ones: it needs config.data.source=lists or '
                    f'object_masks (not {data.source!r}) and a simulated kind '
                    f'(config.data.kind: {", ".join(simulate.KINDS)})')
  if synthetic and data.crop_size > data.synthetic_size:
    raise UserError(f'config.data.crop_size={data.crop_size} is larger than the simulated '
                    f'images (config.data.synthetic_size={data.synthetic_size}); set it to at '
                    f'most {data.synthetic_size}')
  if config.eval.get('measure_diameter', False) and not data.get('object_diameter', 0.0):
    raise UserError('config.eval.measure_diameter=True resizes images so their objects match '
                    'config.data.object_diameter, which is 0 (not recorded); set it in pixels')
  if config.eval.get('dim_gain', 0.0) and not data.get('object_diameter', 0.0):
    raise UserError(f'config.eval.dim_gain={config.eval.dim_gain:g} sizes the objects of its '
                    'dim pass by config.data.object_diameter, which is 0 (not recorded); set '
                    'it in pixels')
  if not train.num_steps and not train.num_epochs:
    raise UserError('config.train.num_steps=0 and config.train.num_epochs=0: no training; '
                    'set one of them to at least 1')


def _check_names(config) -> None:
  """Resolves the model (name, variant, fusion operator and its fields, backbone, instance
  head) as training does; its errors name the setting."""
  try:
    models.create_model(config.model, np.float32)
  except (ValueError, TypeError) as e:
    raise UserError(' '.join(str(e).split())) from e
