"""HRNetV2 (Wang et al. 2020) as the reference builds it, and its low-level variant.

Stem: two 3x3 conv-BN-ReLU (2w channels), stride 2 each in 'original' (the high-resolution
branch runs at 1/4) and stride 1 in 'lowlevel' (it runs at full resolution: the paper's point).
Stage 1: four Bottlenecks (w planes, 4w out). Stages 2-4: one module each of 2, 3, 4 parallel
branches (widths w, 2w, 4w, 8w at strides 1, 2, 4, 8 relative to the first) of four
BasicBlocks, followed by the fuse layers (1x1 conv-BN + bilinear upsampling from coarser
branches, chains of strided 3x3 conv-BN from finer ones; sum, ReLU); transitions add a branch
by a strided 3x3 conv-BN-ReLU. Head (HRNetV2): every branch upsampled to the input size,
concatenated (15w channels), 1x1 conv (bias) -BN-ReLU, 1x1 classifier. At w=32 (W32) with one
input and one output channel both variants have 9,983,105 parameters, as the reference.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.errors import UserError
from flmiseg.models import layers

VARIANTS = ('original', 'lowlevel')
BASE_WIDTH = 32
NUM_BLOCKS = 4  # blocks per branch in every stage (HRNetV2-W32: 4)


# k x k conv (no bias, PyTorch padding) -> BatchNorm [-> ReLU].
ConvBN = functools.partial(layers.ConvBNReLU, use_bias=False)


class BasicBlock(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = ConvBN(self.features, dtype=self.dtype)(x, train)
    y = ConvBN(self.features, relu=False, dtype=self.dtype)(y, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  planes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(ConvBN, dtype=self.dtype)
    y = conv(self.planes, 1)(x, train)
    y = conv(self.planes, 3)(y, train)
    y = conv(4 * self.planes, 1, relu=False)(y, train)
    if x.shape[-1] != 4 * self.planes:
      x = conv(4 * self.planes, 1, relu=False)(x, train)
    return nn.relu(x + y)


class FuseLayer(nn.Module):
  """Exchanges information between branches: output i = ReLU(sum_j resample_j->i(x_j))."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs, train: bool = False):
    outs = []
    for i, xi in enumerate(xs):
      total = xi
      for j, xj in enumerate(xs):
        if j > i:  # coarser: 1x1 conv-BN, then upsample
          y = ConvBN(xi.shape[-1], 1, relu=False, dtype=self.dtype)(xj, train)
          total = total + layers.resize_bilinear(y, xi.shape[1:3])
        elif j < i:  # finer: (i - j) strided 3x3 convs, ReLU between
          y = xj
          for k in range(i - j):
            last = k == i - j - 1
            y = ConvBN(xi.shape[-1] if last else xj.shape[-1], 3, 2, relu=not last,
                       dtype=self.dtype)(y, train)
          total = total + y
      outs.append(nn.relu(total))
    return outs


class HRNetV2(nn.Module):
  """HRNetV2. Input NHWC of any size; returns (logits (N, H, W, num_classes), aux).

  aux['branches']: the four final branch features, finest first; aux['skips'] the same.
  """
  width: int = BASE_WIDTH
  variant: str = 'original'
  num_classes: int = 1
  dtype: Any = jnp.float32

  def _stage(self, xs, widths, train, name):
    xs, coarsest = list(xs), xs[-1]
    # Transition: adapt existing branches' channels; add a new, coarser branch made from the
    # previous stage's coarsest output (before its own adaptation).
    for b, features in enumerate(widths):
      if b < len(xs):
        if xs[b].shape[-1] != features:
          xs[b] = ConvBN(features, dtype=self.dtype, name=f'{name}_transition{b}')(xs[b],
                                                                                   train)
      else:
        xs.append(ConvBN(features, 3, 2, dtype=self.dtype,
                         name=f'{name}_transition{b}')(coarsest, train))
    for b in range(len(xs)):
      for k in range(NUM_BLOCKS):
        xs[b] = BasicBlock(widths[b], self.dtype, name=f'{name}_branch{b}_{k}')(xs[b], train)
    return FuseLayer(self.dtype, name=f'{name}_fuse')(xs, train)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in VARIANTS:
      raise UserError(f'config.model.variant={self.variant!r}; valid: {", ".join(VARIANTS)}')
    stem_stride = 2 if self.variant == 'original' else 1
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), 8 * stem_stride**2)
    w = self.width
    y = ConvBN(2 * w, 3, stem_stride, dtype=self.dtype, name='stem1')(x, train)
    y = ConvBN(2 * w, 3, stem_stride, dtype=self.dtype, name='stem2')(y, train)
    for k in range(4):
      y = Bottleneck(w, self.dtype, name=f'layer1_{k}')(y, train)
    xs = [y]
    for stage in range(2, 5):
      xs = self._stage(xs, [w * 2**b for b in range(stage)], train, f'stage{stage}')
    size = x.shape[1:3]
    y = jnp.concatenate([layers.resize_bilinear(b, size) for b in xs], axis=-1)
    y = layers.ConvBNReLU(y.shape[-1], 1, dtype=self.dtype, name='head_conv')(y, train)
    logits = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(y)
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'branches': xs, 'skips': xs}


HRNetV2W32 = functools.partial(HRNetV2, width=32)


def build(model_config, dtype) -> nn.Module:
  """HRNetV2 from a `config.model` (reads .variant, .width, .num_classes)."""
  return HRNetV2(width=model_config.width, variant=model_config.variant,
                 num_classes=model_config.num_classes, dtype=dtype)
