"""Schedules and optimisers against hand computations."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flmiseg.configs import default
from flmiseg.train import optim


def _cfg(**kw):
  cfg = default.get_config().optim
  cfg.warmup_steps = 0
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_step_decay_is_the_references():
  # 10 steps per epoch, x0.1 every 5 epochs.
  sched = optim.make_schedule(_cfg(schedule='step', lr=0.01, decay_epochs=5.0,
                                   decay_rate=0.1), steps_per_epoch=10, total_steps=300)
  np.testing.assert_allclose([sched(0), sched(49), sched(50), sched(100), sched(299)],
                             [0.01, 0.01, 0.001, 0.0001, 0.01 * 0.1**5], rtol=1e-5)


def test_cosine_poly_constant_and_warmup():
  cos = optim.make_schedule(_cfg(schedule='cosine', lr=1.0), 10, 100)
  np.testing.assert_allclose([cos(0), cos(50), cos(100)], [1.0, 0.5, 0.0], atol=1e-6)
  poly = optim.make_schedule(_cfg(schedule='poly', lr=1.0, power=1.0), 10, 100)
  np.testing.assert_allclose(poly(25), 0.75, rtol=1e-6)
  warm = optim.make_schedule(_cfg(schedule='constant', lr=2.0, warmup_steps=10), 10, 100)
  np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(60)], [0.0, 1.0, 2.0, 2.0],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="config.optim.schedule='linearr'"):
    optim.make_schedule(_cfg(schedule='linearr'), 10, 100)


def test_sgd_with_l2_weight_decay_matches_torch_semantics():
  # torch.optim.SGD: g' = g + wd * p; buf = g' (first step); p -= lr * buf.
  tx = optim.make_optimizer(_cfg(name='sgd', momentum=0.9, weight_decay=0.1),
                            optax.constant_schedule(0.5))
  params = {'w': jnp.array([2.0])}
  grads = {'w': jnp.array([1.0])}
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.5 * (1.0 + 0.1 * 2.0)], rtol=1e-6)
  # Second step: buf = 0.9 * buf + g'.
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['w'], [-0.5 * (0.9 * 1.2 + 1.2)], rtol=1e-6)


def test_grad_clip_and_unknown_optimizer():
  tx = optim.make_optimizer(_cfg(name='sgd', momentum=0.0, weight_decay=0.0, grad_clip=1.0),
                            optax.constant_schedule(1.0))
  params = {'w': jnp.zeros(2)}
  updates, _ = tx.update({'w': jnp.array([3.0, 4.0])}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], [-0.6, -0.8], rtol=1e-6)
  with pytest.raises(ValueError, match='valid names: sgd, adam, adamw'):
    optim.make_optimizer(_cfg(name='lion'), optax.constant_schedule(1.0))
