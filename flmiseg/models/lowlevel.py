"""The paper's strategy as one wrapper: `lowlevel(backbone, fusion=...)` for any encoder.

The paper's fix for general-purpose segmentation models on fluorescence microscopy images is
(1) a group of convolutions at the ORIGINAL image scale as the input layer and (2) a decoder
that fuses every scale of the encoder, handing low-level features straight to the prediction
layer. `LowLevelSegmenter` applies both to any encoder that returns a feature pyramid (a
module whose `__call__(x, train)` returns a list of NHWC features, finest first):

  input layer   DoubleConv(width) on the image at full resolution, in parallel with the
                backbone (which runs on the image itself, so any encoder fits unchanged);
  decoder       the coarsest feature is projected (1x1 conv-BN-ReLU); then, coarsest to
                finest, each backbone feature is projected to the decoder's channel count,
                fused with the (bilinearly upsampled) decoder feature by the chosen fusion
                operator (flmiseg/models/fusion.py) and refined by a DoubleConv; last, the
                same with the full-resolution input-layer features;
  head          a 1x1 convolution on the full-resolution decoder feature.

Relation to the reference's hand-modified `lowlevel` variants (cbmi-group/icss-segmentation):
  * DeepLabv3+ lowlevel (models/deeplab_v3_modified.py, DeepLab/modeling/decoder_modified.py)
    makes the ResNet stem stride 1 (7x7 conv; the max-pool stays, so layer1..3 run at 1/2,
    1/4 and 1/8 and layer4, dilated, at 1/8) and replaces the decoder: ASPP output, then
    layer3, layer2, layer1 and the stem, each projected by 1x1 conv-BN-ReLU to the incoming
    decoder width, concatenated (or added) and refined by a DoubleConv (256, 128, 64), with
    align_corners=True upsampling; at full scale two 3x3 conv-BN-ReLU (256, with dropout
    0.5/0.1) and a 1x1 head. This wrapper builds the same kind of decoder (projection to the
    decoder width + fusion + DoubleConv per level, coarse to fine), with these differences:
    the full-resolution features come from an added input layer instead of a stride-1 stem
    (the encoder keeps its own stem, so a ResNet keeps its 1/2..1/16 pyramid and costs far
    less at full scale); there is no ASPP (the coarsest feature, layer4, enters through a
    projection); layer4 is fused too; the last stage is a DoubleConv(width) without dropout;
    upsampling uses align_corners=False (jax.image.resize); any fusion operator can be used.
  * FCN lowlevel (models/FCN_cat.py) concatenates the VGG16 pooled features x4..x1 with the
    deconvolution outputs (deconv inputs 1024/512/256/128) and has no full-resolution
    encoder feature at all; SegNet lowlevel (models/segnet_modified.py) concatenates the
    pre-pooling encoder features after each unpooling, the finest at full resolution. Both
    are the same idea (every level fused on the way up) inside their own decoders. Faithful
    ports of those three belong to the models' own `lowlevel` variants; this wrapper is the
    general recipe for any encoder.

`build(model_config, dtype)` wraps the encoder named by `model_config.backbone` (resnet50,
resnet101, vgg16, or one of your own registered with `@register_backbone('name')`; the
registry is flmiseg/models/backbones.py, docs/fusion.md) with its `backbone_kwargs`.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.models import backbones
from flmiseg.models import fusion as fusion_lib
from flmiseg.models import layers
from flmiseg.models import zoo

# Decoder channels per level as multiples of `width` (level 0: full scale); deeper levels
# repeat the last entry, as the reference's decoder stays at 256 = 4 * 64 channels.
DECODER_MULTIPLIERS = (1, 1, 2, 4)


class LowLevelSegmenter(nn.Module):
  """Any feature-pyramid encoder + full-scale input layer + all-level fusion decoder.

  Input NHWC of any size (padded to `stride` and cropped back); returns
  (logits (N, H, W, num_classes) float32, aux) with aux['pyramid'] (the backbone's features,
  finest first), aux['skips'] (the input-layer features followed by the pyramid but its
  coarsest level), aux['bottleneck'] (the pyramid's coarsest level, where the decoder
  starts), aux['decoder'] (the decoder feature after each fusion, finest first) and
  aux['side_outputs'] ([]).

  Attributes:
    backbone: encoder; `backbone(x, train=train)` returns a list of NHWC features, finest
      first, at any strides.
    fusion: the fusion operator, a module factory called as fusion(dtype=..., name=...)
      (flmiseg/models/fusion.py; e.g. fusion.SEConcat or functools.partial of it).
    width: base width: the input layer's channels; the decoder's are multiples of it.
    num_classes: output channels.
    stride: the backbone's total stride; inputs are padded to a multiple of it.
    decoder_widths: channels of the decoder after fusing each level, finest first (level 0
      is the input layer), one per level: len(pyramid) + 1 entries; None: width times
      DECODER_MULTIPLIERS. The last entry is the projection width of the coarsest feature.
    dtype: computation dtype of the input layer, decoder and head.
    ablate: decoder inputs to zero at inference, for the feature-importance analysis
      (experiments/paper/feature_importance.py): 'skip0' (the full-scale input layer) ..
      'skip{L-1}' (the pyramid's levels but the coarsest), 'bottleneck' (the coarsest
      feature, where the decoder starts).
  """
  backbone: nn.Module
  fusion: Callable[..., nn.Module] = fusion_lib.Concat
  width: int = 64
  num_classes: int = 1
  stride: int = 32
  decoder_widths: Sequence[int] | None = None
  dtype: Any = jnp.float32
  ablate: tuple[str, ...] = ()

  def _widths(self, levels: int) -> tuple[int, ...]:
    if self.decoder_widths is None:
      last = len(DECODER_MULTIPLIERS) - 1
      return tuple(self.width * DECODER_MULTIPLIERS[min(k, last)] for k in range(levels))
    if len(self.decoder_widths) != levels:
      raise ValueError(f'decoder_widths needs {levels} entries (input layer + {levels - 1} '
                       f'backbone levels), got {len(self.decoder_widths)}')
    return tuple(self.decoder_widths)

  def _project(self, x, features: int, name: str, train: bool):
    return layers.ConvBNReLU(features, kernel_size=1, use_bias=False, dtype=self.dtype,
                             name=name)(x, train)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), self.stride)
    full = layers.DoubleConv(self.width, dtype=self.dtype, name='input_layer')(x, train)
    pyramid = list(self.backbone(x, train=train))
    skips = [full] + pyramid
    widths = self._widths(len(skips))
    deepest = jnp.zeros_like(skips[-1]) if 'bottleneck' in self.ablate else skips[-1]
    y = self._project(deepest, widths[-1], f'project{len(skips) - 1}', train)
    decoded = []
    for level in reversed(range(len(skips) - 1)):
      skip = skips[level]
      if f'skip{level}' in self.ablate:
        skip = jnp.zeros_like(skip)
      # Backbone features always pass a 1x1 projection (as in the reference): it sets their
      # channels to the decoder's, so every operator (add included) applies.
      if level > 0 or skip.shape[-1] != y.shape[-1]:
        skip = self._project(skip, y.shape[-1], f'project{level}', train)
      y = self.fusion(dtype=self.dtype, name=f'fuse{level}')(y, skip, train)
      y = layers.DoubleConv(widths[level], dtype=self.dtype, name=f'decode{level}')(y, train)
      decoded.insert(0, y)
    logits = layers.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='head')(y)
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'pyramid': pyramid, 'skips': skips[:-1], 'bottleneck': skips[-1],
                    'decoder': decoded, 'side_outputs': []}


def lowlevel(backbone: nn.Module, fusion: Callable[..., nn.Module] = fusion_lib.Concat,
             width: int = 64, num_classes: int = 1, dtype: Any = jnp.float32,
             stride: int | None = None, decoder_widths: Sequence[int] | None = None,
             in_channels: int = 1) -> LowLevelSegmenter:
  """Wraps a feature-pyramid encoder into a full segmenter with the paper's two changes.

  Args:
    backbone: encoder module; `backbone(x, train=train)` returns NHWC features, finest first.
    fusion: the fusion operator: a module factory (e.g. flmiseg.models.fusion.SEConcat, or
      your own module class), called as fusion(dtype=..., name=...).
    width: base width of the input layer and decoder.
    num_classes: output channels.
    dtype: computation dtype of the added layers.
    stride: the backbone's total stride; None: `backbones.backbone_stride` (the encoder's
      `total_stride`, else measured).
    decoder_widths: see LowLevelSegmenter.
    in_channels: image channels, only used to measure the stride.
  Returns:
    The LowLevelSegmenter module.
  Raises:
    TypeError when `fusion` is not callable (a name: names are resolved from a config, by
    flmiseg.models.create_model, or with flmiseg.models.fusion.get_fusion).
  """
  if not callable(fusion):
    raise TypeError(f'fusion={fusion!r} is not a module factory; pass the operator itself, '
                    'e.g. flmiseg.models.fusion.get_fusion(name)')
  if stride is None:
    stride = backbones.backbone_stride(backbone, in_channels)
  return LowLevelSegmenter(backbone=backbone, fusion=fusion, width=width,
                           num_classes=num_classes, stride=stride,
                           decoder_widths=None if decoder_widths is None
                           else tuple(decoder_widths), dtype=dtype)


# The paper's strategy applied to any encoder (config.model.backbone picks it).
@zoo.register_model('lowlevel', variants=('wrapped',), base_width=64)
def build(model_config, dtype) -> LowLevelSegmenter:
  """The wrapper around the encoder named by `model_config.backbone` ('' = resnet50).

  Reads .backbone, .backbone_kwargs (the encoder's settings), .width, .fusion ('' = concat),
  .fusion_kwargs and .num_classes of a `config.model`. Raises UserError on an unknown
  backbone or fusion operator, or a kwarg either does not take.
  """
  encoder, stride = backbones.from_config(model_config, dtype, model='lowlevel')
  return lowlevel(encoder, fusion=fusion_lib.from_config(model_config, fusion_lib.Concat),
                  width=model_config.width, num_classes=model_config.num_classes,
                  dtype=dtype, stride=stride)
