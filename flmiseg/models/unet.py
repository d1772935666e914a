"""U-Net as the reference builds it (Ronneberger et al. 2015, with BatchNorm).

Encoder: DoubleConv (conv3-BN-ReLU x2) at widths w, 2w, 4w, 8w, 16w with 2x2 max-pooling
between them; decoder: 2x2 transposed convolution (stride 2) halving the channels, concatenation
with the encoder feature of the same scale, DoubleConv; a 1x1 convolution head. At width 64 with
one input and one output channel it has 31,042,369 parameters, as the reference.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import layers
from flmiseg.models import zoo

SKIP_NAMES = ('skip0', 'skip1', 'skip2', 'skip3', 'bottleneck')


class UNet(nn.Module):
  """U-Net. Input NHWC of any size; returns (logits (N, H, W, num_classes), aux).

  Attributes:
    width: channels of the first stage (64 in the reference).
    num_classes: output channels (1: a foreground logit).
    dtype: computation dtype (parameters stay float32).
    ablate: names of decoder inputs to zero at inference, for the feature-importance
      analysis: 'skip0' (full resolution) .. 'skip3' (1/8), 'bottleneck' (1/16).
  aux holds 'skips' (the encoder features, finest first), 'bottleneck' and 'side_outputs'
  ([]).
  """
  width: int = 64
  num_classes: int = 1
  dtype: Any = jnp.float32
  ablate: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), 16)
    w = self.width
    skips = []
    for level in range(4):
      x = layers.DoubleConv(w * 2**level, dtype=self.dtype)(x, train)
      skips.append(x)
      x = layers.max_pool(x)
    x = layers.DoubleConv(w * 16, dtype=self.dtype)(x, train)
    bottleneck = x
    if 'bottleneck' in self.ablate:
      x = jnp.zeros_like(x)
    for level in reversed(range(4)):
      features = w * 2**level
      x = layers.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
      skip = skips[level]
      if f'skip{level}' in self.ablate:
        skip = jnp.zeros_like(skip)
      x = jnp.concatenate([skip, x], axis=-1)
      x = layers.DoubleConv(features, dtype=self.dtype)(x, train)
    logits = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'skips': skips, 'bottleneck': bottleneck, 'side_outputs': []}


@zoo.register_model('unet', variants=('original',), base_width=UNet.width)
def build(model_config, dtype) -> nn.Module:
  """UNet from a `config.model` (reads .width and .num_classes)."""
  return UNet(width=model_config.width, num_classes=model_config.num_classes, dtype=dtype)
