"""The model zoo: every model is a pure Flax Linen module, built by name from `config.model`.

Contract shared by every model (tests rely on it):
  * `__call__(self, x, train: bool = False) -> (logits, aux)`; x is NHWC float of any
    spatial size (models pad to their stride and crop back); logits are float32
    (N, H, W, num_classes) with num_classes=1 (a foreground logit) by default.
  * config.model.instance_head='distance' adds one output channel (the last): the logit of
    each object's normalised distance map (flmiseg/objects/instances.py); channel 0 stays the
    foreground logit, and side outputs are trained on their channel 0 only.
  * aux is a dict with at least these keys, so analyses (experiments/paper/feature_importance.py,
    fusion research) and the loss need no per-model cases:
      'skips'         list of NHWC encoder features that the decoder (or head) fuses, finest
                      first, without the coarsest one;
      'bottleneck'    the coarsest encoder feature, where the decoder starts (NHWC);
      'side_outputs'  list of extra logits, each (N, H, W, num_classes) float32, for deep
                      supervision ([] for single-output models); the loss averages over the
                      final and side outputs, evaluation uses the final one.
    A model may add its own entries (e.g. 'decoder', 'attention', 'aspp').
  * fields `width` (base width; the reference's at its default), `num_classes`, `dtype`
    (computation dtype; parameters stay float32); models that fuse take the fusion operator
    as a module factory (`fusion`, flmiseg/models/fusion.py), never as a name.
  * BatchNorm running statistics live in the 'batch_stats' collection.

`create_model(model_config, dtype)` builds one from `config.model`, the one place where names
(model, variant, fusion operator, backbone) are resolved. Registries, filled by decorators
that the built-in entries use too, so a model, fusion operator or encoder of your own is one
decorated definition in a file of yours that `config.imports` names (docs/fusion.md):
  MODELS     `@register_model(name, variants=..., base_width=...)` on
             build(model_config, dtype) -> nn.Module (flmiseg/models/zoo.py);
  FUSIONS    `@register_fusion(name)` on an operator class or factory (fusion.py);
  BACKBONES  `@register_backbone(name, stride=...)` on build(model_config, dtype, **kwargs)
             -> encoder, for every model that takes one (lowlevel, deeplabv3p); kwargs are
             `config.model.backbone_kwargs` (backbones.py).
summary.py counts a model's parameters and FLOPs without running it. May import
flmiseg.objects and core.
"""

import flax.linen as nn
import ml_collections

from flmiseg.objects import instances
from flmiseg.core.errors import UserError
# Importing the model modules registers their models, operators and encoders.
from flmiseg.models import unet  # pylint: disable=unused-import
from flmiseg.models import unet_pp  # pylint: disable=unused-import
from flmiseg.models import agnet  # pylint: disable=unused-import
from flmiseg.models import fcn  # pylint: disable=unused-import
from flmiseg.models import segnet  # pylint: disable=unused-import
from flmiseg.models import deeplabv3p  # pylint: disable=unused-import
from flmiseg.models import hrnet  # pylint: disable=unused-import
from flmiseg.models import lowlevel  # pylint: disable=unused-import
from flmiseg.models import fusion
from flmiseg.models.backbones import BACKBONES
from flmiseg.models.backbones import register_backbone
from flmiseg.models.fusion import FUSIONS
from flmiseg.models.fusion import register_fusion
from flmiseg.models.zoo import MODELS
from flmiseg.models.zoo import ModelSpec
from flmiseg.models.zoo import register_model

__all__ = ['BACKBONES', 'FUSIONS', 'MODELS', 'ModelSpec', 'create_model', 'register_backbone',
           'register_fusion', 'register_model']


def create_model(model_config, dtype) -> nn.Module:
  """Builds the model named by `model_config.name` / `.variant` (a `config.model`).

  Raises UserError naming the setting for an unknown model, variant, fusion operator (or a
  `fusion_kwargs` field it does not take), backbone (or a `backbone_kwargs` field) or
  instance head.
  """
  name, variant = model_config.name, model_config.variant
  spec = MODELS.resolve(name)
  if variant not in spec.variants:
    raise UserError(f'config.model.variant={variant!r} is not a variant of {name!r}; valid '
                    f'variants: {", ".join(spec.variants)}')
  if model_config.get('fusion'):  # a mistyped name fails even for models that ignore it
    fusion.from_config(model_config, fusion.Concat)
  head = model_config.get('instance_head', '')
  if head not in instances.HEADS:
    raise UserError(f'config.model.instance_head={head!r} is not an instance head; valid: '
                    "distance or '' (none)")
  if head:  # one more output channel: the normalised distance (flmiseg/objects/instances.py)
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.num_classes += 1
  return spec.build(model_config, dtype)
