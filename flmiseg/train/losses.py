"""Segmentation losses on logits, as pure functions.

Every loss takes logits (N, H, W, 1) float, targets (N, H, W, 1) in {0, 1} and an optional
pixel weight map `valid` (N, H, W, 1) (0 on padding), and returns a scalar float32 averaged
over the batch. Region losses (soft IoU, Dice) are computed per image and averaged, as the
reference does. `make_loss('bce+dice', weights)` builds weighted sums of the losses registered
in `LOSSES` (`config.train.loss`); `total_loss` averages a loss over the model's final and side
outputs (deep supervision), as the reference does. A loss of your own is a function with the
signature above decorated with `@register_loss('name')`, in a file that `config.imports`
names; `--config.train.loss=name` (or `bce+name`) then trains with it.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from flmiseg.core import registry
from flmiseg.core.errors import UserError

# loss(logits, targets, valid=None) -> scalar float32 (see the module docstring).
LossFn = Callable[..., jax.Array]
_EPS = 1e-6

# config.train.loss term -> loss function; filled by `register_loss`.
LOSSES = registry.Registry('loss', 'config.train.loss')


def register_loss(name: str, *, override: bool = False) -> Callable[[LossFn], LossFn]:
  """Decorator: registers loss(logits, targets, valid=None) -> scalar as a loss term `name`.

  Raises ValueError when `name` is taken (unless `override`, which replaces it) or contains
  '+', which joins the terms of `config.train.loss`.
  """
  if isinstance(name, str) and '+' in name:
    raise ValueError(f'a loss name cannot contain "+" (it joins loss terms), got {name!r}')
  return LOSSES.decorator(name, override=override)


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


def make_loss(spec: str, weights: Sequence[float] = ()) -> LossFn:
  """A loss from 'name' or 'name+name+...', with optional weights (default 1 each)."""
  names = [n.strip() for n in spec.split('+')]
  for name in names:
    if name not in LOSSES:
      raise UserError(f'config.train.loss={spec!r}: {name!r} is not a loss; valid names: '
                      f'{", ".join(LOSSES)} (combine with +, e.g. bce+dice)')
  weights = tuple(weights) or (1.0,) * len(names)
  if len(weights) != len(names):
    raise UserError(f'config.train.loss_weights={tuple(weights)} has {len(weights)} weights '
                    f'for the {len(names)} terms of {spec!r}')
  fns = [LOSSES[n] for n in names]

  def loss(logits, targets, valid=None):
    return sum(w * fn(logits, targets, valid) for w, fn in zip(weights, fns))

  return loss


def total_loss(loss_fn: LossFn, logits, aux: dict, targets, valid=None):
  """Mean of loss_fn over the final output and aux['side_outputs'] (deep supervision)."""
  outputs = [logits] + list(aux.get('side_outputs', []))
  return sum(loss_fn(o, targets, valid) for o in outputs) / len(outputs)
