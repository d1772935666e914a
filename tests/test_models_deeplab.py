"""ResNet encoders and DeepLabv3+: exact parameter counts, any-size forward, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg import summary
from flmiseg.errors import UserError
from flmiseg.models import deeplabv3p
from flmiseg.models import resnet


@pytest.mark.parametrize('variant, backbone, fusion, expected', [
    ('original', 'resnet50', '', 40_340_769),
    ('lowlevel', 'resnet50', '', 43_048_129),
    ('lowlevel', 'resnet50', 'add', 41_942_209),
    ('original', 'resnet101', '', 59_332_897),
    ('lowlevel', 'resnet101', '', 62_040_257),
])
def test_reference_parameter_counts(variant, backbone, fusion, expected):
  model = deeplabv3p.DeepLabV3Plus(variant=variant, backbone=backbone, fusion=fusion)
  assert summary.count_params(model) == expected


@pytest.mark.parametrize('stem_stride, strides', [(2, (2, 4, 8, 16, 16)), (1, (1, 2, 4, 8, 8))])
def test_encoder_strides(stem_stride, strides):
  encoder = resnet.ResNetEncoder(width=8, stem_stride=stem_stride)
  x = jnp.zeros((1, 64, 64, 1))
  features, _ = jax.eval_shape(lambda: encoder.init_with_output(jax.random.key(0), x))
  assert tuple(64 // f.shape[1] for f in features) == strides
  assert tuple(f.shape[-1] for f in features) == (8, 32, 64, 128, 256)


@pytest.mark.parametrize('variant', ['original', 'lowlevel'])
def test_forward_any_size_and_gradients(variant):
  model = deeplabv3p.DeepLabV3Plus(width=8, variant=variant)
  x = jax.random.normal(jax.random.key(0), (2, 50, 70, 1))
  variables = jax.jit(model.init)(jax.random.key(1), x)

  def loss(params):
    (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
    return jnp.mean(jax.nn.sigmoid(logits)), logits

  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  assert logits.shape == (2, 50, 70, 1) and logits.dtype == jnp.float32
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads['encoder']))


def test_unknown_backbone_is_a_user_error():
  class Cfg:
    width, variant, backbone, fusion, num_classes = 8, 'original', 'resnet18', '', 1
  with pytest.raises(UserError, match="backbone='resnet18'.*valid: resnet50, resnet101"):
    deeplabv3p.build(Cfg, jnp.float32)
