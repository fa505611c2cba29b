"""The errors jip2p raises for problems a user can fix; entry points print them without traceback.

Each message names the problem (the file, the key, both shapes…) and, where there is one, the fix.
`run` is how every entry point prints them (the ``jip2p-…`` console scripts and the library's
``python -m`` tools alike, which may not import `jip2p.cli`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence


class Jip2pError(Exception):
  """Base class: a problem with the user's input, files or configuration."""


class ConfigError(Jip2pError, ValueError):
  """A model or run configuration is malformed, inconsistent or uses unsupported features."""


class CheckpointError(Jip2pError):
  """A checkpoint folder or file is missing, of the wrong architecture, or its weights mismatch."""


class InputError(Jip2pError, ValueError):
  """An image, instruction, prompt file or dataset record cannot be used."""


class ServerError(Jip2pError):
  """A server jip2p talks to (an LLM's chat/completions endpoint) refused the requests, or kept
  failing them after the retries."""


class Jip2pWarning(UserWarning):
  """An input was used other than as given (an instruction cut to the text encoder's length, an
  animated image's first frame); entry points print it as one line."""


class OutputError(Jip2pError):
  """An output cannot be written: its folder is a file, not writable, or the disk is full."""


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None,
        prog: str) -> int:
  """Calls ``main(argv)``; maps `Jip2pError` to exit 2 and Ctrl-C to exit 130."""
  show = warnings.showwarning

  def show_one_line(message, category, *args, **kwargs):
    if issubclass(category, Jip2pWarning):
      print(f"{prog}: warning: {message}", file=sys.stderr)
    else:
      show(message, category, *args, **kwargs)

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("always", Jip2pWarning)  # the library warns once per input itself
      warnings.showwarning = show_one_line
      return main(argv) or 0
  except Jip2pError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
