"""The console is the user's: flmiseg's own progress lines and one-line warnings, nothing else.

JAX, orbax, grain and tensorstore log through absl and Python logging (INFO lines on every
checkpoint, backend probing, sharding notes) and raise Python warnings; by default those stay
off the console and only flmiseg's messages are shown, as plain lines (`warning: ...` for a
warning). `--verbose` restores every library line in absl's format.
"""

import logging as py_logging
import os
import pathlib
import sys
import warnings

from absl import logging
import tqdm

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent.parent) + os.sep
# Python loggers of the libraries beneath flmiseg (those not logging through absl).
LIBRARY_LOGGERS = ('jax', 'jaxlib', 'orbax', 'grain', 'tensorstore', 'etils', 'flax',
                   'matplotlib', 'PIL', 'tensorboardX')


def _is_ours(record: py_logging.LogRecord) -> bool:
  return os.path.realpath(record.pathname).startswith(_PACKAGE_DIR)


class _OursOnly(py_logging.Filter):
  """Passes flmiseg's records only. A library's error that matters reaches the user as an
  exception (flmiseg's one `error:` line, or a traceback), not as a log line."""

  def filter(self, record):
    return _is_ours(record)


class _PlainFormatter(py_logging.Formatter):
  """`message` for information, `warning: message` / `error: message` above it."""

  def format(self, record):
    message = record.getMessage()
    if record.levelno >= py_logging.ERROR:
      return f'error: {message}'
    if record.levelno >= py_logging.WARNING:
      return f'warning: {message}'
    return message


class _AboveProgressBars(py_logging.Handler):
  """Writes each line with tqdm.write, so it appears above the progress bars, not inside."""

  def emit(self, record):
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except  # logging must never raise
      self.handleError(record)


def setup(verbose: bool = False) -> None:
  """Routes log lines as the module docstring says. Call once, at start-up."""
  if verbose:
    logging.set_verbosity(logging.INFO)
    return
  logging.set_verbosity(logging.INFO)  # flmiseg's own INFO lines are its progress messages
  root = py_logging.getLogger()
  root.removeHandler(logging.get_absl_handler())
  handler = _AboveProgressBars()
  handler.addFilter(_OursOnly())
  handler.setFormatter(_PlainFormatter())
  root.addHandler(handler)
  for name in LIBRARY_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.ERROR)
  # Library warnings (DeprecationWarning, orbax's sharding notes, ...) are for developers.
  warnings.filterwarnings('ignore')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # C++ INFO/WARNING lines of XLA
