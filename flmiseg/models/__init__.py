"""The model zoo: every model is a pure Flax Linen module looked up by name.

Contract shared by every model (tests rely on it):
  * `__call__(self, x, train: bool = False) -> (logits, aux)`; x is NHWC float of any
    spatial size (models pad to their stride and crop back); logits are float32
    (N, H, W, num_classes) with num_classes=1 (a foreground logit) by default.
  * aux is a dict; models with several outputs (deep supervision, side outputs) put the
    extra logits, each (N, H, W, 1) float32, under aux['side_outputs'] (the loss averages over
    the final and side outputs; evaluation uses the final one).
  * fields `width` (base width; the reference's at its default), `num_classes`, `dtype`
    (computation dtype; parameters stay float32).
  * BatchNorm running statistics live in the 'batch_stats' collection.

`create_model(model_config, dtype)` builds one from `config.model`.
"""

from typing import Any, Callable

import flax.linen as nn

from flmiseg.errors import UserError
from flmiseg.models import unet


def _unet(cfg, dtype):
  return unet.UNet(width=cfg.width, num_classes=cfg.num_classes, dtype=dtype)


# name -> (builder(model_config, dtype) -> nn.Module, valid variants, default base width).
MODELS: dict[str, tuple[Callable[[Any, Any], nn.Module], tuple[str, ...], int]] = {
    'unet': (_unet, ('original',), 64),
}


def create_model(model_config, dtype) -> nn.Module:
  """Builds the model named by `model_config.name` / `.variant` (a `config.model`)."""
  name, variant = model_config.name, model_config.variant
  if name not in MODELS:
    raise UserError(f'config.model.name={name!r} is not a model; valid names: '
                    f'{", ".join(sorted(MODELS))}')
  builder, variants, _ = MODELS[name]
  if variant not in variants:
    raise UserError(f'config.model.variant={variant!r} is not a variant of {name!r}; valid '
                    f'variants: {", ".join(variants)}')
  return builder(model_config, dtype)
