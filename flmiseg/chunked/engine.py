"""The engine: Dask runs a function over blocks, on threads, processes or a cluster.

  'threads'    (the default) Dask's threaded scheduler in this process: the model loaded once,
               shared by the threads (the network runs on all the cores XLA gives it; the
               threads overlap reading, post-processing and writing with it);
  'processes'  Dask's multiprocessing scheduler on a pool of `workers` spawned processes;
  an address   ('tcp://host:8786') of a running dask.distributed scheduler: its workers (on
               a Slurm or Kubernetes cluster through dask-jobqueue or dask-kubernetes).

Tasks are plain functions of a picklable `Job` and one item (a block, a chunk); each worker
process loads the model once (`model_of`) and keeps it for every task it runs. `run` shows
one progress bar over the items and returns their results in order. `connect` checks an
address before anything is written. Dask and distributed are imported when used (the zarr
extra), never by importing flmiseg.
"""

import concurrent.futures
import contextlib
import multiprocessing
import os
import threading

import tqdm

from flmiseg.core.errors import UserError

LOCAL = ('threads', 'processes')
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
  raise UserError(f'--scheduler={scheduler!r}: valid: threads, processes, or the address of '
                  'a dask.distributed scheduler (tcp://host:8786)')


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
  os.environ.update(env)  # before JAX starts its backend in this process


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


def run(fn, items: list, scheduler: str, client=None, workers: int = 0,
        desc: str | None = None) -> list:
  """[fn(item) for item in items], on `scheduler` (a `client` for an address), with a
  progress bar `desc` over the items (none without). `workers`: threads or processes of the
  local schedulers (0: the CPU count)."""
  if not items:
    return []
  workers = workers or os.cpu_count() or 1
  bar = tqdm.tqdm(total=len(items), desc=desc, unit='block', disable=desc is None,
                  leave=False)
  with bar:
    if client is not None:
      return _run_distributed(fn, items, client, bar)
    import dask  # pylint: disable=g-import-not-at-top
    tasks = [dask.delayed(fn, pure=False)(item) for item in items]
    progress = _Bar(bar, [t.key for t in tasks])
    with contextlib.ExitStack() as stack:
      stack.enter_context(progress.callback)
      options = {'scheduler': 'threads', 'num_workers': workers}
      if scheduler == 'processes':
        pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context('spawn'),
            initializer=_init_process, initargs=(PROCESS_ENV,)))
        options = {'scheduler': 'processes', 'pool': pool}
      return list(dask.compute(*tasks, **options))


def _run_distributed(fn, items, client, bar) -> list:
  import distributed  # pylint: disable=g-import-not-at-top
  futures = client.map(fn, items, pure=False)
  for _ in distributed.as_completed(futures, loop=client.loop):
    bar.update(1)
  return client.gather(futures)
