"""One run directory, one live training: DIR/run.lock.

A training holds an exclusive advisory lock (`fcntl.flock`) on DIR/run.lock for as long as it
runs, and writes its pid, host and start time into the file. A second training started on the
same directory is refused with one line naming the holder, instead of both writing the same
checkpoints. The kernel releases the lock when its process ends, however it ends (kill -9
included), so a run directory left by a killed run is taken over by the next training, which
then resumes as usual (and says whose lock it took over). The file itself stays (removing it
could let two runs lock two different files of the same name); a run that ends normally
empties it.

Only process 0 of a multi-host run takes the lock. The read-only modes (eval, predict,
summary) take none. flock works on local file systems and on NFSv4; the lock is inherited by
children forked without exec (while one lives, the lock stays held) and not by subprocesses
that exec (the descriptor is close-on-exec).
"""

import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket

from absl import logging

from flmiseg.core.errors import UserError

LOCK_FILE = 'run.lock'


class RunDirectoryInUse(UserError):
  """Another live process trains in the run directory."""


class RunLock:
  """The exclusive lock of one run directory, held from `acquire` to `release`.

  Use as a context manager: `with RunLock(workdir): train...`. With `enabled=False` (processes
  other than 0 of a multi-host run) it does nothing.
  """

  def __init__(self, workdir, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.enabled = enabled
    self._fd = None

  def acquire(self) -> 'RunLock':
    """Takes the lock, or raises RunDirectoryInUse naming the live holder (pid, host).

    The directory must exist. Raises UserError when the lock file cannot be created.
    """
    if not self.enabled or self._fd is not None:
      return self
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise UserError(f'--workdir={self.workdir}: not writable ({e.strerror})') from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _describe(_read(fd))
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise UserError(f'{self.path}: cannot lock it ({e.strerror})') from e
      raise RunDirectoryInUse(
          f'--workdir={self.workdir} is in use by another training ({holder}); one run '
          'directory takes one live run: wait for it to end, stop it, or use another '
          '--workdir') from None
    self._fd = fd
    left = _read(fd)
    if left:  # a holder that did not release it: killed, or its machine went down
      logging.info('Taking over %s from %s, which ended without releasing it', self.path,
                   _describe(left))
    self._write_holder()
    return self

  def _write_holder(self) -> None:
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, (json.dumps(record) + '\n').encode(), 0)
      os.fsync(self._fd)
    except OSError:
      pass  # the lock holds without its description (e.g. a full disk; training reports it)

  def release(self) -> None:
    """Empties the lock file and releases the lock; a no-op when it is not held."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # empty: released, not left by a killed run
    except OSError:
      pass
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> 'RunLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read(fd: int) -> dict:
  """The holder record in the lock file, or {} when it is empty or unreadable."""
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
  """'pid 123 on host node1, started 2025-01-02T03:04:05+00:00' (the parts known)."""
  parts = []
  if 'pid' in record:
    parts.append(f'pid {record["pid"]}')
  if 'host' in record:
    parts.append(f'on host {record["host"]}')
  text = ' '.join(parts) or 'a process that has not described itself yet'
  return text + (f', started {record["started"]}' if 'started' in record else '')
