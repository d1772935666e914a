"""DeepLabv3+ (Chen et al. 2018) as the reference builds it, and its low-level variant.

original  ResNet-50/101 encoder (7x7 stride-2 stem, max-pool, output stride 16, multi-grid
          dilated layer4) -> ASPP (1x1, three 3x3 at rates 6/12/18, image pooling; 256
          channels, 1x1 projection, dropout 0.5) -> decoder: upsample x4 to layer1, concatenate
          its 48-channel 1x1 projection, two 3x3 conv-BN-ReLU (256, dropout 0.5 / 0.1), 1x1
          head, upsample to the input. 40,340,769 parameters (ResNet-50, width 64).
lowlevel  the stem is stride 1 (full-resolution features) and the decoder fuses ALL five
          levels, coarse to fine: ASPP output with layer3 (1x1 projection to 256), DoubleConv
          256; upsample, layer2 (projection 256), DoubleConv 128; layer1 (projection 128),
          DoubleConv 64; the stem (projection 64) at full scale; then the two 3x3 conv-BN-ReLU
          and the head. Fusion by concatenation (43,048,129 parameters) or, with fusion='add',
          addition (41,942,209), or any operator of flmiseg.models.fusion.
The encoder is any five-level one of the backbone registry (flmiseg/models/backbones.py):
`config.model.backbone` ('' = resnet50, whose counts these are; resnet101) with its
`config.model.backbone_kwargs`. Upsampling is bilinear with align_corners=True, as the
reference. The reference module also holds layers its forward pass never uses (a layer4
projection and leftovers, 1,594,208 parameters); this port has only the parameters that
receive gradients.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import backbones
from flmiseg.models import fusion as fusion_lib
from flmiseg.models import layers
from flmiseg.models import resnet
from flmiseg.models import zoo

VARIANTS = ('original', 'lowlevel')
LEVELS = 5  # the encoder's feature levels: a ResNet's stem and layer1..layer4
BASE_WIDTH = resnet.BASE_WIDTH
ASPP_RATES = (6, 12, 18)  # at output stride 16


def _up(x, hw):
  return layers.resize_bilinear(x, hw, align_corners=True)


# Conv (no bias, PyTorch padding) -> BatchNorm -> ReLU.
ConvBN = functools.partial(layers.ConvBNReLU, use_bias=False)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling with an image-pooling branch."""
  features: int = 256
  rates: tuple[int, ...] = ASPP_RATES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    branches = [ConvBN(self.features, 1, dtype=self.dtype)(x, train)]
    branches += [ConvBN(self.features, 3, dilation=r, dtype=self.dtype)(x, train)
                 for r in self.rates]
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = ConvBN(self.features, 1, dtype=self.dtype)(pooled, train)
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = ConvBN(self.features, 1, dtype=self.dtype)(jnp.concatenate(branches, -1), train)
    return nn.Dropout(0.5, deterministic=not train)(y)


class Head(nn.Module):
  """Two 3x3 conv-BN-ReLU with dropout 0.5 / 0.1, then a 1x1 classifier (with bias)."""
  features: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvBN(self.features, 3, dtype=self.dtype)(x, train)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = ConvBN(self.features, 3, dtype=self.dtype)(x, train)
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return layers.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+. Input NHWC of any size; returns (logits (N, H, W, num_classes), aux).

  aux holds 'skips' (the encoder pyramid but its coarsest level: stem, layer1..layer3 for a
  ResNet, finest first), 'bottleneck' (the coarsest level, layer4, which ASPP reads), 'aspp'
  and 'side_outputs' ([]).
  Attributes:
    width: base width (ResNet stem channels; 64 in the reference); the ASPP and decoder
      widths scale with it.
    variant: 'original' or 'lowlevel'.
    encoder: the encoder, a module whose call (x, train=train) returns five NHWC features,
      finest first (flmiseg/models/backbones.py; `build` makes it from config.model.backbone);
      None: the reference's ResNet-50 at `width`, its stem at stride 2 ('original') or 1
      ('lowlevel').
    stride: the encoder's total stride (inputs are padded to a multiple of it); None: its
      `total_stride` attribute.
    fusion: the lowlevel decoder's fusion operator, a module factory called as
      fusion(dtype=..., name=...) (flmiseg/models/fusion.py); no effect on 'original'.
    num_classes, dtype: as every model.
  """
  width: int = BASE_WIDTH
  variant: str = 'original'
  encoder: nn.Module | None = None
  stride: int | None = None
  fusion: Callable[..., nn.Module] = fusion_lib.Concat
  num_classes: int = 1
  dtype: Any = jnp.float32

  def _decode_original(self, aspp, skips, train):
    s = functools.partial(layers.scaled, self.width, BASE_WIDTH)
    low = ConvBN(s(48), 1, dtype=self.dtype, name='project1')(skips[1], train)
    x = _up(aspp, low.shape[1:3])
    x = jnp.concatenate([x, low], axis=-1)
    return Head(s(256), self.num_classes, self.dtype, name='head')(x, train)

  def _decode_lowlevel(self, aspp, skips, train):
    s = functools.partial(layers.scaled, self.width, BASE_WIDTH)
    x = aspp
    # (level, projection width, DoubleConv width after fusing); None: no DoubleConv.
    plan = ((3, 256, 256), (2, 256, 128), (1, 128, 64), (0, 64, None))
    for level, proj, out in plan:
      skip = ConvBN(s(proj), 1, dtype=self.dtype, name=f'project{level}')(skips[level], train)
      x = _up(x, skip.shape[1:3])
      x = self.fusion(dtype=self.dtype, name=f'fuse{level}')(x, skip, train)
      if out is not None:
        x = layers.DoubleConv(s(out), dtype=self.dtype, name=f'decode{level}')(x, train)
    return Head(s(256), self.num_classes, self.dtype, name='head')(x, train)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in VARIANTS:
      raise ValueError(f'variant={self.variant!r} is not a DeepLabv3+ variant; valid: '
                       f'{", ".join(VARIANTS)}')
    lowlevel = self.variant == 'lowlevel'
    encoder = self.encoder
    if encoder is None:
      encoder = resnet.ResNetEncoder(width=self.width, stem_stride=1 if lowlevel else 2,
                                     output_stride=16, dtype=self.dtype, name='encoder')
    stride = self.stride or getattr(encoder, 'total_stride', None)
    if not stride:
      raise ValueError('DeepLabV3Plus: the encoder has no total_stride; pass stride= (its '
                       'total stride)')
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), stride)
    skips = list(encoder(x, train=train))
    if len(skips) != LEVELS:
      raise ValueError(f'DeepLabV3Plus needs an encoder with {LEVELS} feature levels (a '
                       f'ResNet\'s stem and layer1..layer4), got {len(skips)}')
    s = functools.partial(layers.scaled, self.width, BASE_WIDTH)
    aspp = ASPP(s(256), dtype=self.dtype, name='aspp')(skips[-1], train)
    decode = self._decode_lowlevel if lowlevel else self._decode_original
    logits = _up(decode(aspp, skips, train), x.shape[1:3])
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'skips': skips[:-1], 'bottleneck': skips[-1], 'aspp': aspp,
                    'side_outputs': []}


@zoo.register_model('deeplabv3p', variants=VARIANTS, base_width=BASE_WIDTH)
def build(model_config, dtype) -> nn.Module:
  """DeepLabV3Plus from a `config.model` (.variant, .width, .backbone ('' = resnet50) and
  .backbone_kwargs, .fusion ('' = concat), .fusion_kwargs, .num_classes).

  The encoder comes from the backbone registry (flmiseg/models/backbones.py); the lowlevel
  variant builds it with stem_stride=1, so it takes the encoders that have that setting.
  Raises UserError naming the setting for an unknown or unfit backbone or fusion operator.
  """
  lowlevel = model_config.variant == 'lowlevel'
  encoder, stride = backbones.from_config(
      model_config, dtype, model='deeplabv3p lowlevel' if lowlevel else 'deeplabv3p',
      **({'stem_stride': 1} if lowlevel else {}))
  fusion = fusion_lib.from_config(model_config, fusion_lib.Concat)
  return DeepLabV3Plus(width=model_config.width, variant=model_config.variant,
                       encoder=encoder, stride=stride, fusion=fusion,
                       num_classes=model_config.num_classes, dtype=dtype)
