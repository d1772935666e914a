"""The engine: Dask runs a function over blocks, on threads, processes or a cluster.

  'threads'    (the default) Dask's threaded scheduler in this process: the model loaded once,
               shared by DEFAULT_THREADS threads (the network runs on all the cores XLA gives
               it; the threads overlap reading, post-processing and writing with it);
  'processes'  Dask's multiprocessing scheduler on a pool of `workers` spawned processes;
  'synchronous' one task at a time in this thread (for debugging and profiling);
  an address   ('tcp://host:8786') of a running dask.distributed scheduler: its workers (on
               a Slurm or Kubernetes cluster through dask-jobqueue or dask-kubernetes).

Tasks are plain functions of a picklable `Job` and one item (a block, a chunk); each worker
process loads the model once (`model_of`) and keeps it for every task it runs. An `Engine`
serves a whole run: its `map` shows one progress bar over the items and returns their
results in order; it connects to an address when it is made, before anything is written.
Dask and distributed are imported when used (the zarr extra), never by importing flmiseg.
"""

import concurrent.futures
import multiprocessing
import os
import threading

import tqdm

from flmiseg.core.errors import UserError

LOCAL = ('threads', 'processes', 'synchronous')
# Threads of the 'threads' scheduler by default: the network already runs on every core; a
# second thread overlaps reading, post-processing and writing with it (each holds a block).
DEFAULT_THREADS = 2
CONNECT_TIMEOUT_S = 10
# What each process of the 'processes' scheduler runs with: one XLA thread (the processes
# share the cores), no numpy threads.
PROCESS_ENV = {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1',
               'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}

_MODELS = {}  # per process: model key -> loaded flmiseg Model
_LOCK = threading.Lock()


def check_scheduler(scheduler: str) -> None:
  """Raises UserError unless `scheduler` is 'threads', 'processes' or an address."""
  if scheduler in LOCAL or '://' in scheduler:
    return
  raise UserError(f'--scheduler={scheduler!r}: valid: threads, processes, synchronous, or the '
                  'address of a dask.distributed scheduler (tcp://host:8786)')


def connect(scheduler: str):
  """A dask.distributed Client of the scheduler at address `scheduler`, or None for the
  local schedulers. Raises UserError (one line) when it cannot be reached."""
  check_scheduler(scheduler)
  if scheduler in LOCAL:
    return None
  import distributed  # pylint: disable=g-import-not-at-top
  try:
    return distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
  except (OSError, TimeoutError, ValueError) as e:
    raise UserError(f'--scheduler={scheduler}: cannot reach a Dask scheduler there '
                    f'({type(e).__name__}: {" ".join(str(e).split())})') from e


def model_of(recipe) -> object:
  """The Model of `recipe` (a `ModelRecipe`), loaded once per process."""
  with _LOCK:
    if recipe.key not in _MODELS:
      _MODELS[recipe.key] = recipe.load()
    return _MODELS[recipe.key]


def share_model(recipe, model) -> None:
  """Lets the tasks of this process use `model` (already loaded) for `recipe`."""
  with _LOCK:
    _MODELS[recipe.key] = model


def _init_process(env: dict) -> None:
  """Before JAX starts its backend in a worker process: its thread limits (added to the
  XLA flags it inherited)."""
  for key, value in env.items():
    os.environ[key] = (f'{os.environ.get(key, "")} {value}'.strip() if key == 'XLA_FLAGS'
                       else value)


class _Bar:
  """A dask local-scheduler callback that moves a tqdm bar once per finished task of
  `keys`."""

  def __init__(self, bar, keys):
    from dask import callbacks  # pylint: disable=g-import-not-at-top
    self.bar, self.keys = bar, set(keys)
    outer = self

    class Callback(callbacks.Callback):
      def _posttask(self, key, result, dsk, state, worker_id):
        if key in outer.keys:
          outer.bar.update(1)

    self.callback = Callback()


class Engine:
  """Runs tasks on one scheduler for a whole run: the 'processes' pool (spawned once, its
  processes keep their model between passes) or the client of an address (`connect`).
  Close it (or use it as a context manager) to end them."""

  def __init__(self, scheduler: str, workers: int = 0):
    self.scheduler = scheduler
    self.workers = workers or (os.cpu_count() or 1 if scheduler == 'processes' else
                               DEFAULT_THREADS)
    self.client = connect(scheduler)
    self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None
    if self.client is not None:
      self.client.close()
      self.client = None

  def _options(self) -> dict:
    if self.scheduler == 'synchronous':
      return {'scheduler': 'synchronous'}
    if self.scheduler != 'processes':
      return {'scheduler': 'threads', 'num_workers': self.workers}
    if self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.workers, mp_context=multiprocessing.get_context('spawn'),
          initializer=_init_process, initargs=(PROCESS_ENV,))
    return {'scheduler': 'processes', 'pool': self._pool}

  def map(self, fn, items: list, desc: str | None = None) -> list:
    """[fn(item) for item in items] on the scheduler, with a progress bar `desc` over the
    items (none without)."""
    if not items:
      return []
    bar = tqdm.tqdm(total=len(items), desc=desc, unit='block', disable=desc is None,
                    leave=False)
    with bar:
      if self.client is not None:
        return _run_distributed(fn, items, self.client, bar)
      import dask  # pylint: disable=g-import-not-at-top
      tasks = [dask.delayed(fn, pure=False)(item) for item in items]
      with _Bar(bar, [t.key for t in tasks]).callback:
        return list(dask.compute(*tasks, **self._options()))


def _run_distributed(fn, items, client, bar) -> list:
  import distributed  # pylint: disable=g-import-not-at-top
  futures = client.map(fn, items, pure=False)
  for _ in distributed.as_completed(futures, loop=client.loop):
    bar.update(1)
  return client.gather(futures)
