"""The model registry: `config.model.name` -> how to build that model from a `config.model`.

Every model of the zoo registers its builder with `@register_model`; a model of your own does
the same in a file that `config.imports` names (docs/fusion.md), and then trains with
`--config.model.name=<its name>`.
"""

from typing import Any, Callable, NamedTuple

import flax.linen as nn

from flmiseg.core import registry

# build(model_config, dtype) -> the model (a Flax module following the contract of
# flmiseg/models/__init__.py).
Builder = Callable[[Any, Any], nn.Module]


class ModelSpec(NamedTuple):
  """A registered model: its builder, valid `config.model.variant`s and reference base width
  (the `config.model.width` at which it has the reference's parameter count; None: none)."""
  build: Builder
  variants: tuple[str, ...]
  base_width: int | None


# config.model.name -> ModelSpec; filled by `register_model`.
MODELS = registry.Registry('model', 'config.model.name')


def register_model(name: str, *, variants: tuple[str, ...] = ('original',),
                   base_width: int | None = None,
                   override: bool = False) -> Callable[[Builder], Builder]:
  """Decorator: registers build(model_config, dtype) -> nn.Module as `config.model.name=name`.

  Args:
    name: the model's name in configs.
    variants: the valid `config.model.variant` values (the builder reads which one).
    base_width: the reference's `config.model.width`, if any (docs and the paper table).
    override: replace a model registered under `name` instead of raising ValueError.
  Returns:
    The decorator; it returns the builder unchanged, so one builder can serve several names.
  """
  def register(build: Builder) -> Builder:
    MODELS.add(name, ModelSpec(build, tuple(variants), base_width), override=override)
    return build
  return register
