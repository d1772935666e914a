"""HRNetV2: exact parameter counts, branch resolutions, any-size forward, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.models import summary
from flmiseg.models import hrnet
from tests import helpers


@pytest.mark.parametrize('variant', hrnet.VARIANTS)
def test_reference_parameter_count(variant):
  assert summary.count_params(hrnet.HRNetV2(variant=variant)) == 9_983_105


@pytest.mark.parametrize('variant, finest_stride', [('original', 4), ('lowlevel', 1)])
def test_branch_resolutions(variant, finest_stride):
  model = hrnet.HRNetV2(width=4, variant=variant)
  x = jnp.zeros((1, 64, 64, 1))
  (logits, aux), _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
  strides = [64 // b.shape[1] for b in aux['branches']]
  assert strides == [finest_stride * 2**k for k in range(4)]
  assert [b.shape[-1] for b in aux['branches']] == [4, 8, 16, 32]
  assert logits.shape == (1, 64, 64, 1)


def test_lowlevel_forward_64():
  model = hrnet.HRNetV2(width=4, variant='lowlevel')
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 1))
  # init_with_output runs the forward pass too: one compile instead of two.
  (logits, aux), _ = jax.jit(model.init_with_output)(jax.random.key(1), x)
  assert logits.shape == (1, 64, 64, 1) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits)) and np.std(logits) > 0
  assert aux['branches'][0].shape == (1, 64, 64, 4)


def test_forward_odd_size_and_gradients():
  model = hrnet.HRNetV2(width=4, variant='original')
  x = jax.random.normal(jax.random.key(0), (2, 50, 70, 1))
  variables = helpers.init_variables(model, x)

  def loss(params):
    (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'])
    return jnp.mean(jax.nn.sigmoid(logits)), logits

  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert logits.shape == (2, 50, 70, 1) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # The stem is the deepest point from the loss: a signal there crossed the whole network.
  assert np.any(np.asarray(grads['stem1']['Conv_0']['kernel']) != 0)
  # The coarsest branch's last block reaches the head only through upsampling + concat.
  assert np.any(np.asarray(jax.tree.leaves(grads['stage4_branch3_3'])[0]) != 0)


def test_unknown_variant_is_a_value_error():
  with pytest.raises(ValueError, match="variant='plus'.*valid: original, lowlevel"):
    hrnet.HRNetV2(width=4, variant='plus').init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
