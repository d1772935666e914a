"""Segmentation losses, as pure functions, and the training loss that a config names.

`LOSSES` holds two kinds of loss, both named by `config.train.loss` (terms joined by +):
  pixel losses   loss(logits, targets, valid=None) -> scalar float32, on logits (N, H, W, 1)
                 float, targets (N, H, W, 1) in {0, 1} and an optional pixel weight map
                 `valid` (N, H, W, 1) (0 on padding), averaged over the batch. Training
                 applies them to the foreground logit (channel 0) of the final output and of
                 every side output and averages (deep supervision, as the reference). Region
                 losses (soft IoU, Dice) are computed per image and averaged, as the
                 reference does. Registered with `@register_loss('name')`.
  output losses  loss(logits, aux, batch) -> scalar float32: they see the model's whole
                 output, logits (N, H, W, C) with every channel (an instance head's too) and
                 its aux dict ('side_outputs', 'skips', 'bottleneck', ...; see
                 flmiseg/models/__init__.py), and the training batch: 'image', 'mask' and
                 'valid' (N, H, W, 1) float32, and 'distance' with an instance head.
                 Registered with `@register_loss('name', sees_outputs=True)`; the instance
                 head's loss ('distance') is one.
`make_loss('bce+dice', weights)` builds a `Loss`, the weighted sum of the named terms, called
as loss(logits, aux, batch); `from_config(config)` is the loss a config trains: its
config.train.loss plus the loss of its instance head. A loss of your own is one decorated
function in a file that `config.imports` names; `--config.train.loss=name` (or `bce+name`)
then trains with it (docs/fusion.md).
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from flmiseg.core import registry
from flmiseg.core.errors import UserError

# loss(logits, targets, valid=None) or loss(logits, aux, batch) -> scalar float32 (see the
# module docstring).
LossFn = Callable[..., jax.Array]
_EPS = 1e-6

# config.train.loss term -> loss function; filled by `register_loss`.
LOSSES = registry.Registry('loss', 'config.train.loss')

# The loss functions registered with sees_outputs=True (they take logits, aux, batch).
_SEES_OUTPUTS: set[LossFn] = set()

# config.model.instance_head -> the registered loss that trains it; `from_config` adds it.
HEAD_LOSSES = {'distance': 'distance'}


def register_loss(name: str, *, sees_outputs: bool = False,
                  override: bool = False) -> Callable[[LossFn], LossFn]:
  """Decorator: registers a loss function as the loss term `name`; returns it unchanged.

  The function is a pixel loss, loss(logits, targets, valid=None) -> scalar, or with
  `sees_outputs` an output loss, loss(logits, aux, batch) -> scalar (the module docstring).
  Raises ValueError when `name` is taken (unless `override`, which replaces it) or contains
  '+', which joins the terms of `config.train.loss`.
  """
  if isinstance(name, str) and '+' in name:
    raise ValueError(f'a loss name cannot contain "+" (it joins loss terms), got {name!r}')

  def register(fn: LossFn) -> LossFn:
    LOSSES.add(name, fn, override=override)
    if sees_outputs:
      _SEES_OUTPUTS.add(fn)
    return fn
  return register


def sees_outputs(fn: LossFn) -> bool:
  """Whether `fn` was registered as an output loss, loss(logits, aux, batch)."""
  return fn in _SEES_OUTPUTS


def _prep(logits, targets, valid):
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  valid = jnp.ones_like(logits) if valid is None else valid.astype(jnp.float32)
  return logits, targets, valid


def _pixel_mean(values, valid):
  return jnp.sum(values * valid) / jnp.maximum(jnp.sum(valid), 1.0)


@register_loss('bce')
def bce(logits, targets, valid=None):
  """Binary cross-entropy, mean over valid pixels."""
  logits, targets, valid = _prep(logits, targets, valid)
  return _pixel_mean(optax.sigmoid_binary_cross_entropy(logits, targets), valid)


@register_loss('wbce')
def weighted_bce(logits, targets, valid=None):
  """Class-balanced BCE: each class weighted by the other's frequency in the batch."""
  logits, targets, valid = _prep(logits, targets, valid)
  num_valid = jnp.maximum(jnp.sum(valid), 1.0)
  pos_fraction = jnp.sum(targets * valid) / num_valid
  weights = jnp.where(targets > 0.5, 1.0 - pos_fraction, pos_fraction)
  return _pixel_mean(weights * optax.sigmoid_binary_cross_entropy(logits, targets), valid)


@register_loss('focal')
def focal(logits, targets, valid=None, alpha: float = 0.25, gamma: float = 2.0):
  """Focal loss (Lin et al. 2017), alpha for the foreground, mean over valid pixels."""
  logits, targets, valid = _prep(logits, targets, valid)
  return _pixel_mean(optax.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma),
                     valid)


@register_loss('soft_iou')
def soft_iou(logits, targets, valid=None):
  """The reference's soft IoU: 1 - sum(p*y) / (sum(p*p + y) - sum(p*y)), per image."""
  logits, targets, valid = _prep(logits, targets, valid)
  p = jax.nn.sigmoid(logits) * valid
  y = targets * valid
  inter = jnp.sum(p * y, axis=(1, 2, 3))
  union = jnp.sum(p * p + y, axis=(1, 2, 3)) - inter
  return jnp.mean(1.0 - inter / (union + _EPS))


@register_loss('dice')
def dice(logits, targets, valid=None):
  """Soft Dice loss: 1 - 2 sum(p*y) / (sum(p) + sum(y)), per image."""
  logits, targets, valid = _prep(logits, targets, valid)
  p = jax.nn.sigmoid(logits) * valid
  y = targets * valid
  inter = jnp.sum(p * y, axis=(1, 2, 3))
  total = jnp.sum(p + y, axis=(1, 2, 3))
  return jnp.mean(1.0 - 2.0 * inter / (total + _EPS))


@register_loss('l1')
def l1(logits, targets, valid=None):
  """Mean absolute error between probabilities and targets."""
  logits, targets, valid = _prep(logits, targets, valid)
  return _pixel_mean(jnp.abs(jax.nn.sigmoid(logits) - targets), valid)


@register_loss('mse')
def mse(logits, targets, valid=None):
  """Mean squared error between probabilities and targets."""
  logits, targets, valid = _prep(logits, targets, valid)
  return _pixel_mean(jnp.square(jax.nn.sigmoid(logits) - targets), valid)


@register_loss('distance', sees_outputs=True)
def instance_distance(logits, aux, batch):
  """The instance head's loss (config.model.instance_head='distance',
  flmiseg/objects/instances.py): BCE of channel 1 of the final output against the batch's
  normalised distance target 'distance' (N, H, W, 1) in [0, 1], mean over valid pixels.

  BCE with the soft target: its gradient is sigmoid - target, as a squared error's would be,
  without vanishing where the sigmoid saturates. The side outputs are trained on their
  foreground logit only, so `aux` is not read.
  """
  del aux
  return bce(logits[..., 1:2], batch['distance'], batch.get('valid'))


@dataclasses.dataclass(frozen=True)
class Term:
  """One term of a `Loss`: `weight` times the loss registered as `name` (its function `fn`;
  `sees_outputs`: fn(logits, aux, batch), else fn(logits, targets, valid))."""
  name: str
  weight: float
  fn: LossFn
  sees_outputs: bool


@dataclasses.dataclass(frozen=True)
class Loss:
  """A weighted sum of loss terms, called on a model's outputs and the batch:
  loss(logits, aux, batch) -> scalar float32.

  The pixel terms are applied to the foreground logit (channel 0) of the final output and of
  every side output against batch['mask'] (weighted by batch['valid']) and averaged over
  those outputs (`total_loss`); the output terms to (logits, aux, batch) as they are.
  """
  terms: tuple[Term, ...]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.terms)

  def pixels(self, logits, targets, valid=None):
    """The weighted sum of the pixel terms on one output (N, H, W, 1) (0 when none)."""
    return sum(t.weight * t.fn(logits, targets, valid)
               for t in self.terms if not t.sees_outputs)

  def __call__(self, logits, aux: dict, batch: dict):
    loss = 0.0
    if any(not t.sees_outputs for t in self.terms):
      loss = total_loss(self.pixels, logits[..., :1], semantic_side_outputs(aux),
                        batch['mask'], batch.get('valid'))
    for t in self.terms:
      if t.sees_outputs:
        loss = loss + t.weight * t.fn(logits, aux, batch)
    return loss

  def plus(self, name: str, weight: float = 1.0) -> 'Loss':
    """This loss with the registered loss `name` added, `weight` times."""
    fn = LOSSES.resolve(name)
    return Loss(self.terms + (Term(name, weight, fn, sees_outputs(fn)),))


def _split(spec: str) -> list[str]:
  return [n.strip() for n in spec.split('+')]


def check_spec(spec: str, weights: Sequence[float] = ()) -> None:
  """Raises UserError naming config.train.loss or .loss_weights when a term of `spec` ('name'
  or 'name+name+...') is not a registered loss, or the weights (none: 1 each) do not match
  the terms; builds nothing (config_checks calls it before a training loads its data)."""
  names = _split(spec)
  for name in names:
    if name not in LOSSES:
      raise UserError(f'config.train.loss={spec!r}: {name!r} is not a loss; valid names: '
                      f'{", ".join(LOSSES)} (combine with +, e.g. bce+dice)')
  if weights and len(weights) != len(names):
    raise UserError(f'config.train.loss_weights={tuple(weights)} has {len(weights)} weights '
                    f'for the {len(names)} terms of {spec!r}')


def make_loss(spec: str, weights: Sequence[float] = ()) -> Loss:
  """The `Loss` of 'name' or 'name+name+...' (registered names), with optional weights
  (default 1 each); `check_spec`'s errors for a bad name or weights."""
  check_spec(spec, weights)
  names = _split(spec)
  weights = tuple(weights) or (1.0,) * len(names)
  return Loss(tuple(Term(n, w, LOSSES[n], sees_outputs(LOSSES[n]))
                    for n, w in zip(names, weights)))


def as_loss(loss_fn: Loss | LossFn) -> Loss:
  """`loss_fn` as a `Loss`: a Loss as it is, a registered or plain loss function as a Loss of
  that one term (weight 1; a function not registered as an output loss is a pixel loss)."""
  if isinstance(loss_fn, Loss):
    return loss_fn
  name = next((n for n, fn in LOSSES.items() if fn is loss_fn),
              getattr(loss_fn, '__name__', 'loss'))
  return Loss((Term(name, 1.0, loss_fn, sees_outputs(loss_fn)),))


def from_config(config, loss: Loss | LossFn | None = None) -> Loss:
  """The loss `config` trains: config.train.loss weighted by config.train.loss_weights, plus
  the loss of the instance head config.model.instance_head names (HEAD_LOSSES) weighted by
  config.train.instance_weight (no such term at weight 0: a fine-tuning on binary masks
  trains no head, and its batches carry no distance target).

  Args:
    config: the whole config (reads .train.loss, .loss_weights, .instance_weight and
      .model.instance_head).
    loss: the config.train.loss part, already built (`make_loss`; a loss function is taken
      as `as_loss` takes it), or None to build it. The head's loss is added unless `loss`
      has it already, so a loss that this function returned passes through unchanged.
  Raises:
    UserError naming the setting for an unknown loss, weights that do not match its terms,
    or config.train.loss naming an instance head's loss (the head adds it itself).
  """
  spec = config.train.loss
  for name in _split(spec):
    if name in HEAD_LOSSES.values():
      head = next(h for h, n in HEAD_LOSSES.items() if n == name)
      raise UserError(f'config.train.loss={spec!r}: {name!r} is the loss of the instance head '
                      f'{head!r}, which adds it itself (--config.model.instance_head={head}, '
                      'weighted by config.train.instance_weight); leave it out')
  loss = make_loss(spec, config.train.loss_weights) if loss is None else as_loss(loss)
  head_loss = HEAD_LOSSES.get(config.model.get('instance_head', ''))
  weight = config.train.get('instance_weight', 1.0)
  if head_loss and weight and head_loss not in loss.names:
    loss = loss.plus(head_loss, weight)
  return loss


def semantic_side_outputs(aux: dict) -> dict:
  """aux with its side outputs cut to their foreground logit (channel 0)."""
  if 'side_outputs' not in aux:
    return aux
  return {**aux, 'side_outputs': [o[..., :1] for o in aux['side_outputs']]}


def total_loss(loss_fn: LossFn, logits, aux: dict, targets, valid=None):
  """Mean of the pixel loss loss_fn over the final output and aux['side_outputs'] (deep
  supervision)."""
  outputs = [logits] + list(aux.get('side_outputs', []))
  return sum(loss_fn(o, targets, valid) for o in outputs) / len(outputs)
