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

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import fusion as fusion_lib
from flmiseg.models import layers
from flmiseg.models import vgg
from flmiseg.models import zoo

BASE_WIDTH = vgg.BASE_WIDTH

# Model name -> valid variants; only `fcn` has the paper's low-level (concatenation) variant.
VARIANTS = {
    'fcn32s': ('original',),
    'fcn16s': ('original',),
    'fcn8s': ('original',),
    'fcn': ('original', 'lowlevel'),
}

# The fusion operator each variant uses by default (as the reference).
DEFAULT_FUSION = {'original': fusion_lib.Add, 'lowlevel': fusion_lib.Concat}

# `skips` setting -> number of encoder features fused (x4, then x3, x2, x1).
SKIP_LEVELS = {'32s': 0, '16s': 1, '8s': 2, 'all': 4}

# Model name -> `skips` setting.
NAME_SKIPS = {'fcn32s': '32s', 'fcn16s': '16s', 'fcn8s': '8s', 'fcn': 'all'}

# Output channels of the five transposed convolutions at base width 64.
DECONV_CHANNELS = (512, 256, 128, 64, 32)


def default_fusion(variant: str) -> Callable[..., nn.Module]:
  """The variant's own fusion operator: add ('original') or concat ('lowlevel')."""
  if variant not in DEFAULT_FUSION:
    raise ValueError(f'variant={variant!r} is not an FCN variant; valid: '
                     f'{", ".join(DEFAULT_FUSION)}')
  return DEFAULT_FUSION[variant]


class FCN(nn.Module):
  """FCN-32s/16s/8s/all-skips on VGG16. Input NHWC of any size.

  Returns (logits (N, H, W, num_classes) float32, aux) with aux['skips'] (the pooled encoder
  features x1..x4, finest first, strides 2..16), aux['bottleneck'] (x5, stride 32),
  aux['decoder'] (the output of each decoder stage, finest first, strides 1..16) and
  aux['side_outputs'] ([]).

  Attributes:
    width: channels of VGG16's first block (64 in the reference).
    variant: 'original' (skips added) or 'lowlevel' (skips concatenated); only sets the
      default of `fusion`.
    skips: '32s', '16s', '8s' or 'all' (which encoder features are fused; see the module
      docstring, which also says where each normalises).
    fusion: the fusion operator, a module factory called as fusion(dtype=..., name=...)
      (flmiseg/models/fusion.py); None: the variant's default (DEFAULT_FUSION).
    num_classes: output channels.
    dtype: computation dtype (parameters stay float32).
  """
  width: int = BASE_WIDTH
  variant: str = 'original'
  skips: str = 'all'
  fusion: Callable[..., nn.Module] | None = None
  num_classes: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.skips not in SKIP_LEVELS:
      raise ValueError(f'skips={self.skips!r} is not valid; valid: {", ".join(SKIP_LEVELS)}')
    fuse_cls = self.fusion or default_fusion(self.variant)
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
    return logits, {'skips': pyramid[:-1], 'bottleneck': pyramid[-1], 'decoder': decoded,
                    'side_outputs': []}


@zoo.register_model('fcn', variants=VARIANTS['fcn'], base_width=BASE_WIDTH)
@zoo.register_model('fcn8s', variants=VARIANTS['fcn8s'], base_width=BASE_WIDTH)
@zoo.register_model('fcn16s', variants=VARIANTS['fcn16s'], base_width=BASE_WIDTH)
@zoo.register_model('fcn32s', variants=VARIANTS['fcn32s'], base_width=BASE_WIDTH)
def build(model_config, dtype) -> nn.Module:
  """The FCN named by `model_config` (a `config.model`).

  Reads .name ('fcn32s', 'fcn16s', 'fcn8s' or 'fcn'), .variant, .width, .fusion ('' = the
  variant's default: add for original, concat for lowlevel; it has no effect on fcn32s),
  .fusion_kwargs and .num_classes. Raises ValueError on a name or variant that is not an
  FCN's (create_model checks them first), UserError on an unknown fusion operator.
  """
  name, variant = model_config.name, model_config.variant
  if name not in VARIANTS:
    raise ValueError(f'config.model.name={name!r} is not an FCN; valid: {", ".join(VARIANTS)}')
  if variant not in VARIANTS[name]:
    raise ValueError(f'config.model.variant={variant!r} is not a variant of {name!r}; valid: '
                     f'{", ".join(VARIANTS[name])}')
  fusion = fusion_lib.from_config(model_config, default_fusion(variant))
  return FCN(width=model_config.width, variant=variant, skips=NAME_SKIPS[name], fusion=fusion,
             num_classes=model_config.num_classes, dtype=dtype)
