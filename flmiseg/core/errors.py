"""The one exception type that reaches the user as a one-line message.

Everything the user can get wrong (a file, a list line, a config setting) raises `UserError`
with a message that names the culprit. `flmiseg.main` prints it on one line and exits with
status 2; `--debug` shows the traceback instead.
"""


class UserError(Exception):
  """A problem with the user's input, data or configuration (not a bug in flmiseg)."""


class CheckpointWriteError(UserError):
  """A checkpoint could not be written (disk full, no permission); earlier ones are intact."""
