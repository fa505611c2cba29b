"""The shape of a console script's answer to a user's mistake, shared by the error tests."""


def named_error(err: str, code: int, prog: str) -> str:
  """The one ``PROG: error:`` line of a run that must have exited 2 without a traceback."""
  assert code == 2, err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
  assert len(lines) == 1, err
  return lines[0]
