"""Model size and cost without running the model: parameter count (shape-only
initialisation) and forward FLOPs per image from XLA's cost analysis of the lowered program
(FLOP = 2 x multiply-add)."""

import jax
import jax.numpy as jnp

from flmiseg import models


def count_params(model, hw=(64, 64)) -> int:
  """Number of parameters in the 'params' collection (BatchNorm statistics excluded)."""
  shapes = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                         jnp.zeros((1, *hw, 1)), train=False))
  return int(sum(x.size for x in jax.tree.leaves(shapes['params'])))


def forward_flops(model, hw) -> float:
  """Forward FLOPs for one (H, W) single-channel image in inference mode."""
  variables = jax.eval_shape(
      lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                         jnp.zeros((1, *hw, 1)), train=False))
  x = jax.ShapeDtypeStruct((1, *hw, 1), jnp.float32)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)[0]).lower(variables, x)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def model_summary(model_config, hw, dtype=jnp.float32) -> dict:
  """{'params': int, 'flops': float} for the model `config.model` describes."""
  model = models.create_model(model_config, dtype)
  return {'params': count_params(model), 'flops': forward_flops(model, hw)}
