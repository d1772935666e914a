"""The low-level wrapper: contract, wiring (exact parameter count), gradients, builders."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flmiseg.core.errors import UserError
from flmiseg.models import backbones
from flmiseg.models import fusion
from flmiseg.models import layers
from flmiseg.models import lowlevel
from flmiseg.models import resnet
from flmiseg.models import vgg
from tests import helpers

TINY_CHANNELS = (4, 8, 16)


class TinyEncoder(nn.Module):
  """Three stride-2 ConvBNReLU stages: features at 1/2, 1/4, 1/8, finest first."""
  channels: tuple[int, ...] = TINY_CHANNELS

  @nn.compact
  def __call__(self, x, train: bool = False):
    pyramid = []
    for c in self.channels:
      x = layers.ConvBNReLU(c, strides=2)(x, train)
      pyramid.append(x)
    return pyramid


def _init(model, shape=(1, 64, 64, 1)):
  # Drawn from the shapes, uncompiled: a jitted init compiles the whole forward pass.
  return helpers.init_variables(model, jnp.zeros(shape))


def _shapes(model, shape=(1, 64, 64, 1)):
  """The variables' shapes, without running anything."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def _params(model):
  return sum(p.size for p in jax.tree.leaves(_shapes(model)['params']))


def _conv(c_in, c_out, k=3, bias=True):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _conv_bn(c_in, c_out, k=3, bias=True):
  return _conv(c_in, c_out, k, bias) + 2 * c_out


def test_stride_is_measured_from_the_backbone():
  assert backbones.backbone_stride(TinyEncoder()) == 8
  assert lowlevel.lowlevel(TinyEncoder(), width=4).stride == 8
  # The built-in encoders declare theirs (nothing to trace), as a function of their settings,
  # and it is the stride of their coarsest feature.
  for encoder, stride in ((resnet.ResNetEncoder(width=4), 16),
                          (resnet.ResNetEncoder(width=4, stem_stride=1), 8),
                          (resnet.ResNetEncoder(width=4, output_stride=8), 8),
                          (vgg.VGG16Encoder(width=4), vgg.STRIDE)):
    assert backbones.backbone_stride(encoder) == encoder.total_stride == stride
    pyramid, _ = jax.eval_shape(lambda e=encoder: e.init_with_output(
        jax.random.key(0), jnp.zeros((1, 64, 64, 1))))
    assert 64 // pyramid[-1].shape[1] == stride


@pytest.mark.parametrize('name', sorted(fusion.FUSIONS))
@pytest.mark.parametrize('hw', [(64, 64), (37, 50)])
def test_forward_contract_for_every_fusion(name, hw):
  model = lowlevel.lowlevel(TinyEncoder(), fusion=fusion.FUSIONS[name], width=4, num_classes=2)
  x = jnp.zeros((2, *hw, 1))
  logits, aux = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))[0]
  assert logits.shape == (2, *hw, 2) and logits.dtype == jnp.float32
  padded = (-(-hw[0] // 8) * 8, -(-hw[1] // 8) * 8)
  assert [f.shape[1:] for f in aux['pyramid']] == [
      (padded[0] // s, padded[1] // s, c) for s, c in zip((2, 4, 8), TINY_CHANNELS)]
  assert aux['skips'][0].shape == (2, *padded, 4)  # the full-scale input layer
  assert [f.shape for f in aux['skips'][1:]] == [f.shape for f in aux['pyramid'][:-1]]
  assert aux['bottleneck'].shape == aux['pyramid'][-1].shape and aux['side_outputs'] == []
  assert [d.shape[-1] for d in aux['decoder']] == [4, 4, 8]


def test_parameter_count_matches_the_described_wiring():
  w = 4
  model = lowlevel.lowlevel(TinyEncoder(), fusion=fusion.Concat, width=w)
  encoder = _conv_bn(1, 4) + _conv_bn(4, 8) + _conv_bn(8, 16)
  input_layer = _conv_bn(1, w) + _conv_bn(w, w)
  # Decoder widths (w, w, 2w, 4w): coarsest (16 ch) projected to 16; each finer backbone
  # feature projected to the incoming decoder width; concat doubles it; DoubleConv.
  decoder = (_conv_bn(16, 4 * w, 1, False)
             + _conv_bn(8, 4 * w, 1, False) + _conv_bn(8 * w, 2 * w) + _conv_bn(2 * w, 2 * w)
             + _conv_bn(4, 2 * w, 1, False) + _conv_bn(4 * w, w) + _conv_bn(w, w)
             + _conv_bn(2 * w, w) + _conv_bn(w, w))  # input layer: same width, no projection
  head = _conv(w, 1, 1)
  assert _params(model) == encoder + input_layer + decoder + head


def test_add_fusion_is_cheaper_than_concat_by_the_halved_decoder_inputs():
  concat = _params(lowlevel.lowlevel(TinyEncoder(), fusion=fusion.Concat, width=4))
  add = _params(lowlevel.lowlevel(TinyEncoder(), fusion=fusion.Add, width=4))
  # Each decode DoubleConv's first conv sees c instead of 2c input channels (c = 16, 8, 4).
  assert concat - add == sum(9 * c * out for c, out in ((16, 8), (8, 4), (4, 4)))


def _finite_grads(model, x, variables=None):
  """Jitted loss gradient in training mode (BN on batch statistics); returns the grads."""
  variables = variables or _init(model, x.shape)

  def loss(params):
    (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                 mutable=['batch_stats'])
    return jnp.mean(logits ** 2), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  assert logits.shape == (*x.shape[:3], 1)
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  return grads


def test_training_updates_batch_stats_of_backbone_and_decoder():
  model = lowlevel.lowlevel(TinyEncoder(), width=4)
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 1)) + 3.0
  variables = _init(model, x.shape)
  _, state = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)
  for part in ('backbone', 'input_layer', 'decode0'):
    before = jax.tree.leaves(variables['batch_stats'][part])
    after = jax.tree.leaves(state['batch_stats'][part])
    assert any(not np.allclose(a, b) for a, b in zip(before, after)), part


def test_unknown_fusion_and_bad_decoder_widths_are_rejected():
  with pytest.raises(UserError, match='valid names: add, attention_gate, concat'):
    lowlevel.build(_model_config('vgg16', 4, 'mean'), jnp.float32)
  # The Python API takes the operator itself; names are resolved from configs only.
  with pytest.raises(TypeError, match="fusion='concat' is not a module factory"):
    lowlevel.lowlevel(TinyEncoder(), fusion='concat')
  model = lowlevel.lowlevel(TinyEncoder(), width=4, decoder_widths=(4, 8))
  with pytest.raises(ValueError, match='decoder_widths needs 4 entries'):
    _shapes(model)


def test_custom_decoder_widths_project_the_input_layer_when_needed():
  model = lowlevel.lowlevel(TinyEncoder(), width=4, decoder_widths=(3, 6, 8, 16))
  variables = _shapes(model)
  assert variables['params']['project0']['Conv_0']['kernel'].shape == (1, 1, 4, 6)
  assert variables['params']['head']['kernel'].shape == (1, 1, 3, 1)


def _model_config(backbone, width, fusion=''):
  return ml_collections.ConfigDict(dict(name='lowlevel', variant='lowlevel', width=width,
                                        fusion=fusion, backbone=backbone, num_classes=1))


def _check_runs(model):
  """An inference forward at 64x64; finite training gradients at an odd size."""
  x = jax.random.normal(jax.random.key(5), (2, 64, 64, 1))
  variables = _init(model, x.shape)  # parameters do not depend on the input size
  logits, aux = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 64, 64, 1) and bool(jnp.all(jnp.isfinite(logits)))
  assert aux['skips'][0].shape[1:3] == (64, 64)
  grads = _finite_grads(model, jax.random.normal(jax.random.key(4), (2, 45, 70, 1)), variables)
  # The full-scale input layer reaches the head through the last fusion.
  assert float(jnp.abs(grads['input_layer']['ConvBNReLU_0']['Conv_0']['kernel']).sum()) > 0


def test_vgg16_wrapper_runs_with_finite_gradients():
  model = lowlevel.build(_model_config('vgg16', 4, 'attention_gate'), jnp.float32)
  assert model.stride == vgg.STRIDE and model.fusion is fusion.AttentionGate
  _check_runs(model)


@pytest.mark.parametrize('fusion_name,expected', [('', 19_698_113), ('add', 18_112_961)])
def test_vgg16_wrapper_parameter_count_at_full_width(fusion_name, expected):
  model = lowlevel.build(_model_config('vgg16', 64, fusion_name), jnp.float32)
  assert model.fusion is fusion.FUSIONS[fusion_name or 'concat']
  params = _shapes(model)['params']
  encoder = jax.eval_shape(lambda: vgg.VGG16Encoder(64).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 1))))['params']
  count = lambda tree: sum(p.size for p in jax.tree.leaves(tree))  # noqa: E731
  assert count(params['backbone']) == count(encoder)  # the encoder is wrapped unchanged
  assert count(params) == expected


def test_resnet50_wrapper_runs_with_finite_gradients():
  model = lowlevel.build(_model_config('', 8, 'se_concat'), jnp.float32)
  assert model.stride == 16 and model.fusion is fusion.SEConcat
  _check_runs(model)


@pytest.mark.parametrize('backbone,depth,encoder_count,expected', [
    ('resnet50', 50, 23_501_760, 29_108_929),
    ('resnet101', 101, 42_493_888, 48_101_057),
])
def test_resnet_wrapper_keeps_the_encoder_unchanged(backbone, depth, encoder_count, expected):
  model = lowlevel.build(_model_config(backbone, 64), jnp.float32)
  params = _shapes(model)['params']
  encoder = resnet.ResNetEncoder(depth, 64)
  encoder_params = jax.eval_shape(lambda: encoder.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 1))))['params']
  count = lambda tree: sum(p.size for p in jax.tree.leaves(tree))  # noqa: E731
  assert count(params['backbone']) == count(encoder_params) == encoder_count
  # The same decoder on both: 5,607,169 parameters (input layer, projections, decoder, head).
  assert count(params) == expected == encoder_count + 5_607_169
  assert model.stride == encoder.total_stride == 16


def test_build_rejects_an_unknown_backbone():
  with pytest.raises(UserError, match="^config.model.backbone='vgg19' is not a backbone of "
                     'lowlevel; valid names: resnet101, resnet50, vgg16$'):
    lowlevel.build(_model_config('vgg19', 4), jnp.float32)


def test_backbone_kwargs_set_the_encoders_fields():
  cfg = _model_config('resnet50', 4)
  cfg.backbone_kwargs = ml_collections.ConfigDict({'output_stride': 8})
  model = lowlevel.build(cfg, jnp.float32)
  assert (model.backbone.output_stride, model.stride) == (8, 8)
  cfg = _model_config('vgg16', 4)
  cfg.backbone_kwargs = ml_collections.ConfigDict({'batch_norm': True})
  model = lowlevel.build(cfg, jnp.float32)
  assert model.backbone.batch_norm and 'bn1' in _shapes(model)['params']['backbone']['block1']
  cfg.backbone_kwargs = ml_collections.ConfigDict({'stem_stride': 1})
  with pytest.raises(UserError, match="^config.model.backbone_kwargs.stem_stride: not a field "
                     r"of the backbone 'vgg16' \(its fields: batch_norm\)$"):
    lowlevel.build(cfg, jnp.float32)
