"""Every loss against a hand computation on a tiny batch; the training loss a config names
(its pixel terms over every output, the instance head's loss) against the formula that
trained before losses saw the model's outputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flmiseg import models
from flmiseg.configs import default
from flmiseg.core.errors import UserError
from flmiseg.objects import instances
from flmiseg.train import losses
from flmiseg.train import steps

# Two pixels per image, two images: logits 0 and ln(3) (p = 0.5, 0.75).
LOGITS = jnp.array([0.0, math.log(3.0), 0.0, math.log(3.0)]).reshape(2, 1, 2, 1)
TARGETS = jnp.array([1.0, 0.0, 1.0, 1.0]).reshape(2, 1, 2, 1)
P = np.array([0.5, 0.75, 0.5, 0.75])
Y = np.array([1.0, 0.0, 1.0, 1.0])


def _bce_terms():
  return -(Y * np.log(P) + (1 - Y) * np.log(1 - P))


def test_bce():
  np.testing.assert_allclose(losses.bce(LOGITS, TARGETS), _bce_terms().mean(), rtol=1e-6)


def test_weighted_bce():
  pos = Y.mean()  # 0.75 positive: positives weighted 0.25, negatives 0.75
  w = np.where(Y > 0, 1 - pos, pos)
  np.testing.assert_allclose(losses.weighted_bce(LOGITS, TARGETS), (w * _bce_terms()).mean(),
                             rtol=1e-6)


def test_focal():
  pt = np.where(Y > 0, P, 1 - P)
  alpha = np.where(Y > 0, 0.25, 0.75)
  expected = (alpha * (1 - pt) ** 2 * -np.log(pt)).mean()
  np.testing.assert_allclose(losses.focal(LOGITS, TARGETS), expected, rtol=1e-5)


def test_soft_iou_reference_formula():
  per_image = []
  for p, y in ((P[:2], Y[:2]), (P[2:], Y[2:])):
    inter = (p * y).sum()
    per_image.append(1 - inter / ((p * p + y).sum() - inter))
  np.testing.assert_allclose(losses.soft_iou(LOGITS, TARGETS), np.mean(per_image), rtol=1e-5)


def test_dice():
  per_image = [1 - 2 * (p * y).sum() / (p.sum() + y.sum())
               for p, y in ((P[:2], Y[:2]), (P[2:], Y[2:]))]
  np.testing.assert_allclose(losses.dice(LOGITS, TARGETS), np.mean(per_image), rtol=1e-5)


def test_l1_mse():
  np.testing.assert_allclose(losses.l1(LOGITS, TARGETS), np.abs(P - Y).mean(), rtol=1e-6)
  np.testing.assert_allclose(losses.mse(LOGITS, TARGETS), ((P - Y) ** 2).mean(), rtol=1e-6)


def test_valid_mask_excludes_padding():
  valid = jnp.array([1.0, 0.0, 1.0, 1.0]).reshape(2, 1, 2, 1)
  keep = np.array([0, 2, 3])
  np.testing.assert_allclose(losses.bce(LOGITS, TARGETS, valid), _bce_terms()[keep].mean(),
                             rtol=1e-6)


def test_weighted_sum_and_errors():
  combined = losses.make_loss('bce+dice', (2.0, 0.5))
  expected = 2.0 * losses.bce(LOGITS, TARGETS) + 0.5 * losses.dice(LOGITS, TARGETS)
  np.testing.assert_allclose(combined.pixels(LOGITS, TARGETS), expected, rtol=1e-6)
  assert combined.names == ('bce', 'dice')
  with pytest.raises(UserError, match="'bcee' is not a loss; valid names: bce"):
    losses.make_loss('bcee')
  with pytest.raises(UserError, match='loss_weights'):
    losses.make_loss('bce+dice', (1.0,))


def test_total_loss_averages_side_outputs():
  aux = {'side_outputs': [jnp.zeros_like(LOGITS)]}
  expected = (losses.bce(LOGITS, TARGETS) + losses.bce(jnp.zeros_like(LOGITS), TARGETS)) / 2
  np.testing.assert_allclose(losses.total_loss(losses.bce, LOGITS, aux, TARGETS), expected,
                             rtol=1e-6)


def test_a_loss_averages_its_pixel_terms_over_the_foreground_of_every_output():
  loss = losses.make_loss('bce+dice', (2.0, 0.5))
  final = jnp.concatenate([LOGITS, jnp.full_like(LOGITS, 7.0)], axis=-1)  # + another channel
  side = jnp.concatenate([jnp.zeros_like(LOGITS), jnp.full_like(LOGITS, -7.0)], axis=-1)
  value = loss(final, {'side_outputs': [side]}, {'mask': TARGETS, 'valid': None})
  expected = (loss.pixels(LOGITS, TARGETS) + loss.pixels(jnp.zeros_like(LOGITS), TARGETS)) / 2
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_the_instance_loss_is_a_registered_outputs_loss():
  assert losses.LOSSES['distance'] is losses.instance_distance
  assert losses.sees_outputs(losses.instance_distance) and not losses.sees_outputs(losses.bce)
  logits = jnp.concatenate([LOGITS, -LOGITS], axis=-1)
  distance = jnp.array([0.0, 0.5, 1.0, 0.25]).reshape(2, 1, 2, 1)
  p = 1 / (1 + np.exp(np.array([0.0, math.log(3.0), 0.0, math.log(3.0)])))  # sigmoid(-LOGITS)
  t = distance.ravel()
  expected = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
  batch = {'mask': TARGETS, 'distance': distance}
  np.testing.assert_allclose(losses.instance_distance(logits, {}, batch), expected, rtol=1e-6)
  # As a term of a Loss, weighted, beside a pixel term.
  value = losses.make_loss('bce+distance', (1.0, 0.5))(logits, {'side_outputs': []}, batch)
  np.testing.assert_allclose(value, losses.bce(LOGITS, TARGETS) + 0.5 * expected, rtol=1e-6)


def test_from_config_adds_the_instance_heads_loss():
  config = default.get_config()
  assert losses.from_config(config) == losses.make_loss('bce+dice')
  config.model.instance_head, config.train.instance_weight = 'distance', 8.0
  config.train.loss, config.train.loss_weights = 'bce+dice', (1.0, 2.0)
  loss = losses.from_config(config)
  assert [(t.name, t.weight, t.sees_outputs) for t in loss.terms] == [
      ('bce', 1.0, False), ('dice', 2.0, False), ('distance', 8.0, True)]
  # A loss of config.train.loss alone (what jit_steps may be given) gets the head's term; one
  # that has it passes unchanged; a pixel function becomes a one-term loss.
  assert losses.from_config(config, losses.make_loss('bce+dice', (1.0, 2.0))) == loss
  assert losses.from_config(config, loss) is loss
  assert losses.from_config(config, losses.bce).names == ('bce', 'distance')
  config.train.loss, config.train.loss_weights = 'bce+distance', ()
  with pytest.raises(UserError, match="^config.train.loss='bce\\+distance': 'distance' is the "
                     "loss of the instance head 'distance', which adds it itself "
                     r'\(--config.model.instance_head=distance, weighted by '
                     r'config.train.instance_weight\); leave it out$'):
    losses.from_config(config)
  config.model.instance_head = ''
  with pytest.raises(UserError, match="'distance' is the loss of the instance head"):
    losses.from_config(config)


def test_train_step_trains_what_it_trained_before_losses_saw_outputs():
  """bce+dice with an instance head of weight w: the loss of steps.train_step with the loss
  from_config builds equals the formula train_step applied before (the pixel loss on the
  foreground of the final and side outputs, averaged, + w * BCE of channel 1 against the
  distance target), computed here independently in float64 from the same outputs."""
  config = default.get_config()
  config.model.name, config.model.width = 'unet_pp', 4  # deep supervision: side outputs
  config.model.instance_head, config.train.instance_weight = 'distance', 0.7
  model = models.create_model(config.model, jnp.float32)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 1)), jnp.float32)
  valid = np.ones((2, 32, 32, 1), np.float32)
  valid[1, :, 24:] = 0.0  # padding
  mask = (rng.random((2, 32, 32, 1)) > 0.6).astype(np.float32) * valid
  distance = rng.random((2, 32, 32, 1)).astype(np.float32) * mask
  batch = {'image': x, 'mask': jnp.asarray(mask), 'valid': jnp.asarray(valid),
           'distance': jnp.asarray(distance)}
  variables = jax.jit(model.init)(jax.random.key(1), x)
  state = steps.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  batch_stats=variables['batch_stats'], tx=optax.sgd(0.0))
  dropout_key = jax.random.key(2)
  step = jax.jit(functools.partial(steps.train_step, loss_fn=losses.from_config(config),
                                   schedule=lambda _: 0.0, dropout_key=dropout_key))
  _, scalars = step(state, batch)
  # The outputs the step saw: training mode, the step's dropout key.
  (logits, aux), _ = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats'],
                                               rngs={'dropout': jax.random.fold_in(
                                                   dropout_key, 0)}))(variables, x)
  outputs = [np.asarray(logits, np.float64)] + [np.asarray(o, np.float64)
                                                for o in aux['side_outputs']]
  assert len(outputs) == 4 and all(o.shape == (2, 32, 32, 2) for o in outputs)

  def bce(z, y):
    per_pixel = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
    return np.sum(per_pixel * valid) / np.sum(valid)

  def dice(z, y):
    p, y = valid / (1 + np.exp(-z)), y * valid
    return np.mean(1 - 2 * np.sum(p * y, axis=(1, 2, 3)) / (np.sum(p + y, axis=(1, 2, 3)) + 1e-6))

  semantic = np.mean([bce(o[..., :1], mask) + dice(o[..., :1], mask) for o in outputs])
  expected = semantic + 0.7 * bce(outputs[0][..., 1:2], distance)
  np.testing.assert_allclose(float(scalars['loss']), expected, rtol=1e-5)
  # jit_steps, given the loss of config.train.loss alone (as the trainer and experiments
  # build it), trains this same loss.
  assert losses.from_config(config, losses.make_loss(
      config.train.loss, config.train.loss_weights)) == losses.from_config(config)


def test_every_instance_head_has_its_registered_loss():
  assert set(losses.HEAD_LOSSES) == {h for h in instances.HEADS if h}
  assert all(losses.sees_outputs(losses.LOSSES[n]) for n in losses.HEAD_LOSSES.values())
