"""The VGG16 convolutional encoder (Simonyan & Zisserman 2015) used by FCN and SegNet.

VGG16's 13 convolutions form five blocks of 3x3 conv + ReLU (2, 2, 3, 3, 3 convolutions at
64, 128, 256, 512, 512 channels for base width 64), each followed by 2x2 max-pooling. The
reference's FCNs use torchvision's VGG16 without BatchNorm and with the first convolution
replaced by a 1-channel one; SegNet uses the same blocks with BatchNorm after every
convolution. `VGGBlock` is the block both build on.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import layers

BASE_WIDTH = 64

# (channels at base width 64, number of 3x3 convolutions) of the five blocks, finest first.
STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

# Total stride of the five poolings: inputs are padded to a multiple of it.
STRIDE = 32

# torchvision's VGG and the reference's SegNet initialise every convolution this way
# (kaiming_normal_, mode='fan_out', nonlinearity='relu'; zero bias). Without BatchNorm it is
# what keeps activations from shrinking through 13 convolutions trained from scratch.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class VGGBlock(nn.Module):
  """`num_convs` x (3x3 conv [-> BatchNorm] -> ReLU), without pooling. NHWC in and out.

  Attributes:
    features: channels of every convolution but possibly the last.
    num_convs: number of convolutions.
    out_features: channels of the last convolution; None: `features` (SegNet's decoder
      blocks narrow to the next block's width in their last convolution).
    batch_norm: BatchNorm after each convolution (SegNet) or not (VGG16 of the FCNs).
    dtype: computation dtype.
  """
  features: int
  num_convs: int
  out_features: int | None = None
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(self.num_convs):
      last = i == self.num_convs - 1
      features = self.out_features if last and self.out_features else self.features
      x = layers.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=conv_init,
                      bias_init=nn.initializers.zeros, dtype=self.dtype,
                      name=f'conv{i + 1}')(x)
      if self.batch_norm:
        x = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                             name=f'bn{i + 1}')(x)
      x = nn.relu(x)
    return x


class VGG16Encoder(nn.Module):
  """VGG16's convolutional part; returns the five POOLED block outputs, finest first.

  Input x: NHWC (N, H, W, C_in), any C_in (the reference uses 1). Returns a list of five
  features: block k (k = 1..5) after its 2x2 max-pooling, at stride 2**k, i.e.
  (N, H / 2**k, W / 2**k, c_k) with c_k = 64, 128, 256, 512, 512 at width 64 (scaled by
  width / 64). These are the reference FCN's x1..x5. Pooling floors odd sizes (as PyTorch's
  ceil_mode=False), so callers pad H and W to a multiple of STRIDE (32) first.

  Attributes:
    width: channels of the first block (64 in VGG16).
    batch_norm: BatchNorm after each convolution (False in VGG16 and the reference FCNs).
    dtype: computation dtype.
  """
  width: int = BASE_WIDTH
  batch_norm: bool = False
  dtype: Any = jnp.float32

  @property
  def total_stride(self) -> int:
    """The stride of block 5's pooled output, the coarsest feature."""
    return STRIDE

  @nn.compact
  def __call__(self, x, train: bool = False) -> list:
    features = []
    x = x.astype(self.dtype)
    for k, (channels, num_convs) in enumerate(STAGES):
      x = VGGBlock(layers.scaled(self.width, BASE_WIDTH, channels), num_convs,
                   batch_norm=self.batch_norm, dtype=self.dtype, name=f'block{k + 1}')(x, train)
      x = layers.max_pool(x)
      features.append(x)
    return features


VGG16 = functools.partial(VGG16Encoder, width=BASE_WIDTH)
VGG16Tiny = functools.partial(VGG16Encoder, width=4)
