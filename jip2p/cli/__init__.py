"""Thin console-script entry points (``jip2p-…``); the work lives in the library modules.

Every entry point runs through `run`, so a problem the user can fix (any `Jip2pError`) ends with
one line naming it and exit status 2, never a traceback; a `Jip2pWarning` (an input used other
than as given) prints as one line ``prog: warning: …``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from jip2p.errors import Jip2pError, Jip2pWarning


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
