"""ResNet encoders and DeepLabv3+: exact parameter counts, any-size forward, gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.models import summary
from flmiseg.core.errors import UserError
from flmiseg.models import deeplabv3p
from flmiseg.models import fusion
from flmiseg.models import resnet
from tests import helpers


@pytest.mark.parametrize('variant, backbone, op, expected', [
    ('original', 'resnet50', '', 40_340_769),
    ('lowlevel', 'resnet50', '', 43_048_129),
    ('lowlevel', 'resnet50', 'add', 41_942_209),
    ('original', 'resnet101', '', 59_332_897),
    ('lowlevel', 'resnet101', '', 62_040_257),
])
def test_reference_parameter_counts(variant, backbone, op, expected):
  model = deeplabv3p.build(_config(width=64, variant=variant, backbone=backbone, fusion=op),
                           jnp.float32)
  assert summary.count_params(model) == expected
  if backbone == 'resnet50' and not op:  # the module's own default encoder is the same
    assert summary.count_params(deeplabv3p.DeepLabV3Plus(variant=variant)) == expected


@pytest.mark.parametrize('stem_stride, output_stride, strides', [
    (2, 16, (2, 4, 8, 16, 16)),
    (1, 16, (1, 2, 4, 8, 8)),
    (2, 8, (2, 4, 8, 8, 8)),
])
def test_encoder_strides_and_channels(stem_stride, output_stride, strides):
  encoder = resnet.ResNetEncoder(width=8, stem_stride=stem_stride, output_stride=output_stride)
  x = jnp.zeros((1, 64, 64, 1))
  features, _ = jax.eval_shape(lambda: encoder.init_with_output(jax.random.key(0), x))
  assert tuple(64 // f.shape[1] for f in features) == strides
  assert tuple(64 // f.shape[2] for f in features) == strides
  assert tuple(f.shape[-1] for f in features) == (8, 32, 64, 128, 256)


# lowlevel at an odd size runs in test_gradients_finite_and_dropout_active (compiles are slow).
@pytest.mark.parametrize('variant, hw', [
    ('original', (64, 64)), ('original', (50, 70)), ('lowlevel', (64, 64))])
def test_forward_any_size(variant, hw):
  model = deeplabv3p.DeepLabV3Plus(width=8, variant=variant)
  x = jax.random.normal(jax.random.key(0), (2, *hw, 1))
  init = jax.jit(lambda x: model.init_with_output(jax.random.key(1), x, train=False))
  (logits, aux), _ = init(x)
  assert logits.shape == (2, *hw, 1) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  skips = aux['skips'] + [aux['bottleneck']]  # stem, layer1..layer3; layer4
  assert len(skips) == 5 and aux['aspp'].shape[-1] == 32 and aux['side_outputs'] == []
  assert aux['bottleneck'].shape[-1] == 256  # layer4 (2048 channels at width 64)
  # The stem feature is taken before its ReLU (the reference's low_level_feat0); the
  # residual stages end in a ReLU.
  assert np.min(skips[0]) < 0 and all(np.min(f) >= 0 for f in skips[1:])


def test_gradients_finite_and_dropout_active():
  model = deeplabv3p.DeepLabV3Plus(width=8, variant='lowlevel')
  x = jax.random.normal(jax.random.key(0), (2, 50, 70, 1))
  variables = helpers.init_variables(model, x)

  @jax.jit
  def grad_fn(params, key):
    def loss(params):
      (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                   mutable=['batch_stats'], rngs={'dropout': key})
      return jnp.mean(jax.nn.sigmoid(logits)), logits
    return jax.grad(loss, has_aux=True)(params)

  grads, logits = grad_fn(variables['params'], jax.random.key(2))
  _, other_logits = grad_fn(variables['params'], jax.random.key(3))
  assert logits.shape == (2, 50, 70, 1) and np.all(np.isfinite(logits))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  for part in ('encoder', 'aspp', 'project0', 'decode3', 'head'):
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads[part])), part
  # Dropout (ASPP 0.5, head 0.5 / 0.1) draws from the 'dropout' rng in training.
  assert not np.allclose(logits, other_logits)


def _config(**overrides):
  fields = dict(width=8, variant='original', backbone='', fusion='', num_classes=1)
  # No backbone_kwargs field: configs of runs made before it existed build as before.
  fields.update(overrides)
  return type('ModelConfig', (), fields)


def test_build_defaults_to_resnet50_and_concat():
  model = deeplabv3p.build(_config(variant='lowlevel'), jnp.bfloat16)
  assert isinstance(model.encoder, resnet.ResNetEncoder)
  assert (model.encoder.depth, model.encoder.stem_stride, model.encoder.dtype) == (
      50, 1, jnp.bfloat16)
  assert (model.stride, model.fusion, model.width, model.dtype) == (
      8, fusion.Concat, 8, jnp.bfloat16)
  original = deeplabv3p.build(_config(), jnp.float32)
  assert (original.encoder.stem_stride, original.stride) == (2, 16)


def test_backbone_kwargs_reach_the_registered_encoder():
  model = deeplabv3p.build(_config(backbone='resnet101',
                                   backbone_kwargs={'output_stride': 8}), jnp.float32)
  assert (model.encoder.depth, model.encoder.output_stride, model.stride) == (101, 8, 8)
  # Any five-level encoder of the registry fits the original decoder: VGG16 at stride 32.
  vgg16 = deeplabv3p.build(_config(backbone='vgg16'), jnp.float32)
  assert vgg16.stride == 32
  (logits, aux), _ = jax.eval_shape(
      lambda: vgg16.init_with_output(jax.random.key(0), jnp.zeros((1, 40, 50, 1))))
  assert logits.shape == (1, 40, 50, 1) and aux['bottleneck'].shape[1:3] == (2, 2)


@pytest.mark.parametrize('overrides, message', [
    (dict(backbone='resnet18'),
     "^config.model.backbone='resnet18' is not a backbone of deeplabv3p; valid names: "
     'resnet101, resnet50, vgg16$'),
    (dict(variant='lowlevel', backbone='vgg16'),
     "^config.model.backbone='vgg16' is not a backbone of deeplabv3p lowlevel \\(it sets the "
     "encoder's stem_stride\\); valid names: resnet101, resnet50$"),
    (dict(variant='lowlevel', backbone_kwargs={'stem_stride': 2}),
     '^config.model.backbone_kwargs.stem_stride=2: deeplabv3p lowlevel sets it itself '
     '\\(stem_stride=1\\); leave it out$'),
    (dict(backbone_kwargs={'depth': 18}),
     "^config.model.backbone_kwargs.depth: not a field of the backbone 'resnet50' \\(its "
     'fields: output_stride, stem_stride\\)$'),
    (dict(variant='lowlevel', fusion='mul'), 'fusion'),
])
def test_bad_settings_are_user_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    deeplabv3p.build(_config(**overrides), jnp.float32)


def test_unknown_variant_is_a_value_error():
  model = deeplabv3p.DeepLabV3Plus(width=8, variant='plus')
  with pytest.raises(ValueError, match="variant='plus'.*valid: original, lowlevel"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1))))


class _TwoLevels(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    a = nn.Conv(4, (3, 3), strides=2)(x)
    return [a, nn.Conv(8, (3, 3), strides=2)(a)]


def test_an_encoder_without_five_levels_or_a_stride_is_refused():
  x = jnp.zeros((1, 32, 32, 1))
  with pytest.raises(ValueError, match='no total_stride; pass stride='):
    jax.eval_shape(lambda: deeplabv3p.DeepLabV3Plus(width=8, encoder=_TwoLevels()).init(
        jax.random.key(0), x))
  with pytest.raises(ValueError, match='needs an encoder with 5 feature levels .*got 2'):
    jax.eval_shape(lambda: deeplabv3p.DeepLabV3Plus(width=8, encoder=_TwoLevels(),
                                                    stride=4).init(jax.random.key(0), x))
