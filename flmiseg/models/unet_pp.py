"""UNet++ (Zhou et al. 2018): U-Net with nested, densely connected skip pathways.

Node X(i, j) sits at depth i (resolution 1/2**i) and column j. Column 0 is the encoder:
X(i, 0) = DoubleConv(maxpool(X(i-1, 0))). Every other node joins all earlier nodes of its row
with the upsampled node below-left:
  X(i, j) = DoubleConv(concat[X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))])
where DoubleConv is conv3-BN-ReLU twice with the row's width (w, 2w, 4w, 8w, 16w) and up is
2x bilinear upsampling with align_corners=True, as the reference (no transposed convolutions).
With deep supervision, a 1x1 head on each full-resolution node X(0, 1..4) gives four logits;
the reference evaluates the last (full-depth) one. At width 32 with one input and one output
channel this has 9,162,852 parameters, as the reference's NestedUNet.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import layers
from flmiseg.models import zoo

VARIANTS = ('original',)
BASE_WIDTH = 32
_DEPTH = 4  # poolings; the network's stride is 2**_DEPTH


def _up2(x):
  """2x bilinear upsampling with align_corners=True (the reference's nn.Upsample)."""
  return layers.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]), align_corners=True)


class UNetPP(nn.Module):
  """UNet++. Input NHWC of any size; returns (logits (N, H, W, num_classes), aux).

  Attributes:
    width: channels of the first row (32 in the reference); row i has width * 2**i.
    deep_supervision: four heads on X(0, 1..4) (the reference's setting). logits is the head
      on X(0, 4); aux['side_outputs'] holds the heads on X(0, 1), X(0, 2), X(0, 3), each
      (N, H, W, num_classes) float32. Without it, a single head on X(0, 4) (the reference
      puts its single head on X(0, 3), leaving X(0, 4) unused; we keep the full network)
      and aux['side_outputs'] is [].
    num_classes: output channels (1: a foreground logit).
    dtype: computation dtype (parameters stay float32).
  aux also holds 'skips' (the encoder features X(0..3, 0), finest first), 'bottleneck'
  (X(4, 0)) and 'top_row' (the full-resolution nodes X(0, 1..4)).
  """
  width: int = BASE_WIDTH
  deep_supervision: bool = True
  num_classes: int = 1
  dtype: Any = jnp.float32

  def _nodes(self, x, train):
    """All nodes as {(i, j): feature}, built anti-diagonal by anti-diagonal as the reference."""
    nodes = {}
    for d in range(_DEPTH + 1):
      down = x if d == 0 else layers.max_pool(nodes[(d - 1, 0)])
      nodes[(d, 0)] = layers.DoubleConv(self.width * 2**d, dtype=self.dtype,
                                        name=f'conv{d}_0')(down, train)
      for j in range(1, d + 1):
        i = d - j
        inputs = [nodes[(i, k)] for k in range(j)] + [_up2(nodes[(i + 1, j - 1)])]
        nodes[(i, j)] = layers.DoubleConv(self.width * 2**i, dtype=self.dtype,
                                          name=f'conv{i}_{j}')(
                                              jnp.concatenate(inputs, axis=-1), train)
    return nodes

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), 2**_DEPTH)
    nodes = self._nodes(x, train)
    top_row = [nodes[(0, j)] for j in range(1, _DEPTH + 1)]
    head = functools.partial(layers.Conv, self.num_classes, (1, 1), dtype=self.dtype)
    if self.deep_supervision:
      outputs = [head(name=f'final{j}')(f) for j, f in enumerate(top_row, start=1)]
    else:
      outputs = [head(name='final')(top_row[-1])]
    outputs = [layers.crop_to(o, hw).astype(jnp.float32) for o in outputs]
    aux = {'skips': [nodes[(i, 0)] for i in range(_DEPTH)],
           'bottleneck': nodes[(_DEPTH, 0)],
           'top_row': top_row,
           'side_outputs': outputs[:-1]}
    return outputs[-1], aux


UNetPP32 = functools.partial(UNetPP, width=32)
UNetPPTiny = functools.partial(UNetPP, width=4)


@zoo.register_model('unet_pp', variants=VARIANTS, base_width=BASE_WIDTH)
def build(model_config, dtype) -> nn.Module:
  """UNetPP from a `config.model` (reads .width and .num_classes)."""
  return UNetPP(width=model_config.width, num_classes=model_config.num_classes, dtype=dtype)
