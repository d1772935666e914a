"""ResNet-50/101 encoders as DeepLabv3+'s reference builds them (torchvision-style
Bottleneck with the stride on the 3x3 convolution, dilated last stages, multi-grid layer4).

`ResNetEncoder(...)(x, train)` takes NHWC input and returns [stem, layer1, layer2, layer3,
layer4], finest first, with these strides relative to the input (s = `stem_stride`):
  stem    7x7 convolution + BatchNorm, BEFORE its ReLU (the reference's low_level_feat0):
          stride s (2 in ResNet, 1 in the low-level variant);
  layer1  after the 3x3/2 max-pool: stride 2s;
  layer2  stride 4s;
  layer3  stride 8s with output_stride 16, 4s with output_stride 8;
  layer4  stride output_stride * s / 2 (16s/2 = 8s at output stride 16, 4s at 8): the later
          stages trade their stride for dilation, and layer4's three blocks use the
          multi-grid dilations (1, 2, 4) x the stage dilation.
Channels at width 64: 64, 256, 512, 1024, 2048; `width` scales them in proportion.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import layers

BASE_WIDTH = 64
DEPTHS = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}
MULTI_GRID = (1, 2, 4)  # layer4's per-block dilation multipliers (DeepLabv3)
# Per stage (layer1..layer4): the first block's stride, and every block's dilation.
STAGE_STRIDES = {16: (1, 2, 2, 1), 8: (1, 2, 1, 1)}
STAGE_DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}

# Every ResNet convolution is bias-free: the BatchNorm after it supplies the shift.
_ConvBN = functools.partial(layers.ConvBNReLU, use_bias=False)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (4 * planes), each with BN; residual add; ReLU.

  NHWC in, NHWC out with 4 * planes channels at 1/stride the spatial size. The shortcut is a
  strided 1x1 conv + BN when the shape changes, the identity otherwise.
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = _ConvBN(self.planes, 1, dtype=self.dtype, name='conv1')(x, train)
    out = _ConvBN(self.planes, 3, self.stride, self.dilation, dtype=self.dtype,
                  name='conv2')(out, train)
    out = _ConvBN(self.planes * 4, 1, dtype=self.dtype, relu=False, name='conv3')(out, train)
    if self.stride != 1 or x.shape[-1] != self.planes * 4:
      x = _ConvBN(self.planes * 4, 1, self.stride, dtype=self.dtype, relu=False,
                  name='downsample')(x, train)
    return nn.relu(out + x)


class ResNetEncoder(nn.Module):
  """ResNet feature pyramid; see the module docstring for the outputs and their strides.

  Attributes:
    depth: 50 or 101.
    width: stem channels (64 in ResNet); every stage scales with it.
    stem_stride: stride of the 7x7 stem convolution (2 in ResNet, 1 for full-scale
      low-level features).
    output_stride: 16 or 8, the stride of layer4 for stem_stride 2.
    dtype: computation dtype.
  """
  depth: int = 50
  width: int = BASE_WIDTH
  stem_stride: int = 2
  output_stride: int = 16
  dtype: Any = jnp.float32

  @property
  def total_stride(self) -> int:
    """The stride of layer4 (the coarsest feature): output_stride * stem_stride / 2."""
    return self.output_stride * self.stem_stride // 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    name = f'resnet{self.depth}'
    if name not in DEPTHS:
      raise ValueError(f'ResNet depth {self.depth} is not available; valid: 50, 101')
    if self.output_stride not in STAGE_STRIDES:
      raise ValueError(f'output_stride={self.output_stride}; valid: 8, 16')
    strides = STAGE_STRIDES[self.output_stride]
    dilations = STAGE_DILATIONS[self.output_stride]
    s = functools.partial(layers.scaled, self.width, BASE_WIDTH)
    stem = _ConvBN(s(64), 7, self.stem_stride, dtype=self.dtype, relu=False,
                   name='stem')(x, train)
    y = nn.max_pool(nn.relu(stem), window_shape=(3, 3), strides=(2, 2),
                    padding=((1, 1), (1, 1)))
    features = [stem]
    for i, (blocks, planes) in enumerate(zip(DEPTHS[name], (64, 128, 256, 512))):
      grid = MULTI_GRID if i == 3 else (1,) * blocks
      for b, mult in enumerate(grid):
        y = Bottleneck(s(planes), strides[i] if b == 0 else 1, mult * dilations[i],
                       self.dtype, name=f'layer{i + 1}_{b}')(y, train)
      features.append(y)
    return features
