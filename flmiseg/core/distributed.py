"""Multi-host start-up: JAX's own distributed runtime.

When launched as several processes (Slurm with one task per host or per GPU, or by hand with
the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables),
`initialize()` connects them before any device is used; each process then feeds its own shard
of the data. A single process needs nothing.
"""

import os

import jax


def initialize() -> None:
  """Calls jax.distributed.initialize() when this is one of several processes."""
  explicit = bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if not (explicit or slurm):
    return
  # Cross-process collectives on CPU devices need gloo; GPUs use NCCL regardless.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  else:
    jax.distributed.initialize()  # Slurm: everything is read from the environment.
