"""The errors jip2p raises for problems a user can fix; entry points print them without traceback.

Each message names the problem (the file, the key, both shapes…) and, where there is one, the fix.
"""


class Jip2pError(Exception):
  """Base class: a problem with the user's input, files or configuration."""


class ConfigError(Jip2pError, ValueError):
  """A model or run configuration is malformed, inconsistent or uses unsupported features."""


class CheckpointError(Jip2pError):
  """A checkpoint folder or file is missing, of the wrong architecture, or its weights mismatch."""


class InputError(Jip2pError, ValueError):
  """An image, instruction, prompt file or dataset record cannot be used."""


class Jip2pWarning(UserWarning):
  """An input was used other than as given (an instruction cut to the text encoder's length, an
  animated image's first frame); entry points print it as one line."""


class OutputError(Jip2pError):
  """An output cannot be written: its folder is a file, not writable, or the disk is full."""
