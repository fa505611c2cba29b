"""The user's files: text read with one named error, output folders checked before any work,
and local files replaced whole (a temporary sibling, then a rename), so that a crash never leaves
half of one.

The entry points share these, so that a missing or non-UTF-8 file, or an output under a regular
file, reads the same from each tool (`jip2p.errors`: exit status 2).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from jip2p.errors import InputError, OutputError


def is_remote(path: str) -> bool:
  """True for ``gs://…`` and other URL schemes (written through `tf.io.gfile`; not checked)."""
  return "://" in path


def require_local(path: str, what: str) -> None:
  """`OutputError` for a ``gs://`` (or other URL) ``path`` given to a tool that writes it with
  local files only: refused before any work, instead of written to a folder named ``gs:`` in the
  working directory."""
  if is_remote(path):
    raise OutputError(f"{what} {path}: this tool writes local files only; write to a local "
                      "folder and copy it (gcloud storage cp -r)")


def read_text(path: str, what: str) -> str:
  """The UTF-8 text of ``path``; `InputError` naming it and ``what`` it is when it is missing, a
  folder, unreadable or not UTF-8 (with the line of the first bad byte)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read the {what} ({e.strerror})") from None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise InputError(f"{path}: the {what} is not UTF-8 text (byte {data[e.start]:#04x} on line "
                     f"{line})") from None


def read_lines(path: str, what: str) -> list[str]:
  """`read_text`'s lines, split at line feeds only (JSON strings may hold U+2028 and the like)."""
  lines = read_text(path, what).split("\n")
  return lines[:-1] if lines[-1] == "" else lines


def check_output_dir(path: str, what: str = "output folder") -> None:
  """Before any work: `OutputError` unless ``path`` is a writable folder or can be made one (its
  nearest existing ancestor is a writable folder). Nothing is created. Remote paths pass."""
  if is_remote(path):
    return
  target = os.path.abspath(path)
  while not os.path.lexists(target):
    target = os.path.dirname(target)
  if not os.path.isdir(target):
    if target == os.path.abspath(path):
      raise OutputError(f"the {what} {path} is not a folder")
    raise OutputError(f"cannot create the {what} {path}: {target} is not a folder")
  if not os.access(target, os.W_OK | os.X_OK):
    raise OutputError(f"cannot write the {what} {path}: {target} is not writable")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary name beside ``path`` to write; renamed over ``path`` when the block ends
  without error, removed when it fails. An `OSError` (disk full…) becomes an `OutputError`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  except OSError as e:
    raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
  finally:
    with contextlib.suppress(OSError):  # not there: renamed, or never made
      os.remove(tmp)


def save_png(image, path: str, text: dict[str, str] | None = None) -> None:
  """Writes a PIL image or uint8 [H, W, 3] array as a PNG at ``path`` whole (`replacing`), with
  ``text`` as its text metadata."""
  from PIL import Image, PngImagePlugin
  info = PngImagePlugin.PngInfo()
  for key, value in (text or {}).items():
    info.add_text(key, value)
  if not isinstance(image, Image.Image):
    image = Image.fromarray(image)
  with replacing(path) as tmp:
    image.save(tmp, format="PNG", pnginfo=info)
