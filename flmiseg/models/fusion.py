"""Fusion operators: join a decoder feature with an encoder (skip) feature.

Interface (every operator is a Flax module, or a factory of one, with this call):
  op(dtype=..., name=...)(decoder, skip, train=False) -> fused
decoder and skip are NHWC; the decoder feature is first resized (bilinear) to the skip's
spatial size when they differ, then fused. Models take the operator as such a factory
(`Callable[..., nn.Module]`, e.g. the class `Concat`); names are resolved only when a model is
built from a config (`from_config`, called by `flmiseg.models.create_model`): `FUSIONS` maps
`config.model.fusion` to the operator, and `config.model.fusion_kwargs` sets its fields. To add
one, decorate it with `@register_fusion('name')`, in this file or in a file of your own named by
`config.imports` (docs/fusion.md). `fused_channels(op, c_decoder, c_skip)` tells a decoder how
many channels an operator returns.

Output channels (C_d: decoder, C_s: skip):
  add             C_s (needs C_d == C_s)
  concat          C_s + C_d  ([skip, decoder])
  attention_gate  C_s + C_d  ([alpha * skip, decoder])
  weighted_sum    C_s        (the decoder is projected to C_s by a 1x1 conv when C_d != C_s)
  se_concat       C_s + C_d  ([skip, decoder] rescaled per channel)
"""

import functools
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flmiseg.core import registry
from flmiseg.core.errors import UserError
from flmiseg.models import layers

# A fusion operator: a Flax module class, or any callable returning one, called as
# op(dtype=..., name=...); its other fields come from config.model.fusion_kwargs.
Fusion = Callable[..., nn.Module]

# config.model.fusion -> operator; filled by `register_fusion`.
FUSIONS = registry.Registry('fusion operator', 'config.model.fusion')


def register_fusion(name: str, *, override: bool = False) -> Callable[[Fusion], Fusion]:
  """Decorator: registers a fusion operator (module class or factory) under `name`.

  The operator is then `config.model.fusion=name`, for every model that takes one. Raises
  ValueError when `name` is taken, unless `override` (which replaces the registered one).
  """
  return FUSIONS.decorator(name, override=override)


@register_fusion('add')
class Add(nn.Module):
  """decoder + skip (channel counts must match)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, skip, train: bool = False):
    decoder = layers.resize_to(decoder, skip.shape[1:3])
    if decoder.shape[-1] != skip.shape[-1]:
      raise ValueError(f'add fusion needs equal channels, got {decoder.shape[-1]} and '
                       f'{skip.shape[-1]}')
    return decoder + skip


@register_fusion('concat')
class Concat(nn.Module):
  """concatenate([skip, decoder]) along channels: C_skip + C_decoder channels."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, skip, train: bool = False):
    decoder = layers.resize_to(decoder, skip.shape[1:3])
    return jnp.concatenate([skip, decoder.astype(skip.dtype)], axis=-1)


@register_fusion('attention_gate')
class AttentionGate(nn.Module):
  """Additive attention on the skip (Oktay et al. 2018), then [alpha * skip, decoder].

  With g the decoder feature (resized to the skip's size) and x the skip:
    alpha = sigmoid(psi(relu(W_x x + W_g g)))   (N, H, W, 1), in [0, 1]
  where W_x, W_g are 1x1 convolutions to `inter_channels` and psi a 1x1 convolution to one
  channel. Unlike Oktay et al., alpha is computed at the skip's resolution (g is upsampled
  first) so no resampling of alpha is needed. Returns concatenate([alpha * x, g]):
  C_skip + C_decoder channels. alpha is also sown as intermediates['alpha'] (apply with
  mutable=['intermediates'] to read it).

  Attributes:
    inter_channels: channels of the joint embedding; None: max(1, C_skip // 2).
    dtype: computation dtype.
  """
  inter_channels: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, skip, train: bool = False):
    g = layers.resize_to(decoder, skip.shape[1:3]).astype(self.dtype)
    x = skip.astype(self.dtype)
    inter = self.inter_channels or max(1, skip.shape[-1] // 2)
    # One bias suffices in the sum; W_x carries none, as in the paper.
    theta = layers.Conv(inter, (1, 1), use_bias=False, dtype=self.dtype, name='w_x')(x)
    phi = layers.Conv(inter, (1, 1), dtype=self.dtype, name='w_g')(g)
    psi = layers.Conv(1, (1, 1), dtype=self.dtype, name='psi')(nn.relu(theta + phi))
    alpha = nn.sigmoid(psi)
    if not self.is_initializing():  # keep `init`'s variables free of an intermediates entry
      self.sow('intermediates', 'alpha', alpha)
    return jnp.concatenate([alpha * x, g], axis=-1)


@register_fusion('weighted_sum')
class WeightedSum(nn.Module):
  """Fast normalised fusion (BiFPN, Tan et al. 2020): learned non-negative scalar weights.

  out = (w_d * decoder + w_s * skip) / (w_d + w_s + eps), w_i = relu(p_i), p initialised to
  ones (so it starts as the plain average). When C_decoder != C_skip the decoder is first
  projected to C_skip channels by a 1x1 convolution (at the decoder's own resolution, which
  is cheaper and equal to projecting after the linear resize). Output: C_skip channels.

  Attributes:
    eps: keeps the normalisation finite when both weights reach zero.
    dtype: computation dtype.
  """
  eps: float = 1e-4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, skip, train: bool = False):
    if decoder.shape[-1] != skip.shape[-1]:
      decoder = layers.Conv(skip.shape[-1], (1, 1), dtype=self.dtype, name='project')(decoder)
    decoder = layers.resize_to(decoder, skip.shape[1:3]).astype(self.dtype)
    p = self.param('weights', nn.initializers.ones, (2,), jnp.float32)
    w = nn.relu(p).astype(self.dtype)
    return (w[0] * decoder + w[1] * skip.astype(self.dtype)) / (w[0] + w[1] + self.eps)


@register_fusion('se_concat')
class SEConcat(nn.Module):
  """concatenate([skip, decoder]) rescaled by squeeze-and-excitation (Hu et al. 2018).

  s = mean over H, W of the concatenation (N, C); e = sigmoid(Dense_C(relu(Dense_r(s))))
  with r = max(C // reduction, min_channels); out = concat * e per channel.
  Output: C_skip + C_decoder channels.

  Attributes:
    reduction: channel reduction of the excitation bottleneck.
    min_channels: floor of the bottleneck width, so narrow features keep a usable gate.
    dtype: computation dtype.
  """
  reduction: int = 16
  min_channels: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, skip, train: bool = False):
    decoder = layers.resize_to(decoder, skip.shape[1:3])
    x = jnp.concatenate([skip, decoder.astype(skip.dtype)], axis=-1).astype(self.dtype)
    c = x.shape[-1]
    squeezed = jnp.mean(x, axis=(1, 2))
    hidden = max(c // self.reduction, self.min_channels)
    z = nn.relu(layers.Dense(hidden, dtype=self.dtype, name='squeeze')(squeezed))
    e = nn.sigmoid(layers.Dense(c, dtype=self.dtype, name='excite')(z))
    return x * e[:, None, None, :]


def get_fusion(name: str) -> Fusion:
  """The fusion operator registered under `name`; UserError listing the valid names."""
  return FUSIONS.resolve(name)


def from_config(model_config, default: Fusion) -> Fusion:
  """The operator a `config.model` asks for, with its `fusion_kwargs` bound.

  Args:
    model_config: reads .fusion (a registered name; '' = `default`) and .fusion_kwargs
      (the operator's fields, e.g. {'reduction': 8}; missing or empty: its defaults).
    default: the model's own operator, used when .fusion is ''.
  Returns:
    A factory called as op(dtype=..., name=...): the operator itself without kwargs, else
    a functools.partial binding them.
  Raises:
    UserError naming the setting for an unknown name, or a kwarg the operator does not take.
  """
  name = getattr(model_config, 'fusion', '') or ''
  op = get_fusion(name) if name else default
  kwargs = getattr(model_config, 'fusion_kwargs', None) or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
  if not kwargs:
    return op
  accepted = operator_fields(op)
  for key in kwargs:
    if accepted is not None and key not in accepted:
      name = name or next((n for n, entry in FUSIONS.items() if entry is op),
                          getattr(op, '__name__', repr(op)))
      raise UserError(f'config.model.fusion_kwargs.{key}: not a field of the fusion operator '
                      f'{name!r} (its fields: {", ".join(sorted(accepted)) or "none"})')
  return functools.partial(op, **kwargs)


def operator_fields(op: Fusion) -> set[str] | None:
  """The keyword arguments `op` takes besides dtype (and a Flax module's parent and name);
  None when it takes any (**kwargs) or its signature cannot be read."""
  try:
    parameters = inspect.signature(op).parameters.values()
  except (TypeError, ValueError):
    return None
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return None
  return {p.name for p in parameters if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)
          and p.name not in ('dtype', 'parent', 'name')}


def fused_channels(op: Fusion | str, c_decoder: int, c_skip: int) -> int:
  """Channels of `op`'s output for decoder/skip features of c_decoder/c_skip channels.

  `op` is an operator (factory) or a registered name. Found by tracing the operator on tiny
  inputs (shape only), so it holds for any operator, including ones added later. Raises
  UserError for an unknown name and ValueError where the operator cannot fuse those channel
  counts (add with C_d != C_s).
  """
  return _traced_channels(get_fusion(op) if isinstance(op, str) else op, c_decoder, c_skip)


@functools.lru_cache(maxsize=None)
def _traced_channels(op: Fusion, c_decoder: int, c_skip: int) -> int:
  module = op()
  decoder = jnp.zeros((1, 2, 2, c_decoder), jnp.float32)
  skip = jnp.zeros((1, 4, 4, c_skip), jnp.float32)
  out, _ = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), decoder, skip))
  return int(out.shape[-1])
