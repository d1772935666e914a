"""Fusion operators: shapes at one and two scales, one exact value each, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.core.errors import UserError
from flmiseg.models import fusion

N, H, W = 2, 8, 8


def _features(c_decoder, c_skip, same_scale, seed=0):
  kd, ks = jax.random.split(jax.random.key(seed))
  scale = 1 if same_scale else 2
  decoder = jax.random.normal(kd, (N, H // scale, W // scale, c_decoder))
  skip = jax.random.normal(ks, (N, H, W, c_skip))
  return decoder, skip


def _run(name, decoder, skip, **fields):
  op = fusion.get_fusion(name)(**fields)
  variables = op.init(jax.random.key(1), decoder, skip)
  return op, variables, op.apply(variables, decoder, skip)


@pytest.mark.parametrize('same_scale', [True, False])
@pytest.mark.parametrize('name,c_decoder,c_skip,expected', [
    ('add', 6, 6, 6),
    ('concat', 3, 5, 8),
    ('attention_gate', 3, 5, 8),
    ('weighted_sum', 3, 5, 5),
    ('weighted_sum', 5, 5, 5),
    ('se_concat', 3, 5, 8),
])
def test_output_shape(name, c_decoder, c_skip, expected, same_scale):
  decoder, skip = _features(c_decoder, c_skip, same_scale)
  _, _, out = _run(name, decoder, skip)
  assert out.shape == (N, H, W, expected)
  assert fusion.fused_channels(name, c_decoder, c_skip) == expected


def test_registry_lists_every_operator():
  assert sorted(fusion.FUSIONS) == ['add', 'attention_gate', 'concat', 'se_concat',
                                    'weighted_sum']


def test_add_of_constant_maps():
  decoder = jnp.full((1, 2, 2, 3), 2.0)  # bilinear upsampling keeps a constant map constant
  skip = jnp.full((1, 4, 4, 3), 5.0)
  _, _, out = _run('add', decoder, skip)
  np.testing.assert_array_equal(out, np.full((1, 4, 4, 3), 7.0))


def test_add_rejects_unequal_channels():
  decoder, skip = _features(3, 5, True)
  with pytest.raises(ValueError, match='equal channels'):
    _run('add', decoder, skip)
  with pytest.raises(ValueError, match='equal channels'):
    fusion.fused_channels('add', 3, 5)


def test_concat_puts_skip_first():
  decoder, skip = _features(3, 5, True)
  _, _, out = _run('concat', decoder, skip)
  np.testing.assert_array_equal(out[..., :5], skip)
  np.testing.assert_array_equal(out[..., 5:], decoder)


def test_weighted_sum_starts_as_normalised_average():
  decoder = jnp.full((1, 2, 2, 4), 1.0)
  skip = jnp.full((1, 4, 4, 4), 3.0)
  _, variables, out = _run('weighted_sum', decoder, skip, eps=1e-4)
  np.testing.assert_array_equal(variables['params']['weights'], [1.0, 1.0])
  np.testing.assert_allclose(out, np.full((1, 4, 4, 4), 4.0 / (2.0 + 1e-4)), rtol=1e-6)


def test_weighted_sum_weights_are_clipped_at_zero():
  decoder, skip = _features(4, 4, True)
  op = fusion.WeightedSum()
  params = {'params': {'weights': jnp.array([-3.0, 2.0])}}
  out = op.apply(params, decoder, skip)
  np.testing.assert_allclose(out, skip * 2.0 / (2.0 + 1e-4), rtol=1e-6)


def test_attention_gate_with_zeroed_convs_gates_by_sigmoid_of_bias():
  decoder, skip = _features(3, 5, False)
  op, variables, _ = _run('attention_gate', decoder, skip)
  params = jax.tree.map(jnp.zeros_like, variables['params'])
  params['psi']['bias'] = jnp.array([0.7])
  out, state = op.apply({'params': params}, decoder, skip, mutable=['intermediates'])
  alpha = jax.nn.sigmoid(0.7)
  np.testing.assert_allclose(out[..., :5], alpha * skip, rtol=1e-6)
  np.testing.assert_allclose(state['intermediates']['alpha'][0], np.full((N, H, W, 1), alpha),
                             rtol=1e-6)
  assert 'intermediates' not in variables  # init leaves no stray collection behind


def test_se_concat_with_zeroed_excitation_halves_the_concatenation():
  decoder, skip = _features(3, 5, True)
  op, variables, _ = _run('se_concat', decoder, skip)
  params = dict(variables['params'])
  params['excite'] = jax.tree.map(jnp.zeros_like, params['excite'])
  out = op.apply({'params': params}, decoder, skip)
  np.testing.assert_allclose(out, 0.5 * jnp.concatenate([skip, decoder], -1), rtol=1e-6)


def test_se_concat_bottleneck_width_has_a_floor():
  decoder, skip = _features(3, 5, True)
  _, variables, _ = _run('se_concat', decoder, skip, reduction=16, min_channels=4)
  assert variables['params']['squeeze']['kernel'].shape == (8, 4)
  _, variables, _ = _run('se_concat', *_features(64, 64, True), reduction=16)
  assert variables['params']['squeeze']['kernel'].shape == (128, 8)


def test_get_fusion_lists_valid_names():
  with pytest.raises(UserError, match='valid names: add, attention_gate, concat, se_concat, '
                     'weighted_sum'):
    fusion.get_fusion('sum')
