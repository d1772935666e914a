"""Test setup: JAX sees 8 CPU devices, so sharded code is tested sharded.

Compilation dominates the suite's time on a CPU, so the tests (and the subprocesses they start,
which inherit the environment) compile with XLA's optimisations mostly off
(jax_disable_most_optimizations: the tiny test models run slower, but compile 2-3x faster;
and XLA's older CPU emitter, tests/helpers.py: COMPILE_FAST, another 3x)
and share a persistent compilation cache, so a program compiled by one test or CLI process is
loaded, not compiled again, by the next. Set these variables yourself to override either.
The suite runs in two processes (pytest-xdist, `-n 2`: README's test command), one per core.

This must run before JAX initialises its backend, hence at conftest import time.
"""

import os
import pathlib
import tempfile

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(
    pathlib.Path(tempfile.gettempdir()) / f'flmiseg-test-jax-cache-{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Simulated datasets and other caches of the tests go to a folder of their own (one per
# pytest-xdist worker), never into the user's ~/.cache/flmiseg.
os.environ['FLMISEG_CACHE'] = str(
    pathlib.Path(tempfile.gettempdir()) /
    f'flmiseg-test-cache-{os.getuid()}-{os.environ.get("PYTEST_XDIST_WORKER", "main")}')

from tests import helpers  # noqa: E402  (imports no JAX)

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count=8 {helpers.COMPILE_FAST}'
                           ).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; parse them once for the test process.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, worker_id):
  """(config, workdir) of a tiny U-Net trained for 40 steps on blob data (test IoU about 0.8:
  a model that really segments, so predict tests can compare masks), shared by the tests
  that only read a trained run (predict, feature importance); they must not modify it.
  Trained once per test session: pytest-xdist's workers share it through this session's
  temporary folder, the first to need it training it under a file lock."""
  import filelock  # pylint: disable=g-import-not-at-top
  from flmiseg.train import trainer  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  if worker_id == 'master':  # no xdist: this process's own folder
    root = tmp_path_factory.mktemp('tiny_run')
  else:  # the session's folder, which every worker's temporary folders lie in
    root = tmp_path_factory.getbasetemp().parent / 'tiny_run'
  with filelock.FileLock(f'{root}.lock'):
    data = root / 'data'
    config = helpers.tiny_config(data, **{'train.num_steps': 40, 'eval.every_steps': 20,
                                           'optim.lr': 1e-2})
    if not (root / 'trained').is_file():
      helpers.write_blob_dataset(data, num_train=8, num_test=3)
      trainer.train_and_evaluate(config, root / 'work')
      (root / 'trained').touch()
  return config, root / 'work'
