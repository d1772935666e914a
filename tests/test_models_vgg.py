"""Tests of the VGG16-based models: VGG16 encoder, FCNs, SegNet and max-unpooling."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.core.errors import UserError
from flmiseg.models import fcn
from flmiseg.models import segnet
from flmiseg.models import vgg

BUILDERS = {'fcn32s': fcn.build, 'fcn16s': fcn.build, 'fcn8s': fcn.build, 'fcn': fcn.build,
            'segnet': segnet.build}

# (name, variant) -> parameters of the reference (1 input, 1 output channel, width 64).
REFERENCE_COUNTS = {
    ('fcn32s', 'original'): 18_642_561,
    ('fcn8s', 'original'): 18_642_561,
    ('fcn', 'original'): 18_642_561,
    ('fcn', 'lowlevel'): 20_209_281,
    ('segnet', 'original'): 29_442_433,
    ('segnet', 'lowlevel'): 34_935_169,
}

ALL_MODELS = [(name, variant) for name, variants in
              {**fcn.VARIANTS, **segnet.VARIANTS}.items() for variant in variants]


def model_config(name, variant='original', width=64, fusion=''):
  return types.SimpleNamespace(name=name, variant=variant, width=width, fusion=fusion,
                               num_classes=1)


def build(name, variant='original', width=64, fusion=''):
  return BUILDERS[name](model_config(name, variant, width, fusion), jnp.float32)


def shapes(model, hw=(64, 64)):
  x = jnp.zeros((1, *hw, 1))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def count_params(model):
  return sum(leaf.size for leaf in jax.tree.leaves(shapes(model)['params']))


@pytest.mark.parametrize('name,variant', sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(name, variant):
  assert count_params(build(name, variant)) == REFERENCE_COUNTS[(name, variant)]


def test_fcn16s_has_the_fcn32s_count():
  assert count_params(build('fcn16s')) == 18_642_561


def test_concat_and_add_fusion_differ_by_the_widened_inputs():
  # Concatenation widens the inputs of FCN's deconvolutions 2-5 by 512/256/128/64 channels
  # (3x3 kernels), and SegNet's first decoder convolutions by 512/512/256/128/64.
  fcn_extra = 9 * (512 * 256 + 256 * 128 + 128 * 64 + 64 * 32)
  segnet_extra = 9 * (512 * 512 + 512 * 512 + 256 * 256 + 128 * 128 + 64 * 64)
  assert (count_params(build('fcn', 'lowlevel')) - count_params(build('fcn', 'original'))
          == fcn_extra == 20_209_281 - 18_642_561)
  assert (count_params(build('segnet', 'lowlevel'))
          - count_params(build('segnet', 'original')) == segnet_extra)
  # The operator, not the variant name, sets the structure.
  assert count_params(build('fcn', 'original', fusion='concat')) == 20_209_281
  assert count_params(build('fcn', 'lowlevel', fusion='add')) == 18_642_561
  assert count_params(build('segnet', 'lowlevel', fusion='add')) == 29_442_433


def test_fcn_normalises_where_the_reference_does():
  # FCN8s normalises the fused feature (2x channels with concat); the all-skip FCN
  # normalises the deconvolution output before fusing.
  fcn8s = shapes(build('fcn8s', fusion='concat', width=8))['params']
  fcn_all = shapes(build('fcn', 'lowlevel', width=8))['params']
  assert fcn8s['bn1']['scale'].shape == (128,)
  assert fcn8s['bn2']['scale'].shape == (64,)
  assert fcn8s['bn3']['scale'].shape == (16,)
  assert fcn_all['bn1']['scale'].shape == (64,)
  assert fcn_all['deconv2']['kernel'].shape == (3, 3, 128, 32)


def test_vgg16_encoder_returns_pooled_blocks_at_strides_2_to_32():
  x = jnp.zeros((2, 64, 96, 1))
  features = jax.eval_shape(lambda: vgg.VGG16Encoder(width=8).init_with_output(
      jax.random.key(0), x))[0]
  assert [f.shape for f in features] == [(2, 32, 48, 8), (2, 16, 24, 16), (2, 8, 12, 32),
                                         (2, 4, 6, 64), (2, 2, 3, 64)]


@functools.lru_cache(maxsize=None)
def tiny(name, variant):
  """A width-4 model and its variables; shared by tests, as CPU compilation dominates."""
  model = build(name, variant, width=4)
  return model, model.init(jax.random.key(0), jnp.zeros((2, 64, 64, 1)))


# fcn16s is fcn8s with one skip fewer; every other code path is covered.
@pytest.mark.parametrize('name,variant', [m for m in ALL_MODELS if m[0] != 'fcn16s'])
def test_forward_any_size_gives_finite_logits_of_input_shape(name, variant):
  model, variables = tiny(name, variant)
  # 50x45 pads to the 64x64 of init, so both sizes reuse the compiled convolutions.
  for hw in ((64, 64), (50, 45)):
    x = jax.random.normal(jax.random.key(1), (2, *hw, 1))
    logits, aux = model.apply(variables, x)
    assert logits.shape == (2, *hw, 1) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert len(aux['skips']) == (4 if name.startswith('fcn') else 5)


@pytest.mark.parametrize('name,variant', [('fcn', 'lowlevel'), ('segnet', 'lowlevel')])
def test_gradients_are_finite_and_reach_the_first_convolution(name, variant):
  model, variables = tiny(name, variant)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))
  y = (x > 0).astype(jnp.float32)

  def loss(params):
    (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'])
    return jnp.mean((jax.nn.sigmoid(logits) - y) ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  first = grads['encoder']['block1']['conv1'] if name == 'fcn' else grads['enc1']['conv1']
  assert float(jnp.abs(first['kernel']).sum()) > 0


def test_train_mode_updates_batch_stats():
  model, variables = tiny('segnet', 'original')
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 1)) + 3.0
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  old = variables['batch_stats']['enc1']['bn1']['mean']
  new = updates['batch_stats']['enc1']['bn1']['mean']
  assert not np.allclose(old, new)


HAND_MADE = np.array([[1., 5., 0., 2.],
                      [3., 4., 7., 1.],
                      [9., 0., 2., 2.],
                      [8., 6., 3., 8.]], np.float32)


def test_max_pool_with_argmax_on_a_hand_made_input():
  pooled, argmax = segnet.max_pool_with_argmax(jnp.asarray(HAND_MADE)[None, :, :, None])
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[5., 7.], [9., 8.]])
  np.testing.assert_array_equal(argmax[0, :, :, 0], [[1, 2], [0, 3]])
  # Ties go to the first maximum in row-major order, as in PyTorch.
  _, tie = segnet.max_pool_with_argmax(jnp.array([[0., 3.], [3., 3.]])[None, :, :, None])
  assert int(tie[0, 0, 0, 0]) == 1


def test_max_unpool_puts_values_back_at_their_argmax():
  x = jnp.asarray(HAND_MADE)[None, :, :, None]
  pooled, argmax = segnet.max_pool_with_argmax(x)
  out = jax.jit(segnet.max_unpool)(pooled, argmax)
  np.testing.assert_array_equal(out[0, :, :, 0], [[0., 5., 0., 0.],
                                                  [0., 0., 7., 0.],
                                                  [9., 0., 0., 0.],
                                                  [0., 0., 0., 8.]])
  y = jnp.array([[10., 20.], [30., 40.]])[None, :, :, None]
  np.testing.assert_array_equal(segnet.max_unpool(y, argmax)[0, :, :, 0],
                                [[0., 10., 0., 0.], [0., 0., 20., 0.],
                                 [30., 0., 0., 0.], [0., 0., 0., 40.]])


def test_max_unpool_is_the_adjoint_of_pooling_selection():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8, 3))
  y = jax.random.normal(jax.random.key(1), (2, 3, 4, 3))
  pooled, argmax = segnet.max_pool_with_argmax(x)
  # <unpool(y), x> == <y, pool(x)>, and pooling's vjp is unpooling at those positions.
  np.testing.assert_allclose(jnp.sum(segnet.max_unpool(y, argmax) * x),
                             jnp.sum(y * pooled), rtol=1e-6)
  _, vjp = jax.vjp(lambda v: segnet.max_pool_with_argmax(v)[0], x)
  np.testing.assert_array_equal(vjp(y)[0], segnet.max_unpool(y, argmax))
  # Unpooling is linear: its gradient gathers the cotangent at the argmax positions.
  g = jax.grad(lambda v: jnp.sum(segnet.max_unpool(v, argmax) * x))(y)
  np.testing.assert_array_equal(g, pooled)


def test_max_unpool_restores_odd_sizes():
  x = jax.random.normal(jax.random.key(0), (1, 5, 7, 2))
  pooled, argmax = segnet.max_pool_with_argmax(x)
  assert pooled.shape == (1, 2, 3, 2)
  out = segnet.max_unpool(pooled, argmax, (5, 7))
  assert out.shape == (1, 5, 7, 2)
  assert float(jnp.abs(out[:, 4]).sum() + jnp.abs(out[:, :, 6]).sum()) == 0.0
  np.testing.assert_array_equal(jnp.sort(out[out != 0]), jnp.sort(pooled.ravel()))


@pytest.mark.parametrize('builder,settings,error,message', [
    (fcn.build, dict(name='fcn64'), ValueError,
     "config.model.name='fcn64' is not an FCN; valid: fcn32s, fcn16s, fcn8s, fcn"),
    (fcn.build, dict(name='fcn8s', variant='lowlevel'), ValueError,
     "config.model.variant='lowlevel' is not a variant of 'fcn8s'; valid: original"),
    (fcn.build, dict(name='fcn', fusion='sum'), UserError,
     "config.model.fusion='sum' is not a fusion operator; valid names: add, "),
    (segnet.build, dict(name='segnet', variant='modified'), ValueError,
     "config.model.variant='modified' is not a variant of 'segnet'; valid: original, "
     'lowlevel'),
    (segnet.build, dict(name='segnet', variant='lowlevel', fusion='cat'), UserError,
     "config.model.fusion='cat' is not a fusion operator; valid names: add, "),
])
def test_bad_settings_raise(builder, settings, error, message):
  # A bad argument is a ValueError; an unknown registered name names its setting (UserError).
  with pytest.raises(error) as e:
    builder(model_config(**settings), jnp.float32)
  assert str(e.value).startswith(message)
