"""Building blocks shared by the models, with PyTorch-equivalent defaults.

Layout is NHWC throughout. Convolution weights use PyTorch's default initialisation
(kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) so that the
reference's training recipes (learning rates of 0.01-0.1 with SGD) behave as they do there.
BatchNorm matches torch.nn.BatchNorm2d (momentum 0.1 there is 0.9 here, eps 1e-5); its
scale and bias live in `params`, its running statistics in `batch_stats`, so the size of the
`params` collection equals the reference's count of trainable parameters.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# torch.nn.ConvTranspose2d stores its weight as (in, out, kh, kw) and so computes its default
# "fan_in" from the OUTPUT channels; Flax's kernel is (kh, kw, in, out).
torch_conv_transpose_init = nn.initializers.variance_scaling(
    1.0 / 3.0, 'fan_in', 'uniform', in_axis=-1, out_axis=-2)

Conv = functools.partial(nn.Conv, kernel_init=torch_conv_init)
Dense = functools.partial(nn.Dense, kernel_init=torch_conv_init)
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class ConvTranspose(nn.Module):
  """nn.ConvTranspose (NHWC, kernel (kh, kw, in, out), PyTorch's default init), computed
  without a dilated convolution when the kernel equals the stride.

  Then the windows do not overlap: every input pixel writes its own kh x kw output patch, so
  the layer is one matrix product and a depth-to-space reshape, equal to nn.ConvTranspose up
  to float rounding. XLA's CPU backend runs the dilated convolution slowly: for the four
  up-convolutions of the width-64 U-Net at batch 4 and 256x256, forward plus backward took
  3.4 s that way and 0.09 s this way (2-core CPU; experiments/benchmarks/benchmark.py,
  docs/benchmarks.md).
  Other kernels and strides use `lax.conv_transpose`, as nn.ConvTranspose does. Parameters
  (names, shapes, initial values) are those of nn.ConvTranspose.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] | None = None
  padding: Any = 'SAME'
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    strides = tuple(self.strides or (1, 1))
    kernel = self.param('kernel', torch_conv_transpose_init, (kh, kw, x.shape[-1],
                                                              self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if (kh, kw) == strides and self.padding in ('SAME', 'VALID'):
      n, h, w, _ = x.shape
      # lax.conv_transpose without transpose_kernel applies the kernel flipped.
      y = jnp.einsum('nhwc,abco->nhawbo', x, kernel[::-1, ::-1])
      y = y.reshape(n, h * kh, w * kw, self.features)
    else:
      y = jax.lax.conv_transpose(x, kernel, strides, self.padding,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class ConvBNReLU(nn.Module):
  """Conv(k x k, PyTorch's symmetric padding) -> BatchNorm -> ReLU (unless relu=False)."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    k, d = self.kernel_size, self.dilation
    pad = d * (k - 1) // 2
    x = Conv(self.features, (k, k), strides=self.strides, padding=((pad, pad), (pad, pad)),
             kernel_dilation=d, use_bias=self.use_bias, dtype=self.dtype)(x)
    x = BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    return nn.relu(x) if self.relu else x


class DoubleConv(nn.Module):
  """Two ConvBNReLU(3x3), as in U-Net."""
  features: int
  mid_features: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = ConvBNReLU(self.mid_features or self.features, dtype=self.dtype)(x, train)
    return ConvBNReLU(self.features, dtype=self.dtype)(x, train)


def scaled(width: int, base: int, channels: int) -> int:
  """Channel count `channels` of the reference (built at base width `base`) at `width`."""
  return max(1, channels * width // base)


def pad_to_multiple(x: jax.Array, multiple: int) -> tuple[jax.Array, tuple[int, int]]:
  """Zero-pads an NHWC batch at the bottom/right so H and W are multiples of `multiple`.

  Returns the padded batch and the original (H, W), to crop the output back with
  `crop_to(y, hw)`. Every model calls this so that any input size works.
  """
  h, w = x.shape[1], x.shape[2]
  ph, pw = (-h) % multiple, (-w) % multiple
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x, (h, w)


def crop_to(y: jax.Array, hw: Sequence[int]) -> jax.Array:
  """Crops an NHWC batch to its top-left (H, W) = hw."""
  return y[:, :hw[0], :hw[1], :]


def resize_to(x: jax.Array, hw: Sequence[int], method: str = 'bilinear') -> jax.Array:
  """Resizes an NHWC batch to spatial size hw (align_corners=False semantics)."""
  if tuple(x.shape[1:3]) == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[3]), method=method)


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
  # window_shape by keyword: the nn.max_pool that jax2onnx substitutes during an ONNX export
  # (flmiseg/export/onnx_graph.py) takes it only so.
  return nn.max_pool(x, window_shape=(window, window), strides=(window, window))


def _linear_taps(n_in: int, n_out: int, align_corners: bool):
  """Source indices (lo, hi) and weights of hi for 1-D linear resampling, as PyTorch."""
  o = np.arange(n_out, dtype=np.float64)
  if align_corners:
    src = o * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
  else:
    # PyTorch clamps the half-pixel source coordinate at 0 (no mirror at the top-left).
    src = np.maximum((o + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(x: jax.Array, hw: Sequence[int], align_corners: bool = False) -> jax.Array:
  """Resizes an NHWC batch to hw exactly as torch's F.interpolate(mode='bilinear').

  Unlike `resize_to` (jax.image.resize), downsampling does not antialias: each output pixel
  interpolates its two nearest source pixels per axis, so 2x downsampling is a 2x2 mean and
  4x downsampling reads only the middle two pixels of each 4-block, as the PyTorch references
  do. align_corners=True maps corner pixels onto corner pixels (nn.Upsample(...,
  align_corners=True)). Computes in x.dtype.
  """
  for axis, n_out in ((1, hw[0]), (2, hw[1])):
    n_in = x.shape[axis]
    if n_in == n_out:
      continue
    lo, hi, frac = _linear_taps(n_in, n_out, align_corners)
    shape = [1] * x.ndim
    shape[axis] = n_out
    f = jnp.asarray(frac, x.dtype).reshape(shape)
    x = jnp.take(x, lo, axis=axis) * (1 - f) + jnp.take(x, hi, axis=axis) * f
  return x
