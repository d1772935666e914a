"""Encoders by name: `config.model.backbone` -> an encoder, for every model that takes one.

An encoder (backbone) is a Flax module whose call `encoder(x, train=train)` takes NHWC images
and returns its feature pyramid: a list of NHWC features, finest first. The models that take
one resolve `config.model.backbone` here, so they share one set of names:
  lowlevel    the paper's wrapper (lowlevel.py): any encoder; '' = resnet50;
  deeplabv3p  DeepLabv3+ (deeplabv3p.py): a five-level encoder; '' = resnet50. Its lowlevel
              variant runs the encoder's stem at stride 1 (full-resolution features), so it
              takes the encoders whose builder has a `stem_stride` keyword.

`@register_backbone(name, stride=...)` registers build(model_config, dtype, **kwargs) ->
encoder. The builder reads what it needs of a `config.model` (e.g. .width); its keyword
arguments are the encoder's settings, set by `config.model.backbone_kwargs`
(`--config.model.backbone_kwargs.output_stride=8`) and by the model that asks for it
(deeplabv3p lowlevel: stem_stride=1). Built in: resnet50 and resnet101 (keywords stem_stride,
output_stride; flmiseg/models/resnet.py) and vgg16 (keyword batch_norm; vgg.py).
"""

import dataclasses
import inspect
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flmiseg.core import registry
from flmiseg.core.errors import UserError
from flmiseg.models import resnet
from flmiseg.models import vgg

# build(model_config, dtype, **kwargs) -> the encoder module.
Builder = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A registered encoder.

  Attributes:
    build: build(model_config, dtype, **kwargs) -> the encoder module; kwargs are its
      settings (`config.model.backbone_kwargs`).
    stride: its total stride (inputs are padded to a multiple of it); None: the encoder's
      `total_stride` attribute if it has one, else measured once per build
      (`backbone_stride`).
  """
  build: Builder
  stride: int | None = None


# config.model.backbone -> Backbone; filled by `register_backbone`.
BACKBONES = registry.Registry('backbone', 'config.model.backbone')


def register_backbone(name: str, *, stride: int | None = None,
                      override: bool = False) -> Callable[[Builder], Builder]:
  """Decorator: registers an encoder builder for `--config.model.backbone=name`.

  The decorated function is build(model_config, dtype, **kwargs) -> an encoder module whose
  call `(x, train=train)` returns NHWC features, finest first (docs/fusion.md); its keyword
  arguments (with defaults) are what `config.model.backbone_kwargs` may set. `stride`: the
  encoder's total stride (None: its `total_stride` attribute, else measured). Returns the
  builder unchanged. Raises ValueError when `name` is taken, unless `override`.
  """
  def register(build_fn: Builder) -> Builder:
    BACKBONES.add(name, Backbone(build_fn, stride), override=override)
    return build_fn
  return register


def builder_fields(build_fn: Builder) -> set[str] | None:
  """The keyword arguments a builder takes besides (model_config, dtype); None when it takes
  any (**kwargs) or its signature cannot be read."""
  try:
    parameters = list(inspect.signature(build_fn).parameters.values())[2:]
  except (TypeError, ValueError):
    return None
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return None
  return {p.name for p in parameters if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def _takes(entry: Backbone, keys) -> bool:
  fields = builder_fields(entry.build)
  return fields is None or set(keys) <= fields


def from_config(model_config, dtype, *, model: str, default: str = 'resnet50',
                **required) -> tuple[nn.Module, int]:
  """The encoder a `config.model` names, built with its `backbone_kwargs`, and its stride.

  Args:
    model_config: reads .backbone (a registered name; '' = `default`), .backbone_kwargs (the
      builder's keyword arguments; missing or empty: its defaults) and what the builder reads
      (e.g. .width).
    dtype: computation dtype, passed to the builder.
    model: the model that asks, for messages ('deeplabv3p lowlevel').
    default: the encoder used when .backbone is ''.
    **required: keyword arguments the model sets itself (deeplabv3p lowlevel: stem_stride=1);
      only encoders whose builder takes them are valid.
  Returns:
    (encoder module, its total stride).
  Raises:
    UserError naming the setting for an unknown or unfit backbone, a kwarg its builder does
    not take, or one the model sets itself.
  """
  name = getattr(model_config, 'backbone', '') or default
  fit = sorted(n for n, entry in BACKBONES.items() if _takes(entry, required))
  if name not in fit:
    needs = f' (it sets the encoder\'s {", ".join(sorted(required))})' if required else ''
    raise UserError(f'config.model.backbone={name!r} is not a backbone of {model}{needs}; '
                    f'valid names: {", ".join(fit)}')
  entry = BACKBONES[name]
  kwargs = getattr(model_config, 'backbone_kwargs', None) or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
  fields = builder_fields(entry.build)
  for key, value in kwargs.items():
    if key in required:
      raise UserError(f'config.model.backbone_kwargs.{key}={value!r}: {model} sets it itself '
                      f'({key}={required[key]!r}); leave it out')
    if fields is not None and key not in fields:
      raise UserError(f'config.model.backbone_kwargs.{key}: not a field of the backbone '
                      f'{name!r} (its fields: {", ".join(sorted(fields)) or "none"})')
  encoder = entry.build(model_config, dtype, **kwargs, **required)
  return encoder, entry.stride or backbone_stride(encoder)


def backbone_stride(backbone: nn.Module, in_channels: int = 1, probe: int = 256) -> int:
  """The total stride of `backbone` (input size / its coarsest feature's size).

  Its `total_stride` attribute when it has one (the built-in encoders), else found
  shape-only (jax.eval_shape) on a probe x probe image; raises ValueError when the probe size
  is not a multiple of the coarsest feature's size.
  """
  declared = getattr(backbone, 'total_stride', None)
  if declared:
    return int(declared)
  x = jnp.zeros((1, probe, probe, in_channels), jnp.float32)
  pyramid, _ = jax.eval_shape(
      lambda: backbone.init_with_output(jax.random.key(0), x, train=False))
  coarsest = min(min(f.shape[1], f.shape[2]) for f in pyramid)
  if probe % coarsest:
    raise ValueError(f'cannot infer the backbone stride from a {probe}x{probe} probe '
                     f'(coarsest feature {coarsest}); pass stride= explicitly')
  return probe // coarsest


def _resnet(depth: int, model_config, dtype: Any, stem_stride: int,
            output_stride: int) -> resnet.ResNetEncoder:
  if stem_stride not in (1, 2):
    raise ValueError(f'config.model.backbone_kwargs.stem_stride={stem_stride!r}: valid: 1, 2')
  if output_stride not in resnet.STAGE_STRIDES:
    raise ValueError(f'config.model.backbone_kwargs.output_stride={output_stride!r}: valid: '
                     f'{", ".join(map(str, sorted(resnet.STAGE_STRIDES)))}')
  return resnet.ResNetEncoder(depth=depth, width=model_config.width, stem_stride=stem_stride,
                              output_stride=output_stride, dtype=dtype)


@register_backbone('resnet50')
def resnet50(model_config, dtype, stem_stride: int = 2,
             output_stride: int = 16) -> resnet.ResNetEncoder:
  """ResNet-50 at .width (64 = ResNet): a stride-2 stem (1: full-resolution features) and
  output stride 16 (or 8) with dilated later stages (flmiseg/models/resnet.py)."""
  return _resnet(50, model_config, dtype, stem_stride, output_stride)


@register_backbone('resnet101')
def resnet101(model_config, dtype, stem_stride: int = 2,
              output_stride: int = 16) -> resnet.ResNetEncoder:
  """ResNet-101, otherwise as `resnet50`."""
  return _resnet(101, model_config, dtype, stem_stride, output_stride)


@register_backbone('vgg16')
def vgg16(model_config, dtype, batch_norm: bool = False) -> vgg.VGG16Encoder:
  """VGG16 at .width (64 = VGG16), without BatchNorm as the reference's FCNs (batch_norm=True:
  after every convolution)."""
  return vgg.VGG16Encoder(width=model_config.width, batch_norm=batch_norm, dtype=dtype)
