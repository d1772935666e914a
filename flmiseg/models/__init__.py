"""The model zoo: every model is a pure Flax Linen module looked up by name.

Contract shared by every model (tests rely on it):
  * `__call__(self, x, train: bool = False) -> (logits, aux)`; x is NHWC float of any
    spatial size (models pad to their stride and crop back); logits are float32
    (N, H, W, num_classes) with num_classes=1 (a foreground logit) by default.
  * config.model.instance_head='distance' adds one output channel (the last): the logit of
    each object's normalised distance map (flmiseg/instances.py); channel 0 stays the
    foreground logit, and side outputs are trained on their channel 0 only.
  * aux is a dict; models with several outputs (deep supervision, side outputs) put the
    extra logits, each (N, H, W, 1) float32, under aux['side_outputs'] (the loss averages over
    the final and side outputs; evaluation uses the final one). aux also carries encoder
    features (e.g. aux['skips'], finest first) for fusion research.
  * fields `width` (base width; the reference's at its default), `num_classes`, `dtype`
    (computation dtype; parameters stay float32).
  * BatchNorm running statistics live in the 'batch_stats' collection.

`create_model(model_config, dtype)` builds one from `config.model`; `MODELS` lists them with
their variants and the reference's base width.
"""

from typing import Any, Callable

import flax.linen as nn
import ml_collections

from flmiseg import instances
from flmiseg.errors import UserError
from flmiseg.models import agnet
from flmiseg.models import deeplabv3p
from flmiseg.models import fcn
from flmiseg.models import fusion
from flmiseg.models import hrnet
from flmiseg.models import lowlevel
from flmiseg.models import segnet
from flmiseg.models import unet
from flmiseg.models import unet_pp


def _unet(cfg, dtype):
  return unet.UNet(width=cfg.width, num_classes=cfg.num_classes, dtype=dtype)


def _agnet(cfg, dtype):
  # One-logit heads: the reference's parameter count for one output channel (9,326,216);
  # agnet.AGNet(single_logit_heads=False) keeps its 2-class softmax heads instead.
  return agnet.AGNet(width=cfg.width, num_classes=cfg.num_classes, single_logit_heads=True,
                     dtype=dtype)


Builder = Callable[[Any, Any], nn.Module]

# name -> (builder(model_config, dtype) -> nn.Module, valid variants, reference base width).
MODELS: dict[str, tuple[Builder, tuple[str, ...], int]] = {
    'unet': (_unet, ('original',), unet.UNet.width),
    'unet_pp': (unet_pp.build, unet_pp.VARIANTS, unet_pp.BASE_WIDTH),
    'agnet': (_agnet, agnet.VARIANTS, agnet.BASE_WIDTH),
    'fcn32s': (fcn.build, fcn.VARIANTS['fcn32s'], fcn.BASE_WIDTH),
    'fcn16s': (fcn.build, fcn.VARIANTS['fcn16s'], fcn.BASE_WIDTH),
    'fcn8s': (fcn.build, fcn.VARIANTS['fcn8s'], fcn.BASE_WIDTH),
    'fcn': (fcn.build, fcn.VARIANTS['fcn'], fcn.BASE_WIDTH),
    'segnet': (segnet.build, segnet.VARIANTS['segnet'], segnet.BASE_WIDTH),
    'deeplabv3p': (deeplabv3p.build, deeplabv3p.VARIANTS, deeplabv3p.BASE_WIDTH),
    'hrnetv2': (hrnet.build, hrnet.VARIANTS, hrnet.BASE_WIDTH),
    # The paper's strategy applied to any encoder (config.model.backbone picks it).
    'lowlevel': (lowlevel.build, ('wrapped',), 64),
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
  if model_config.get('fusion'):  # a mistyped name fails even for models that ignore it
    fusion.get_fusion(model_config.fusion)
  head = model_config.get('instance_head', '')
  if head not in instances.HEADS:
    raise UserError(f'config.model.instance_head={head!r} is not an instance head; valid: '
                    "distance or '' (none)")
  if head:  # one more output channel: the normalised distance (flmiseg/instances.py)
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.num_classes += 1
  return builder(model_config, dtype)
