"""AG-Net (Zhang et al. 2019): attention-guided filters in a multi-scale-input U-Net.

Encoder: four stages of two conv3-GN-ReLU (widths w, 2w, 4w, 8w; GroupNorm with w groups, i.e.
32 at the reference width) with 2x2 max-pooling; the input, bilinearly downsampled to 1/2,
1/4, 1/8, passes a conv3-ReLU (2w, 4w, 8w channels) and is concatenated to the pooled feature
entering stages 2-4; a centre of two conv3-ReLU (16w, no normalisation) at 1/16.
Decoder, at each of the four finer scales s (1/8 .. 1/1): the guide G_s is the concatenation
of the scale's multi-scale-input feature and encoder feature (at full scale the encoder
feature twice, as the reference); a grid attention gate on (G_s downsampled 2x, decoder
feature) gives a weight map; the attention-weighted fast guided filter lifts the decoder
feature to scale s guided by G_s; three conv3-GN-ReLU follow. A 1x1 head on each of the four
decoder features, upsampled to the input size, gives the side outputs; their mean is a fifth.

Outputs. The reference trains 2-class softmax heads with NLL on all five outputs (the mean
and the four sides, summed) and evaluates the finest side output. With num_classes=1 we keep
2-class heads and return the foreground log-odds z = l[..., 1] - l[..., 0]: sigmoid(z) is the
softmax foreground probability and BCE(z, y) equals the 2-class NLL exactly, so every binary
loss of the project applies. logits is the finest side output; aux['side_outputs'] holds the
mean output then the sides at 1/8, 1/4, 1/2 scale, each (N, H, W, 1) float32.

Parameters at width 32, one input channel: 9,326,700 with the 2-class heads the reference
trains (AG_Net(2)); 9,326,216 with one-logit heads (single_logit_heads=True; AG_Net(1)).
Deviations: the guided filter runs in float32 (the reference: float64); its attention
normaliser sums over each image rather than over the whole batch, so an image's output does
not depend on the rest of its batch (identical for batches of one).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flmiseg.models import layers
from flmiseg.models import zoo

VARIANTS = ('original',)
BASE_WIDTH = 32
_DEPTH = 4
_GF_RADIUS = 2  # the reference's FastGuidedFilter_attention(r=2, eps=1e-2)
_GF_EPS = 1e-2
_ATTENTION_FLOOR = 1e-12  # keeps attention weights, hence the normaliser mean_a, positive


def box_sum(x: jax.Array, r: int) -> jax.Array:
  """Sum over the (2r+1) x (2r+1) window around each pixel, clipped at the borders. NHWC."""
  zero = np.array(0, x.dtype)
  k = 2 * r + 1
  x = jax.lax.reduce_window(x, zero, jax.lax.add, (1, k, 1, 1), (1, 1, 1, 1),
                            ((0, 0), (r, r), (0, 0), (0, 0)))
  return jax.lax.reduce_window(x, zero, jax.lax.add, (1, 1, k, 1), (1, 1, 1, 1),
                               ((0, 0), (0, 0), (r, r), (0, 0)))


def fast_guided_filter(lr_x, lr_y, hr_x, attention, r: int = _GF_RADIUS,
                       eps: float = _GF_EPS) -> jax.Array:
  """Attention-weighted fast guided filter, as the reference's FastGuidedFilter_attention.

  Fits, in each (2r+1)^2 window of the low-resolution guide lr_x, a per-pixel linear model
  lr_y ~ A * lr_x + b weighted by the attention a (the reference's formula, including its
  attention-normalised correction term), box-averages A and b, upsamples them bilinearly and
  applies them to the high-resolution guide: returns A_up * hr_x + b_up.

  Args:
    lr_x: (N, h, w, C) low-resolution guide.
    lr_y: (N, h, w, C) the signal to filter.
    hr_x: (N, H, W, C) high-resolution guide.
    attention: (N, h, w, 1) weights.
    r: window radius.
    eps: regulariser of the slope's denominator.
  Returns:
    (N, H, W, C) float32, whatever the input dtypes (all arithmetic is float32).
  """
  lr_x, lr_y, hr_x, attention = (t.astype(jnp.float32) for t in (lr_x, lr_y, hr_x, attention))
  a = jnp.abs(attention) + _ATTENTION_FLOOR
  t = a / jnp.sum(a, axis=(1, 2, 3), keepdims=True)
  count = box_sum(jnp.ones((1,) + lr_x.shape[1:3] + (1,), jnp.float32), r)
  mean = lambda v: box_sum(v, r) / count
  mean_a, mean_ax, mean_ay = mean(a), mean(a * lr_x), mean(a * lr_y)
  correction = count * mean(t * a * lr_x)
  slope = ((mean(a * a * lr_x * lr_y) - correction * mean_ay) /
           (jnp.abs(mean(a * a * lr_x * lr_x) - correction * mean_ax) + eps))
  intercept = (mean_ay - slope * mean_ax) / mean_a
  hw = hr_x.shape[1:3]
  slope = layers.resize_bilinear(mean(slope), hw)
  intercept = layers.resize_bilinear(mean(intercept), hw)
  return slope * hr_x + intercept


def foreground_log_odds(two_class_logits: jax.Array) -> jax.Array:
  """(..., 2) softmax logits -> (..., 1) log-odds l1 - l0 of class 1.

  sigmoid(l1 - l0) = softmax(l)[1], so BCE on the log-odds equals the 2-class NLL exactly.
  """
  return two_class_logits[..., 1:2] - two_class_logits[..., 0:1]


class GridAttention(nn.Module):
  """Attention weights sigmoid(psi(relu(theta(x) + phi(g)))): (N, h, w, 1) float32.

  x and g are (N, h, w, C) with equal C; theta, phi are 1x1 convolutions C -> C, psi C -> 1
  (all with bias), as the reference's GridAttentionBlock. Computes in float32 whatever the
  input dtype, since its output weights the guided filter's least-squares fit.
  """

  @nn.compact
  def __call__(self, x, g):
    x, g = x.astype(jnp.float32), g.astype(jnp.float32)
    c = x.shape[-1]
    theta = layers.Conv(c, (1, 1), dtype=jnp.float32, name='theta')(x)
    phi = layers.Conv(c, (1, 1), dtype=jnp.float32, name='phi')(g)
    psi = layers.Conv(1, (1, 1), dtype=jnp.float32, name='psi')(nn.relu(theta + phi))
    return nn.sigmoid(psi)


class ConvStack(nn.Module):
  """`num_convs` x [conv3 (no bias) -> GroupNorm (if groups) -> ReLU]. NHWC -> NHWC."""
  features: int
  num_convs: int = 2
  groups: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for _ in range(self.num_convs):
      x = layers.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                      dtype=self.dtype)(x)
      if self.groups:
        # eps as the reference's GroupNorm(eps=1e-10).
        x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-10, dtype=self.dtype)(x)
      x = nn.relu(x)
    return x


class AGNet(nn.Module):
  """AG-Net. Input NHWC of any size; returns (logits (N, H, W, num_classes), aux).

  Attributes:
    width: channels of the first encoder stage (32 in the reference).
    num_classes: 1: 2-class heads turned into one foreground log-odds logit (see the module
      docstring); more: heads of num_classes channels, returned as raw softmax logits.
    single_logit_heads: with num_classes=1, heads of one channel emitting the logit directly
      (the same function class, 484 fewer parameters at width 32) instead of 2-class heads.
    dtype: computation dtype (parameters stay float32); the attention gates and the guided
      filter always compute in float32.
  aux holds 'side_outputs' (mean, then the 1/8, 1/4, 1/2 scale heads), 'skips' (encoder
  features, finest first), 'bottleneck' (the centre), 'attention' (the four attention maps,
  coarsest first, (N, h, w, 1) float32) and 'guided' (the four guided-filter outputs,
  coarsest first, float32).
  """
  width: int = BASE_WIDTH
  num_classes: int = 1
  single_logit_heads: bool = False
  dtype: Any = jnp.float32

  def _encode(self, x):
    """Multi-scale-input encoder: (encoder features finest first, input branches, centre)."""
    w, h_full, w_full = self.width, x.shape[1], x.shape[2]
    stack = functools.partial(ConvStack, groups=w, dtype=self.dtype)
    skips, branches, out = [], [], x
    for level in range(_DEPTH):
      if level:
        # The same image at this level's scale, through its own conv3-ReLU (reference: conv2-4).
        small = layers.resize_bilinear(x, (h_full >> level, w_full >> level))
        branch = nn.relu(layers.Conv(w << level, (3, 3), padding=((1, 1), (1, 1)),
                                     dtype=self.dtype, name=f'conv{level + 1}')(small))
        branches.append(branch)
        out = jnp.concatenate([branch, out], axis=-1)
      skips.append(stack(w << level, name=f'down{level + 1}')(out))
      out = layers.max_pool(skips[-1])
    centre = ConvStack(w << _DEPTH, groups=None, dtype=self.dtype, name='center')(out)
    return skips, branches, centre

  def _decode(self, skips, branches, centre):
    """Attention-guided decoder: (decoder features coarsest first, attention maps, guided)."""
    # Guides, coarsest first; at full scale the reference pairs the feature with itself.
    guides = [jnp.concatenate([b, s], axis=-1) for b, s in zip(branches, skips[1:])][::-1]
    guides.append(jnp.concatenate([skips[0], skips[0]], axis=-1))
    out, features, attentions, guided = centre, [], [], []
    for step, guide in enumerate(guides):
      small = layers.resize_bilinear(guide, (guide.shape[1] // 2, guide.shape[2] // 2))
      alpha = GridAttention(name=f'attention{step + 5}')(small, out)
      filtered = fast_guided_filter(small, out, guide, alpha)
      out = ConvStack(self.width << (_DEPTH - 1 - step), num_convs=3, groups=self.width,
                      dtype=self.dtype, name=f'up{step + 5}')(filtered.astype(self.dtype))
      features.append(out)
      attentions.append(alpha)
      guided.append(filtered)
    return features, attentions, guided

  def _to_logits(self, head_out):
    """Head output (float32) to the returned logits: the log-odds for 2-class heads."""
    if self.num_classes == 1 and not self.single_logit_heads:
      return foreground_log_odds(head_out)
    return head_out

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # GroupNorm only: no batch statistics, no dropout
    x, hw = layers.pad_to_multiple(x.astype(self.dtype), 2**_DEPTH)
    skips, branches, centre = self._encode(x)
    features, attentions, guided = self._decode(skips, branches, centre)
    channels = 2 if self.num_classes == 1 and not self.single_logit_heads else self.num_classes
    # The 1x1 head commutes with bilinear upsampling (an affine map; interpolation weights sum
    # to one), so heads run before upsampling, as cheaply as possible; the reference after it.
    sides = [layers.resize_bilinear(
        layers.Conv(channels, (1, 1), dtype=self.dtype, name=f'side{step + 5}')(f),
        x.shape[1:3]).astype(jnp.float32) for step, f in enumerate(features)]
    outputs = [sum(sides) / len(sides)] + sides
    outputs = [layers.crop_to(self._to_logits(o), hw) for o in outputs]
    aux = {'side_outputs': outputs[:-1], 'skips': skips, 'bottleneck': centre,
           'attention': attentions, 'guided': guided}
    return outputs[-1], aux


AGNet32 = functools.partial(AGNet, width=32)
AGNetTiny = functools.partial(AGNet, width=4)


@zoo.register_model('agnet', variants=VARIANTS, base_width=BASE_WIDTH)
def build(model_config, dtype) -> nn.Module:
  """AGNet from a `config.model` (reads .width and .num_classes)."""
  # One-logit heads: the reference's parameter count for one output channel (9,326,216);
  # AGNet(single_logit_heads=False) keeps its 2-class softmax heads instead.
  return AGNet(width=model_config.width, num_classes=model_config.num_classes,
               single_logit_heads=True, dtype=dtype)
