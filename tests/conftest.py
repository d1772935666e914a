"""Test setup: JAX sees 8 CPU devices, so sharded code is tested sharded.

This must run before JAX initialises its backend, hence at conftest import time.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; parse them once for the test process.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
