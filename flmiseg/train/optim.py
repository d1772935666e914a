"""Optimisers and learning-rate schedules (optax), built from `config.optim`.

Optimisers: 'sgd' (momentum, L2 weight decay added to the gradient as torch.optim.SGD does),
'adam' (L2 weight decay, as torch.optim.Adam), 'adamw' (decoupled weight decay).
Schedules: 'step' (the reference's: multiply by decay_rate every decay_epochs epochs),
'cosine', 'poly' (polynomial, power `power`), 'constant'; each with an optional linear warmup
of `warmup_steps` steps. `grad_clip` > 0 clips the global gradient norm first.
"""

import math

import optax

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('step', 'cosine', 'poly', 'constant')


def make_schedule(cfg, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `cfg` (a config.optim) over total_steps."""
  lr, warmup = cfg.lr, cfg.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  if cfg.schedule == 'step':
    every = max(1, int(round(cfg.decay_epochs * steps_per_epoch)))
    main = optax.exponential_decay(lr, transition_steps=every, decay_rate=cfg.decay_rate,
                                   staircase=True)
  elif cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_factor)
  elif cfg.schedule == 'poly':
    main = optax.polynomial_schedule(lr, lr * cfg.end_lr_factor, cfg.power, decay_steps)
  elif cfg.schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f'config.optim.schedule={cfg.schedule!r} is not a schedule; valid names: '
                     f'{", ".join(SCHEDULES)}')
  if warmup <= 0:
    return main
  ramp = optax.linear_schedule(0.0, lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser of `cfg` (a config.optim) driven by `schedule`."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f'config.optim.name={cfg.name!r} is not an optimiser; valid names: '
                     f'{", ".join(OPTIMIZERS)}')
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.name == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=cfg.weight_decay))
  else:
    if cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(cfg.weight_decay))
    if cfg.name == 'sgd':
      parts.append(optax.sgd(schedule, momentum=cfg.momentum or None))
    else:
      parts.append(optax.adam(schedule))
  return optax.chain(*parts)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  return max(1, math.ceil(num_train / batch_size))
