"""HRNetV2 (Wang et al. 2020) as the reference builds it, and its low-level variant.

Stem: two 3x3 conv-BN-ReLU (2w channels), stride 2 each in 'original' (the high-resolution
branch runs at 1/4) and stride 1 in 'lowlevel' (it runs at full resolution: the paper's point).
Stage 1: four Bottlenecks (w planes, 4w out; the reference uses 32 planes at W32, not the
64 of the HRNet paper). Stages 2-4: one module each of 2, 3, 4 parallel branches (widths w,
2w, 4w, 8w at strides 1, 2, 4, 8 relative to the first) of four BasicBlocks, followed by the
fuse layers (1x1 conv-BN + bilinear upsampling from coarser branches, chains of strided 3x3
conv-BN from finer ones; sum, ReLU); transitions before each stage adapt the channels of an
existing branch by a 3x3 conv-BN-ReLU and add the new, coarser branch by a strided one. Head
(HRNetV2): every branch bilinearly upsampled to the input size, concatenated (15w channels),
1x1 conv (with bias)-BN-ReLU, 1x1 classifier. At w=32 (W32) with one input and one output
channel both variants have 9,983,105 parameters, as the reference.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flmiseg.models import layers
from flmiseg.models import zoo

VARIANTS = ('original', 'lowlevel')
BASE_WIDTH = 32
NUM_BLOCKS = 4  # residual blocks per branch in every stage (HRNetV2-W32)

# k x k conv (no bias, PyTorch padding) -> BatchNorm [-> ReLU], the reference's conv unit.
ConvBN = functools.partial(layers.ConvBNReLU, use_bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN with an identity shortcut: (N, H, W, C) -> (N, H, W, C), C = features."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = ConvBN(self.features, dtype=self.dtype)(x, train)
    y = ConvBN(self.features, relu=False, dtype=self.dtype)(y, train)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 conv-BN, (N, H, W, C) -> (N, H, W, 4 * planes).

  The shortcut is a 1x1 conv-BN projection when C != 4 * planes, else the identity.
  """
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
  """Exchanges information between branches: out_i = ReLU(sum_j resample_{j->i}(x_j)).

  xs: branch features, finest first, branch b at 1/2**b the resolution of branch 0. Coarser
  inputs go through a 1x1 conv-BN to branch i's channels, then bilinear upsampling; finer
  ones through (i - j) stride-2 3x3 conv-BN (ReLU between them, not after the last).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> list[jax.Array]:
    outs = []
    for i, xi in enumerate(xs):
      total = xi
      for j, xj in enumerate(xs):
        if j > i:
          y = ConvBN(xi.shape[-1], 1, relu=False, dtype=self.dtype)(xj, train)
          total = total + layers.resize_bilinear(y, xi.shape[1:3])
        elif j < i:
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

  Attributes:
    width: channels of the highest-resolution branch (32 in the reference, W32).
    variant: 'original' (stride-2 stem convs) or 'lowlevel' (stride-1 stem convs).
    num_classes: output channels (1: a foreground logit).
    dtype: computation dtype (parameters stay float32).
  aux['branches']: the four final branch features, finest first, at strides (4, 8, 16, 32)
  ('original') or (1, 2, 4, 8) ('lowlevel') of the input padded to a multiple of 32 or 8,
  with w, 2w, 4w, 8w channels; as every model's aux, 'skips' (the three finer branches),
  'bottleneck' (the coarsest) and 'side_outputs' ([]).
  """
  width: int = BASE_WIDTH
  variant: str = 'original'
  num_classes: int = 1
  dtype: Any = jnp.float32

  def _transition(self, xs, widths, train, name):
    """Adapts existing branches to `widths` and appends the new, coarsest branch."""
    out = []
    for b, features in enumerate(widths):
      if b == len(xs):
        # The new branch comes from the previous stage's coarsest output, before its own
        # channel adaptation, as in the reference.
        out.append(ConvBN(features, 3, 2, dtype=self.dtype,
                          name=f'{name}_transition{b}')(xs[-1], train))
      elif xs[b].shape[-1] != features:
        out.append(ConvBN(features, dtype=self.dtype,
                          name=f'{name}_transition{b}')(xs[b], train))
      else:
        out.append(xs[b])
    return out

  def _stage(self, xs, widths, train, name):
    """Transition, NUM_BLOCKS BasicBlocks per branch, fuse layer; returns len(widths) maps."""
    xs = self._transition(xs, widths, train, name)
    for b in range(len(xs)):
      for k in range(NUM_BLOCKS):
        xs[b] = BasicBlock(widths[b], self.dtype, name=f'{name}_branch{b}_{k}')(xs[b], train)
    return FuseLayer(self.dtype, name=f'{name}_fuse')(xs, train)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in VARIANTS:
      raise ValueError(f'variant={self.variant!r} is not valid for hrnetv2; '
                       f'valid: {", ".join(VARIANTS)}')
    stem_stride = 2 if self.variant == 'original' else 1
    # Stages 2-4 halve the resolution three times after the stem's stem_stride**2.
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), 8 * stem_stride**2)
    w = self.width
    y = ConvBN(2 * w, 3, stem_stride, dtype=self.dtype, name='stem1')(x, train)
    y = ConvBN(2 * w, 3, stem_stride, dtype=self.dtype, name='stem2')(y, train)
    for k in range(4):
      y = Bottleneck(w, self.dtype, name=f'layer1_{k}')(y, train)
    xs = [y]
    for stage in range(2, 5):
      xs = self._stage(xs, [w * 2**b for b in range(stage)], train, f'stage{stage}')
    # The reference upsamples every branch to the input size (256 in 'original', branch 0's
    # size in 'lowlevel', which is the input size there too) before the head.
    size = x.shape[1:3]
    y = jnp.concatenate([layers.resize_bilinear(b, size) for b in xs], axis=-1)
    y = layers.ConvBNReLU(y.shape[-1], 1, dtype=self.dtype, name='head_conv')(y, train)
    logits = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(y)
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'branches': xs, 'skips': xs[:-1], 'bottleneck': xs[-1],
                    'side_outputs': []}


@zoo.register_model('hrnetv2', variants=VARIANTS, base_width=BASE_WIDTH)
def build(model_config, dtype) -> nn.Module:
  """HRNetV2 from a `config.model` (reads .variant, .width, .num_classes)."""
  return HRNetV2(width=model_config.width, variant=model_config.variant,
                 num_classes=model_config.num_classes, dtype=dtype)
