"""Every loss against a hand computation on a tiny batch."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.train import losses
from flmiseg.core.errors import UserError

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
  np.testing.assert_allclose(combined(LOGITS, TARGETS), expected, rtol=1e-6)
  with pytest.raises(UserError, match="'bcee' is not a loss; valid names: bce"):
    losses.make_loss('bcee')
  with pytest.raises(UserError, match='loss_weights'):
    losses.make_loss('bce+dice', (1.0,))


def test_total_loss_averages_side_outputs():
  aux = {'side_outputs': [jnp.zeros_like(LOGITS)]}
  expected = (losses.bce(LOGITS, TARGETS) + losses.bce(jnp.zeros_like(LOGITS), TARGETS)) / 2
  np.testing.assert_allclose(losses.total_loss(losses.bce, LOGITS, aux, TARGETS), expected,
                             rtol=1e-6)
