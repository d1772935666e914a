"""flmiseg/models/layers.py: the transposed convolution's fast path equals nn.ConvTranspose."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.models import layers


@pytest.mark.parametrize('kwargs', [
    dict(kernel_size=(2, 2), strides=(2, 2)),  # U-Net's up-convolution: the einsum path
    dict(kernel_size=(4, 4), strides=(4, 4), padding='VALID'),
    dict(kernel_size=(3, 3), strides=(2, 2), padding=((1, 2), (1, 2))),  # FCN: lax path
])
def test_conv_transpose_equals_flax(kwargs):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 9, 6), np.float32))
  ours = layers.ConvTranspose(5, **kwargs)
  ref = nn.ConvTranspose(5, kernel_init=layers.torch_conv_transpose_init, **kwargs)
  v_ours, v_ref = ours.init(jax.random.key(3), x), ref.init(jax.random.key(3), x)
  # Same parameter names, shapes and initial values: checkpoints and counts carry over.
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
  for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_ref)):
    np.testing.assert_array_equal(a, b)
  v = jax.tree.map(lambda a: a + 0.1, v_ref)  # a nonzero bias too
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-6, atol=1e-6)
  # and the same gradients
  g_ours = jax.grad(lambda v: jnp.sum(ours.apply(v, x) ** 2))(v)
  g_ref = jax.grad(lambda v: jnp.sum(ref.apply(v, x) ** 2))(v)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_transpose_patch_layout_by_hand():
  """A 1-channel 2x2 input and a kernel k[a, b] = 10 a + b: each pixel writes its own patch."""
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
  kernel = jnp.array([[0.0, 1.0], [10.0, 11.0]]).reshape(2, 2, 1, 1)
  y = layers.ConvTranspose(1, (2, 2), strides=(2, 2), use_bias=False).apply(
      {'params': {'kernel': kernel}}, x)[0, :, :, 0]
  # lax.conv_transpose (and so nn.ConvTranspose) applies the kernel flipped.
  patch = np.array([[11.0, 10.0], [1.0, 0.0]])
  np.testing.assert_array_equal(y, np.block([[1 * patch, 2 * patch], [3 * patch, 4 * patch]]))
