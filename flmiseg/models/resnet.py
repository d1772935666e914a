"""ResNet-50/101 encoders as DeepLabv3+'s reference builds them (torchvision-style
Bottleneck with the stride on the 3x3 convolution, dilated last stages, multi-grid layer4).

`ResNetEncoder(...)(x, train)` returns [stem, layer1, layer2, layer3, layer4], finest first:
  stem    the 7x7 convolution + BatchNorm (before its ReLU, as the reference's
          low_level_feat0), at stride `stem_stride` (2 in ResNet, 1 in the low-level variant);
  layer1  after the 3x3/2 max-pool: stride 2 * stem_stride;
  layer2  stride 4 * stem_stride; layer3 8 * stem_stride;
  layer4  dilated so that the output stride is `output_stride` (16 or 8) times stem_stride/2.
Channels at width 64: 64, 256, 512, 1024, 2048; `width` scales them in proportion.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.errors import UserError
from flmiseg.models import layers

BASE_WIDTH = 64
DEPTHS = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}
MULTI_GRID = (1, 2, 4)  # layer4's per-block dilation multipliers (DeepLabv3)
_NORM = functools.partial(layers.BatchNorm)


def _conv(features, k, stride=1, dilation=1, dtype=jnp.float32, name=None):
  pad = dilation * (k - 1) // 2
  return layers.Conv(features, (k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                     kernel_dilation=dilation, use_bias=False, dtype=dtype, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), each with BN; residual add."""
  planes: int
  stride: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(_NORM, use_running_average=not train, dtype=self.dtype)
    out = nn.relu(norm()(_conv(self.planes, 1, dtype=self.dtype)(x)))
    out = nn.relu(norm()(_conv(self.planes, 3, self.stride, self.dilation, self.dtype)(out)))
    out = norm()(_conv(self.planes * 4, 1, dtype=self.dtype)(out))
    if self.stride != 1 or x.shape[-1] != self.planes * 4:
      x = norm()(_conv(self.planes * 4, 1, self.stride, dtype=self.dtype)(x))
    return nn.relu(out + x)


class ResNetEncoder(nn.Module):
  """ResNet feature pyramid (see module docstring). Input NHWC."""
  depth: int = 50
  width: int = BASE_WIDTH
  stem_stride: int = 2
  output_stride: int = 16
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    name = f'resnet{self.depth}'
    if name not in DEPTHS:
      raise UserError(f'ResNet depth {self.depth} is not available; valid: 50, 101')
    if self.output_stride not in (8, 16):
      raise UserError(f'output_stride={self.output_stride}; valid: 8, 16')
    strides, dilations = ((1, 2, 2, 1), (1, 1, 1, 2)) if self.output_stride == 16 else (
        (1, 2, 1, 1), (1, 1, 2, 4))
    s = functools.partial(layers.scaled, self.width, BASE_WIDTH)
    stem = _conv(s(64), 7, self.stem_stride, dtype=self.dtype, name='stem_conv')(x)
    stem = _NORM(use_running_average=not train, dtype=self.dtype, name='stem_bn')(stem)
    y = nn.max_pool(nn.relu(stem), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = [stem]
    for i, (blocks, planes) in enumerate(zip(DEPTHS[name], (64, 128, 256, 512))):
      grid = MULTI_GRID if i == 3 else (1,) * blocks
      for b, mult in enumerate(grid):
        y = Bottleneck(s(planes), strides[i] if b == 0 else 1, mult * dilations[i],
                       self.dtype, name=f'layer{i + 1}_{b}')(y, train)
      features.append(y)
    return features


ResNet50Encoder = functools.partial(ResNetEncoder, depth=50)
ResNet101Encoder = functools.partial(ResNetEncoder, depth=101)
