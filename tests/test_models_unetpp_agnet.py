"""UNet++ and AG-Net: parameter counts, shapes, gradients, bf16, and the guided filter's maths."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flmiseg.models import agnet
from flmiseg.models import layers
from flmiseg.models import unet_pp
from tests import helpers

KEY = jax.random.key(0)  # shapes only (jax.eval_shape); variables: helpers.init_variables


def _num_params(model):
  variables = jax.eval_shape(lambda: model.init(KEY, jnp.zeros((1, 64, 64, 1))))
  return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('model, expected', [
    (unet_pp.UNetPP(), 9_162_852),
    (unet_pp.UNetPP(deep_supervision=False), 9_162_852 - 3 * 33),
    (agnet.AGNet(), 9_326_700),  # the reference's AG_Net(2), as trained
    (agnet.AGNet(single_logit_heads=True), 9_326_216),  # AG_Net(1)
])
def test_parameter_counts_at_reference_width(model, expected):
  assert _num_params(model) == expected


def test_builders_read_width_and_num_classes():
  config = types.SimpleNamespace(width=8, num_classes=2, name='x', variant='original')
  for module in (unet_pp, agnet):
    model = module.build(config, jnp.bfloat16)
    assert (model.width, model.num_classes, model.dtype) == (8, 2, jnp.bfloat16)
    assert module.VARIANTS == ('original',) and module.BASE_WIDTH == 32


def test_agnet_multiclass_heads_return_raw_logits():
  model = agnet.AGNet(width=4, num_classes=3)
  (logits, aux), _ = jax.eval_shape(
      lambda: model.init_with_output(KEY, jnp.zeros((1, 48, 48, 1))))
  assert logits.shape == (1, 48, 48, 3)
  assert [o.shape for o in aux['side_outputs']] == [(1, 48, 48, 3)] * 4


def _init(model):
  return helpers.init_variables(model, jnp.zeros((1, 16, 16, 1)))


def _check_train_outputs_and_grads(model, variables, num_sides):
  """Forward + gradient in train mode on an odd-sized batch (padded to 64x80 inside)."""
  x = jax.random.normal(jax.random.key(1), (2, 50, 70, 1))

  def loss_fn(params):
    (logits, aux), _ = model.apply({**variables, 'params': params}, x, train=True,
                                   mutable=['batch_stats'])
    outputs = [logits] + aux['side_outputs']
    return sum(jnp.mean(jax.nn.softplus(o)) for o in outputs), outputs

  grads, outputs = jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params'])
  assert len(outputs) == num_sides + 1
  for out in outputs:
    assert out.shape == (2, 50, 70, 1) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(int(jnp.count_nonzero(g)) for g in leaves) > 0.5 * sum(g.size for g in leaves)
  return grads


def _check_eval_outputs(model, variables, x, num_sides):
  """Eval-mode forward on a 64x64 batch: shapes, finiteness; returns (logits, aux)."""
  logits, aux = jax.jit(model.apply)(variables, x)
  assert logits.shape == (1, 64, 64, 1) and logits.dtype == jnp.float32
  assert [o.shape for o in aux['side_outputs']] == [(1, 64, 64, 1)] * num_sides
  assert all(bool(jnp.all(jnp.isfinite(o))) for o in [logits] + aux['side_outputs'])
  assert [s.shape[1:3] for s in aux['skips']] == [(64, 64), (32, 32), (16, 16), (8, 8)]
  return logits, aux


def test_unetpp_outputs_and_gradients():
  model = unet_pp.UNetPP(width=4)
  variables = _init(model)
  grads = _check_train_outputs_and_grads(model, variables, num_sides=3)
  for j in range(1, 5):  # every deep-supervision head is trained
    assert float(jnp.abs(grads[f'final{j}']['kernel']).sum()) > 0
  _check_eval_outputs(model, variables, jnp.ones((1, 64, 64, 1)), num_sides=3)


def test_agnet_outputs_gradients_and_bfloat16():
  model = agnet.AGNet(width=4)
  variables = _init(model)
  grads = _check_train_outputs_and_grads(model, variables, num_sides=4)
  for level in range(5, 9):
    assert float(jnp.abs(grads[f'attention{level}']['psi']['kernel']).sum()) > 0
    assert float(jnp.abs(grads[f'side{level}']['kernel']).sum()) > 0
  # The same parameters under bf16 computation: the attention gates and guided filter stay
  # float32, and the outputs agree with float32 computation to bf16 accuracy.
  x = jax.random.normal(jax.random.key(2), (1, 64, 64, 1))
  ref_logits, ref_aux = _check_eval_outputs(model, variables, x, num_sides=4)
  logits, aux = _check_eval_outputs(model.clone(dtype=jnp.bfloat16), variables, x, 4)
  assert all(a.dtype == jnp.float32 for a in aux['attention'] + aux['guided'])
  assert aux['skips'][0].dtype == jnp.bfloat16
  for out, ref in zip([logits] + aux['side_outputs'], [ref_logits] + ref_aux['side_outputs']):
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.max(jnp.abs(ref))))


def test_foreground_log_odds_equals_two_class_softmax_and_nll():
  two_class = 4.0 * jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
  labels = jax.random.bernoulli(jax.random.key(4), 0.3, (2, 8, 8, 1)).astype(jnp.float32)
  z = agnet.foreground_log_odds(two_class)
  assert z.shape == (2, 8, 8, 1)
  log_softmax = jax.nn.log_softmax(two_class, axis=-1)
  np.testing.assert_allclose(jax.nn.sigmoid(z), jnp.exp(log_softmax[..., 1:2]), atol=1e-6)
  nll = -jnp.where(labels > 0.5, log_softmax[..., 1:2], log_softmax[..., 0:1])
  np.testing.assert_allclose(optax.sigmoid_binary_cross_entropy(z, labels), nll,
                             rtol=1e-5, atol=1e-6)


def test_resize_bilinear_matches_torch_conventions():
  row = lambda values: jnp.asarray(values, jnp.float32).reshape(1, 1, -1, 1)
  out = lambda x, n, ac: np.asarray(layers.resize_bilinear(x, (1, n), ac)).ravel()
  np.testing.assert_allclose(out(row([0, 1]), 4, True), [0, 1 / 3, 2 / 3, 1], rtol=1e-6)
  np.testing.assert_allclose(out(row([0, 1]), 4, False), [0, 0.25, 0.75, 1])
  np.testing.assert_allclose(out(row(range(4)), 2, False), [0.5, 2.5])  # a 2x2 mean
  np.testing.assert_allclose(out(row(range(8)), 2, False), [1.5, 5.5])  # no antialiasing


def test_box_sum_counts_the_window_inside_the_image():
  counts = np.asarray(agnet.box_sum(jnp.ones((1, 7, 7, 1)), 2))[0, :, :, 0]
  assert counts[0, 0] == 9 and counts[0, 1] == 12 and counts[1, 1] == 16
  assert counts[0, 3] == 15 and counts[3, 3] == 25


def test_guided_filter_with_zero_guide_is_a_double_box_mean():
  # lr_x = 0 makes the slope 0 and the intercept the attention-weighted box mean of lr_y.
  zeros = jnp.zeros((1, 7, 7, 1))
  delta = zeros.at[0, 3, 3, 0].set(1.0)
  out = agnet.fast_guided_filter(zeros, delta, zeros + 7.0, jnp.full((1, 7, 7, 1), 0.3))
  assert out.dtype == jnp.float32
  # Intercept b(i, j) = 1 / (window size at (i, j)) within 2 pixels of the delta, else 0; a
  # window holds 4 rows next to the border, 5 inside (3 and 4 away from the delta: 3, 4).
  # Centre: mean of b over its 25 neighbours; corner: over its 9, four of them non-zero.
  np.testing.assert_allclose(out[0, 3, 3, 0], (2 / 4 + 3 / 5)**2 / 25, rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0, 0], (1 / 4 + 1 / 5)**2 / 9, rtol=1e-6)
  attention = jax.random.uniform(jax.random.key(5), (1, 7, 7, 1))
  constant = agnet.fast_guided_filter(zeros, zeros + 5.0, zeros, attention)
  np.testing.assert_allclose(constant, 5.0, rtol=1e-6)


def _np_box_sum(x, r):
  """Window sums by cumulative sums, as the reference's BoxFilter (float64, (H, W, C))."""
  for axis in (0, 1):
    n = x.shape[axis]
    c = np.concatenate([np.zeros_like(np.take(x, [0], axis)), np.cumsum(x, axis)], axis)
    hi = np.minimum(np.arange(n) + r + 1, n)
    lo = np.maximum(np.arange(n) - r, 0)
    x = np.take(c, hi, axis) - np.take(c, lo, axis)
  return x


def _np_upsample2(x):
  """torch bilinear 2x upsampling (half-pixel, clamped at 0), float64 (H, W, C)."""
  for axis in (0, 1):
    n = x.shape[axis]
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0)
    lo = np.floor(src).astype(int)
    f = (src - lo).reshape((-1, 1, 1) if axis == 0 else (-1, 1))
    x = np.take(x, lo, axis) * (1 - f) + np.take(x, np.minimum(lo + 1, n - 1), axis) * f
  return x


def test_guided_filter_matches_float64_transcription_of_reference():
  rng = np.random.default_rng(0)
  lr_x, lr_y = rng.normal(size=(8, 8, 3)), rng.normal(size=(8, 8, 3))
  hr_x, att = rng.normal(size=(16, 16, 3)), rng.uniform(size=(8, 8, 1))
  a = np.abs(att) + 1e-12
  t = a / a.sum()
  n = _np_box_sum(np.ones((8, 8, 1)), 2)
  m = lambda v: _np_box_sum(v, 2) / n
  big_a = ((m(a * a * lr_x * lr_y) - n * m(t * a * lr_x) * m(a * lr_y)) /
           (np.abs(m(a * a * lr_x * lr_x) - n * m(t * a * lr_x) * m(a * lr_x)) + 1e-2))
  b = (m(a * lr_y) - big_a * m(a * lr_x)) / m(a)
  expected = _np_upsample2(m(big_a)) * hr_x + _np_upsample2(m(b))
  got = agnet.fast_guided_filter(*(jnp.asarray(v[None], jnp.float32)
                                   for v in (lr_x, lr_y, hr_x, att)))
  np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)
