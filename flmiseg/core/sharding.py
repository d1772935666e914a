"""Data parallelism over every device: one mesh axis 'data'.

The batch is sharded on 'data', the train state replicated. Host batches (each process's own
shard) become global arrays at one boundary, `global_batch`, so the same code runs on one CPU,
8 fake CPU devices, one GPU, or many hosts.
"""

import json

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from flmiseg.core.errors import UserError


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh, axis 'data', over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def data_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P('data'))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, setting: str = 'config.train.batch_size') -> None:
  """Raises a UserError unless the global batch splits evenly over devices and processes."""
  n = jax.device_count()
  if global_batch % n:
    suggestion = max(n, (global_batch // n) * n)
    raise UserError(f'{setting}={global_batch} is not divisible by the {n} devices; set it '
                    f'to a multiple of {n}, e.g. {setting}={suggestion}')


def global_batch(batch: dict, mesh) -> dict:
  """Turns this process's host batch (numpy, leading batch axis) into global jax.Arrays.

  Each process passes its own local shard; the result's leading axis is the global batch,
  sharded over 'data'.
  """
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def replicate(tree, mesh):
  """Places a pytree of arrays replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def to_host(tree):
  """Fetches global arrays to every host as numpy (gathering across processes if needed)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def from_primary(value):
  """Process 0's `value` (JSON-serialisable: dicts, lists, numbers, strings, None) on every
  process; what the other processes pass is ignored. Host-side results computed once, on
  process 0, reach every process this way. One process: `value` itself."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = json.dumps(value).encode() if jax.process_index() == 0 else b''
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buffer = np.zeros(size, np.uint8)
  buffer[:len(data)] = np.frombuffer(data, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))))
