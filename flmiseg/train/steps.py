"""The train state and the pure, jit-compiled steps.

`train_step(state, batch, ...)` and `predict_step(state, batch, ...)` are pure functions;
static things (the loss of flmiseg/train/losses.py, the schedule, the threshold) are bound
with functools.partial before jax.jit. The batch is sharded over the mesh's 'data' axis and
the state replicated, so BatchNorm statistics, the loss and the gradients are over the
global batch.
"""

import functools
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from flmiseg.train import losses
from flmiseg.evaluation import metrics
from flmiseg.core import sharding


class TrainState(train_state.TrainState):
  """step, params, opt_state (+ apply_fn, tx, static) and BatchNorm statistics."""
  batch_stats: Any = None


def create_train_state(model, tx, sample_hw, seed: int, mesh) -> TrainState:
  """Initialises parameters (float32) replicated over the mesh."""
  def init(key):
    x = jnp.zeros((1, *sample_hw, 1), jnp.float32)
    variables = model.init({'params': key, 'dropout': key}, x, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables.get('batch_stats', {}), tx=tx)
  key = jax.random.key(seed)
  # One sharding for the whole output tree (a pytree prefix): the model is traced once.
  lowered = jax.jit(init, out_shardings=sharding.replicated(mesh)).lower(key)
  # Initialisation runs once: on CPU, XLA's optimisation passes cost seconds (4 s of 5 for the
  # default U-Net) and gain nothing; the parameters are bit-identical at level 0.
  cpu = mesh.devices.flat[0].platform == 'cpu'
  options = {'xla_backend_optimization_level': 0} if cpu else None
  return lowered.compile(compiler_options=options)(key)


def train_step(state: TrainState, batch: dict, *, loss_fn, schedule, dropout_key,
               freeze_batch_stats: bool = False):
  """One optimisation step on a global batch; returns (new_state, metrics).

  The loss is loss_fn(logits, aux, batch) on the model's outputs: a losses.Loss (from
  `losses.from_config`: pixel terms on the foreground logit of the final and side outputs,
  output terms such as the instance head's on everything), or a pixel loss function
  (logits, targets, valid=None), trained as a Loss of that one term. With
  `freeze_batch_stats` the model runs in inference mode (BatchNorm normalises with, and
  keeps, its running statistics; no dropout).
  """
  key = jax.random.fold_in(dropout_key, state.step)
  loss_fn = losses.as_loss(loss_fn)

  def loss_of(params):
    (logits, aux), updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'],
        train=not freeze_batch_stats, mutable=['batch_stats'], rngs={'dropout': key})
    loss = loss_fn(logits, aux, batch)
    return loss, updates.get('batch_stats', state.batch_stats)

  (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  scalars = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
  return new_state, scalars


def predict_step(state: TrainState, batch: dict, *, threshold: float):
  """Outputs (N, H, W, C) and per-image confusion counts of channel 0 at `threshold`.

  Channel 0 is the foreground probability; a model with an instance head adds channel 1, its
  predicted normalised distance (both sigmoids of the logits).
  """
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                             batch['image'], train=False)
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  counts = metrics.confusion_counts(probs[..., :1], batch['mask'], threshold, batch['valid'])
  return probs, counts


def jit_steps(config, loss_fn, schedule, mesh, state_shardings):
  """(train_step, predict_step) jitted with the config's static settings bound.

  loss_fn: `losses.from_config(config)`; a loss of config.train.loss alone (`losses.make_loss`)
  gets the config's instance-head loss added as from_config adds it.
  """
  rep = sharding.replicated(mesh)
  dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  train = jax.jit(
      functools.partial(train_step, loss_fn=losses.from_config(config, loss_fn),
                        schedule=schedule, dropout_key=dropout_key,
                        freeze_batch_stats=config.train.get('freeze_batch_stats', False)),
      out_shardings=(state_shardings, rep), donate_argnums=0)
  return train, jit_predict(config.eval.threshold)


def jit_predict(threshold: float):
  """predict_step jitted with `threshold` bound; works on a TrainState or an InferenceState."""
  return jax.jit(functools.partial(predict_step, threshold=threshold))
