"""The shape of a console script's answer to a user's mistake, shared by the error tests."""

import sys


def named_error(err: str, code: int, prog: str) -> str:
  """The one ``PROG: error:`` line of a run that must have exited 2 without a traceback."""
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
  assert len(lines) == 1, err
  return lines[0]


def file_size_limited(command: list[str], limit: int) -> list[str]:
  """``command`` run so that a write growing a file past ``limit`` bytes fails with EFBIG, as a
  write on a full disk fails with ENOSPC: a full disk without a mount, reaching the writers'
  own threads (orbax's, safetensors'). The limit and the ignored SIGXFSZ pass through exec."""
  shim = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
          "os.execvp(sys.argv[1], sys.argv[1:])")
  return [sys.executable, "-c", shim, *command]
