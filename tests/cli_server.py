"""Command-line processes for the tests, forked from a server that has imported the libraries.

A `python -m flmiseg.main` process spends about 1.4 s importing jax, flax, optax, orbax and
grain before it reads its first flag, and the suite starts well over a hundred of them. `run`
gives the same process without that cost: a server (one per pytest-xdist worker and
environment) imports the libraries once, never initialises a JAX backend, and forks one child
per command. The child sets its XLA_FLAGS (read when its backend starts), working directory
and standard streams, runs the module as `python -m` does (`runpy`, as `__main__`: flmiseg.main
and flmiseg.cli.simulate, which the server never imports, define their flags in the child), and
exits as that process would: its exit status, its tracebacks, its atexit handlers. Only what
a module does at import time happened earlier, in the server, under the same environment.

Tests of what only a fresh interpreter shows (the console script, log chatter at import) or
of the process itself (signals, resource limits, another user) start real subprocesses
instead, and so do commands that import no JAX (flmiseg.cli.simulate): a server would cost them
more than it saves. Measured on the 2-core CPU with an empty compilation cache, two runs each
(2026-12-06): test_bad_input, test_run_is_the_model, test_main and test_registry together
took 172 and 157 s before, 113 and 104 s with the server; the whole suite's wall time moved
within this machine's run-to-run noise (about 450-475 s either way).

Protocol: the client writes one JSON request per line to the server's stdin; the server
answers `started <id> <pid>` and later `exited <id> <wait status>` on its stdout.
"""

import atexit
import json
import os
import pathlib
import select
import subprocess
import sys
import tempfile
import threading

# Imported by the server before it forks: what flmiseg's commands import, not flmiseg.main
# or flmiseg.cli.simulate (they define absl flags; the child runs them as __main__).
PRELOAD = ('jax', 'jax.numpy', 'flax.linen', 'optax', 'orbax.checkpoint', 'grain', 'cv2',
           'tifffile', 'scipy.ndimage', 'ml_collections', 'absl.app', 'flmiseg.train.trainer',
           'flmiseg.evaluation.evaluate', 'flmiseg.cli.predict', 'flmiseg.inference.tiling', 'flmiseg.store.pretrained',
           'flmiseg.store.rundir', 'flmiseg.core.registry', 'flmiseg.core.console')


# --- the server -------------------------------------------------------------------------

def _serve() -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  for name in PRELOAD:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  # A backend started here would be shared, broken, by every child (its threads do not
  # survive fork) and would fix the device count: refuse to serve.
  assert not xla_bridge._backends, 'a preloaded module started a JAX backend'  # pylint: disable=protected-access
  assert threading.active_count() == 1, threading.enumerate()
  requests = os.dup(0)
  replies = os.dup(1)
  devnull = os.open(os.devnull, os.O_RDWR)
  os.dup2(devnull, 0)
  os.dup2(devnull, 1)
  ids, pending, open_input = {}, b'', True
  while open_input or ids:
    readable, _, _ = select.select([requests] if open_input else [], [], [], 0.02)
    if readable:
      chunk = os.read(requests, 1 << 16)
      open_input = bool(chunk)
      *lines, pending = (pending + chunk).split(b'\n')
      for line in lines:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
          os.close(requests)
          os.close(replies)
          _child(request)  # never returns
        ids[pid] = request['id']
        os.write(replies, f'started {request["id"]} {pid}\n'.encode())
    while ids:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      os.write(replies, f'exited {ids.pop(pid)} {status}\n'.encode())


def _child(request: dict) -> None:
  """Becomes `python -m <module> <args>` in `cwd` with `xla_flags`, its output in files."""
  import runpy  # pylint: disable=g-import-not-at-top
  os.environ['XLA_FLAGS'] = request['xla_flags']
  os.chdir(request['cwd'])
  sys.path[0] = os.getcwd()  # as `python -m` run there: modules of that folder import
  stdin = os.open(os.devnull, os.O_RDONLY)
  stdout = os.open(request['stdout'], os.O_WRONLY | os.O_TRUNC)
  stderr = os.open(request['stderr'], os.O_WRONLY | os.O_TRUNC)
  for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
    os.dup2(fd, target)
    os.close(fd)
  sys.argv = [request['module'], *request['args']]
  runpy.run_module(request['module'], run_name='__main__', alter_sys=True)
  sys.exit(0)  # the module returned: exit as its process would


# --- the client -------------------------------------------------------------------------

class _Server:
  """One server process; requests from any thread."""

  def __init__(self, env: dict):
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'tests.cli_server'], env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, bufsize=1,
        cwd=pathlib.Path(__file__).resolve().parents[1])
    self.lock = threading.Lock()
    self.next_id = 0
    self.pids, self.statuses = {}, {}
    self.changed = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.process.stdout:
      event, request_id, value = line.split()
      with self.changed:
        (self.pids if event == 'started' else self.statuses)[int(request_id)] = int(value)
        self.changed.notify_all()
    with self.changed:
      self.statuses.setdefault('dead', self.process.wait())
      self.changed.notify_all()

  def run(self, module: str, args: list[str], cwd, xla_flags: str, timeout: float
          ) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix='flmiseg-cli-') as folder:
      out, err = pathlib.Path(folder, 'stdout'), pathlib.Path(folder, 'stderr')
      out.touch()
      err.touch()
      with self.lock:
        request_id = self.next_id
        self.next_id += 1
        self.process.stdin.write(json.dumps(dict(
            id=request_id, module=module, args=args, cwd=str(cwd), xla_flags=xla_flags,
            stdout=str(out), stderr=str(err))) + '\n')
        self.process.stdin.flush()
      with self.changed:
        done = self.changed.wait_for(
            lambda: request_id in self.statuses or 'dead' in self.statuses, timeout)
        if 'dead' in self.statuses and request_id not in self.statuses:
          raise RuntimeError(f'the CLI server died (status {self.statuses["dead"]})')
        if not done:
          pid = self.changed.wait_for(lambda: self.pids.get(request_id), 5)
          if pid:
            os.kill(pid, 9)
          raise subprocess.TimeoutExpired([module, *args], timeout)
        status = self.statuses.pop(request_id)
        self.pids.pop(request_id, None)
      return subprocess.CompletedProcess(
          [sys.executable, '-m', module, *args], os.waitstatus_to_exitcode(status),
          out.read_text(errors='replace'), err.read_text(errors='replace'))

  def close(self) -> None:
    """Ends the server once its running commands end (a minute at most)."""
    self.process.stdin.close()
    try:
      self.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.process.kill()


_servers: dict = {}
_servers_lock = threading.Lock()


def run(args, *, env: dict, cwd, timeout: float = 300, module: str = 'flmiseg.main'
        ) -> subprocess.CompletedProcess:
  """Like `subprocess.run([sys.executable, '-m', module, *args], env=env, cwd=cwd,
  capture_output=True, text=True, timeout=timeout)`, in a process forked from a server
  started with `env` (less XLA_FLAGS, which each command sets for itself)."""
  key = tuple(sorted((k, v) for k, v in env.items() if k != 'XLA_FLAGS'))
  with _servers_lock:
    server = _servers.get(key)
    if server is None or server.process.poll() is not None:
      server = _servers[key] = _Server({k: v for k, v in env.items() if k != 'XLA_FLAGS'})
  return server.run(module, [str(a) for a in args], cwd, env.get('XLA_FLAGS', ''), timeout)


@atexit.register
def _close_servers() -> None:
  for server in _servers.values():
    server.close()


if __name__ == '__main__':
  _serve()
