"""Fully convolutional networks (Long et al. 2015) on VGG16, as the reference builds them.

The reference (models/FCN.py, models/FCN_cat.py) takes torchvision's VGG16 without BatchNorm,
with a 1-channel first convolution, and keeps its five pooled block outputs x1..x5 (strides
2..32). The decoder has five stages, each a 3x3 transposed convolution (stride 2, PyTorch
padding 1 / output_padding 1, i.e. exactly doubling H and W) -> ReLU -> BatchNorm, to
512, 256, 128, 64, 32 channels (width 64), then a 1x1 classifier. Skips are fused after the
first stages:
  fcn32s  no skips.
  fcn16s  x4 after stage 1; BatchNorm applied to the fused feature (bn(relu(deconv) + skip)).
  fcn8s   x4 and x3 after stages 1 and 2, normalised after fusion as fcn16s.
  fcn     x4, x3, x2, x1 after stages 1-4, normalised before fusion (bn(relu(deconv)) + skip).
The 'original' variant adds the skips; 'lowlevel' (FCN_cat.py) concatenates them, so the
transposed convolutions of stages 2-5 take 1024/512/256/128 channels. At width 64 with one
input and one output channel: fcn32s, fcn16s, fcn8s and fcn original have 18,642,561
parameters, fcn lowlevel 20,209,281.

Differences from the reference: its VGG16 starts from ImageNet weights (not available here;
the encoder is initialised as torchvision's VGG before loading them), and the lowlevel
network's concatenation order is [skip, decoder] (fusion.Concat) instead of [decoder, skip],
which only permutes the next layer's input channels.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.errors import UserError
from flmiseg.models import fusion as fusion_lib
from flmiseg.models import layers
from flmiseg.models import vgg

BASE_WIDTH = vgg.BASE_WIDTH

# Model name -> valid variants; only `fcn` has the paper's low-level (concatenation) variant.
VARIANTS = {
    'fcn32s': ('original',),
    'fcn16s': ('original',),
    'fcn8s': ('original',),
    'fcn': ('original', 'lowlevel'),
}

# The fusion operator each variant uses when `fusion` is '' (as the reference).
DEFAULT_FUSION = {'original': 'add', 'lowlevel': 'concat'}

# `skips` setting -> number of encoder features fused (x4, then x3, x2, x1).
SKIP_LEVELS = {'32s': 0, '16s': 1, '8s': 2, 'all': 4}

# Model name -> `skips` setting.
NAME_SKIPS = {'fcn32s': '32s', 'fcn16s': '16s', 'fcn8s': '8s', 'fcn': 'all'}

# Output channels of the five transposed convolutions at base width 64.
DECONV_CHANNELS = (512, 256, 128, 64, 32)


def _check_choice(setting: str, value: str, valid) -> None:
  if value not in valid:
    raise UserError(f'{setting}={value!r} is not valid; valid values: {", ".join(valid)}')


def resolve_fusion(variant: str, fusion: str) -> str:
  """The fusion operator name: `fusion`, or the variant's default when it is ''."""
  _check_choice('config.model.variant', variant, tuple(DEFAULT_FUSION))
  name = fusion or DEFAULT_FUSION[variant]
  fusion_lib.get_fusion(name)  # raises UserError listing the operators on a typo
  return name


class FCN(nn.Module):
  """FCN-32s/16s/8s/all-skips on VGG16. Input NHWC of any size.

  Returns (logits (N, H, W, num_classes) float32, aux) with aux['skips'] (the pooled encoder
  features x1..x4, finest first, strides 2..16), aux['bottleneck'] (x5, stride 32) and
  aux['decoder'] (the output of each decoder stage, finest first, strides 1..16).

  Attributes:
    width: channels of VGG16's first block (64 in the reference).
    variant: 'original' (skips added) or 'lowlevel' (skips concatenated); only sets the
      default of `fusion`.
    skips: '32s', '16s', '8s' or 'all' (which encoder features are fused; see the module
      docstring, which also says where each normalises).
    fusion: fusion operator name (flmiseg.models.fusion.FUSIONS); '' = the variant's default.
    num_classes: output channels.
    dtype: computation dtype (parameters stay float32).
  """
  width: int = BASE_WIDTH
  variant: str = 'original'
  skips: str = 'all'
  fusion: str = ''
  num_classes: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _check_choice('skips', self.skips, tuple(SKIP_LEVELS))
    fuse_cls = fusion_lib.get_fusion(resolve_fusion(self.variant, self.fusion))
    num_fused = SKIP_LEVELS[self.skips]
    # The reference's FCN16s/8s normalise the fused sum, its all-skip FCNs the deconvolution.
    norm_after_fusion = self.skips in ('16s', '8s')
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), vgg.STRIDE)
    pyramid = vgg.VGG16Encoder(self.width, dtype=self.dtype, name='encoder')(x, train)
    y = pyramid[-1]
    decoded = []
    for stage, channels in enumerate(DECONV_CHANNELS, start=1):
      features = layers.scaled(self.width, BASE_WIDTH, channels)
      y = layers.ConvTranspose(features, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)),
                               dtype=self.dtype, name=f'deconv{stage}')(y)
      y = nn.relu(y)
      norm = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                              name=f'bn{stage}')
      if stage <= num_fused:
        # Stage k upsamples to stride 2**(5-k), the stride of pyramid[4 - k].
        fuse = fuse_cls(dtype=self.dtype, name=f'fuse{stage}')
        skip = pyramid[len(pyramid) - 1 - stage]
        y = norm(fuse(y, skip, train)) if norm_after_fusion else fuse(norm(y), skip, train)
      else:
        y = norm(y)
      decoded.insert(0, y)
    logits = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(y)
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'skips': pyramid[:-1], 'bottleneck': pyramid[-1], 'decoder': decoded}


FCN32s = functools.partial(FCN, skips='32s')
FCN16s = functools.partial(FCN, skips='16s')
FCN8s = functools.partial(FCN, skips='8s')
FCNTiny = functools.partial(FCN, width=4)


def build(model_config, dtype) -> nn.Module:
  """The FCN named by `model_config` (a `config.model`).

  Reads .name ('fcn32s', 'fcn16s', 'fcn8s' or 'fcn'), .variant, .width, .fusion ('' = the
  variant's default: add for original, concat for lowlevel; it has no effect on fcn32s)
  and .num_classes. Raises UserError on an unknown name, variant or fusion.
  """
  name, variant = model_config.name, model_config.variant
  _check_choice('config.model.name', name, tuple(VARIANTS))
  _check_choice('config.model.variant', variant, VARIANTS[name])
  fusion = resolve_fusion(variant, getattr(model_config, 'fusion', '') or '')
  return FCN(width=model_config.width, variant=variant, skips=NAME_SKIPS[name], fusion=fusion,
             num_classes=model_config.num_classes, dtype=dtype)
