"""SegNet (Badrinarayanan et al. 2017) as the reference builds it, and its low-level variant.

Encoder: VGG16's five blocks with BatchNorm (3x3 conv-BN-ReLU x 2, 2, 3, 3, 3 at 64, 128,
256, 512, 512 channels for width 64), each followed by 2x2 max-pooling that records where
each maximum was. Decoder, coarsest first: max-unpooling with those positions (every value
goes back where its maximum came from, zeros elsewhere), then a VGG block mirroring the
encoder's whose last convolution narrows to the next finer block's width; the finest decoder
block is one conv-BN-ReLU followed by a 3x3 convolution to the output (no BatchNorm). At width
64 with one input and one output channel it has 29,442,433 parameters, as the reference
(models/segnet.py).

The 'lowlevel' variant (models/segnet_modified.py) fuses, after each unpooling, the encoder
feature that was pooled there (the pre-pooling block output, the finest at full resolution)
by concatenation: 34,935,169 parameters. Any operator of flmiseg.models.fusion can replace
the concatenation (`fusion`); the concatenation order is [encoder, decoder] (fusion.Concat),
the reference's [decoder, encoder] only permutes the next convolution's input channels.
Convolutions are initialised as the reference's (kaiming normal, fan_out; zero bias).
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flmiseg.models import fusion as fusion_lib
from flmiseg.models import layers
from flmiseg.models import vgg
from flmiseg.models import zoo

BASE_WIDTH = vgg.BASE_WIDTH

# Model name -> valid variants.
VARIANTS = {'segnet': ('original', 'lowlevel')}

# Fusion of the lowlevel variant by default (the reference concatenates).
DEFAULT_FUSION = fusion_lib.Concat


def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 max-pooling (stride 2) that also returns where each maximum was.

  Args:
    x: (N, H, W, C); an odd last row/column is dropped (PyTorch's ceil_mode=False).
  Returns:
    pooled (N, H // 2, W // 2, C) and argmax (N, H // 2, W // 2, C) int32: the position of
    the maximum inside its 2x2 window, row-major (0: top-left, 1: top-right, 2: bottom-left,
    3: bottom-right); ties go to the first position, as in PyTorch.
  """
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  windows = x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c)
  windows = windows.transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, 4, c)
  argmax = jnp.argmax(windows, axis=3).astype(jnp.int32)
  pooled = jnp.take_along_axis(windows, argmax[:, :, :, None, :], axis=3)[:, :, :, 0]
  return pooled, argmax


def max_unpool(y: jax.Array, argmax: jax.Array,
               output_hw: Sequence[int] | None = None) -> jax.Array:
  """Inverse of `max_pool_with_argmax`: puts each value back at its argmax, zeros elsewhere.

  A one-hot mask multiplication rather than an index scatter: linear in y (its gradient
  gathers the cotangent at the argmax positions, i.e. it is the adjoint of the pooling's
  selection), static-shaped and jit-friendly.

  Args:
    y: (N, h, w, C) values to place.
    argmax: (N, h, w, C) window positions from `max_pool_with_argmax`.
    output_hw: (H, W) of the pooled feature, to restore a dropped odd row/column with
      zeros; None: (2h, 2w).
  Returns:
    (N, H, W, C) with y[n, i, j, c] at (2i + argmax // 2, 2j + argmax % 2).
  """
  n, h, w, c = y.shape
  mask = jax.nn.one_hot(jax.lax.stop_gradient(argmax), 4, axis=3, dtype=y.dtype)
  out = (mask * y[:, :, :, None, :]).reshape(n, h, w, 2, 2, c)
  out = out.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)
  if output_hw is not None:
    out = jnp.pad(out, ((0, 0), (0, output_hw[0] - 2 * h), (0, output_hw[1] - 2 * w), (0, 0)))
  return out


class SegNet(nn.Module):
  """SegNet. Input NHWC of any size (padded to a multiple of 32 and cropped back).

  Returns (logits (N, H, W, num_classes) float32, aux) with aux['skips'] (the five encoder
  block outputs before pooling, finest first, strides 1..16: what the lowlevel variant
  fuses), aux['bottleneck'] (the last pooled feature, stride 32), aux['decoder'] (the
  output of each decoder block, finest first, strides 1..16) and aux['side_outputs'] ([]).

  Attributes:
    width: channels of the first block (64 in the reference).
    variant: 'original' (no skips) or 'lowlevel' (encoder features fused after unpooling).
    fusion: the lowlevel variant's fusion operator, a module factory called as
      fusion(dtype=..., name=...) (flmiseg/models/fusion.py). No effect on 'original'.
    num_classes: output channels.
    dtype: computation dtype (parameters stay float32).
  """
  width: int = BASE_WIDTH
  variant: str = 'original'
  fusion: Callable[..., nn.Module] = DEFAULT_FUSION
  num_classes: int = 1
  dtype: Any = jnp.float32

  def _encode(self, x, train: bool):
    skips, argmaxes = [], []
    for k, (channels, num_convs) in enumerate(vgg.STAGES):
      x = vgg.VGGBlock(layers.scaled(self.width, BASE_WIDTH, channels), num_convs,
                       batch_norm=True, dtype=self.dtype, name=f'enc{k + 1}')(x, train)
      skips.append(x)
      x, argmax = max_pool_with_argmax(x)
      argmaxes.append(argmax)
    return x, skips, argmaxes

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.variant not in VARIANTS['segnet']:
      raise ValueError(f'variant={self.variant!r} is not a SegNet variant; valid: '
                       f'{", ".join(VARIANTS["segnet"])}')
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), vgg.STRIDE)
    y, skips, argmaxes = self._encode(x, train)
    bottleneck = y
    decoded = []
    for k in reversed(range(len(vgg.STAGES))):
      y = max_unpool(y, argmaxes[k], skips[k].shape[1:3])
      if self.variant == 'lowlevel':
        y = self.fusion(dtype=self.dtype, name=f'fuse{k + 1}')(y, skips[k], train)
      channels, num_convs = vgg.STAGES[k]
      features = layers.scaled(self.width, BASE_WIDTH, channels)
      if k > 0:
        narrow_to = layers.scaled(self.width, BASE_WIDTH, vgg.STAGES[k - 1][0])
        block = vgg.VGGBlock(features, num_convs, out_features=narrow_to, batch_norm=True,
                             dtype=self.dtype, name=f'dec{k + 1}')
      else:  # the head below is the finest block's last convolution
        block = vgg.VGGBlock(features, num_convs - 1, batch_norm=True, dtype=self.dtype,
                             name=f'dec{k + 1}')
      y = block(y, train)
      decoded.insert(0, y)
    logits = layers.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)),
                         kernel_init=vgg.conv_init, bias_init=nn.initializers.zeros,
                         dtype=self.dtype, name='head')(y)
    logits = layers.crop_to(logits, hw).astype(jnp.float32)
    return logits, {'skips': skips, 'bottleneck': bottleneck, 'decoder': decoded,
                    'side_outputs': []}


@zoo.register_model('segnet', variants=VARIANTS['segnet'], base_width=BASE_WIDTH)
def build(model_config, dtype) -> nn.Module:
  """The SegNet described by `model_config` (a `config.model`).

  Reads .name ('segnet'), .variant, .width, .fusion ('' = concat; only the lowlevel variant
  fuses), .fusion_kwargs and .num_classes. Raises ValueError on a name or variant that is not
  SegNet's (create_model checks them first), UserError on an unknown fusion operator.
  """
  name, variant = model_config.name, model_config.variant
  if name not in VARIANTS:
    raise ValueError(f'config.model.name={name!r} is not a SegNet; valid: '
                     f'{", ".join(VARIANTS)}')
  if variant not in VARIANTS[name]:
    raise ValueError(f'config.model.variant={variant!r} is not a variant of {name!r}; valid: '
                     f'{", ".join(VARIANTS[name])}')
  fusion = fusion_lib.from_config(model_config, DEFAULT_FUSION)
  return SegNet(width=model_config.width, variant=variant, fusion=fusion,
                num_classes=model_config.num_classes, dtype=dtype)
