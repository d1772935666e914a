"""Fusion operators: join a decoder feature with an encoder (skip) feature.

Interface (every operator is a Flax module with this call):
  op(decoder, skip, train=False) -> fused
decoder and skip are NHWC; the decoder feature is first resized (bilinear) to the skip's
spatial size when they differ, then fused. Operators are looked up by name from `FUSIONS`
(`config.model.fusion`); to add one, write a module with that call and register it in FUSIONS.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flmiseg.errors import UserError
from flmiseg.models import layers


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


class Concat(nn.Module):
  """concatenate([skip, decoder]) along channels: C_skip + C_decoder channels."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, decoder, skip, train: bool = False):
    decoder = layers.resize_to(decoder, skip.shape[1:3])
    return jnp.concatenate([skip, decoder.astype(skip.dtype)], axis=-1)


FUSIONS: dict[str, type[nn.Module]] = {
    'add': Add,
    'concat': Concat,
}


def get_fusion(name: str) -> type[nn.Module]:
  """The fusion module class registered under `name`."""
  if name not in FUSIONS:
    raise UserError(f'config.model.fusion={name!r} is not a fusion operator; valid names: '
                    f'{", ".join(sorted(FUSIONS))}')
  return FUSIONS[name]
