"""Local folders and ``gs://`` alike, through `etils.epath` (the layer orbax writes with).

Object stores have no rename and no append, so the few operations jip2p needs beyond epath's are
here, each correct on both:

  * `upload_folder`: a folder written locally (atomically) copied to a remote one, one named file
    last, so that a reader never takes a half-copied folder for a whole one;
  * `local_copy`: a remote folder copied once per host into a local cache (models are read with
    libraries that need local files: safetensors maps them);
  * `AppendedText`: a text file that each start of a program appends to (a local file is
    appended in place; a remote one is rewritten whole, its earlier text kept);
  * `working_copy`: a local folder standing for a remote output folder while a program that
    writes local files fills it, copied back when it ends;
  * `check_writable`: a local output path checked before the work that fills it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from etils import epath

from jip2p.errors import InputError, Jip2pError

CACHE_ENV = "JIP2P_MODEL_CACHE"
_CHUNK = 64 << 20


def is_remote(path: str | os.PathLike) -> bool:
  """True for ``gs://…`` (and other URL schemes); False for a local path."""
  return "://" in os.fspath(path)


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
  with src.open("rb") as fin, dst.open("wb") as fout:
    shutil.copyfileobj(fin, fout, _CHUNK)


def _files(folder: epath.Path) -> list[str]:
  """Every file under ``folder``, as sorted relative POSIX paths."""
  out = []
  for child in folder.iterdir():
    out += [f"{child.name}/{n}" for n in _files(child)] if child.is_dir() else [child.name]
  return sorted(out)


def upload_folder(local: str, dest: str, *, last: str) -> None:
  """Copies the local folder ``local`` to ``dest`` (replacing what is there), ``last`` (a file
  directly in it, e.g. ``model_index.json``) after every other file."""
  target = epath.Path(dest)
  if target.exists():
    target.rmtree()
  names = _files(epath.Path(local))
  for name in sorted(names, key=lambda n: n == last):
    (target / name).parent.mkdir(parents=True, exist_ok=True)
    _copy_file(epath.Path(local) / name, target / name)


def umask() -> int:
  """The process umask: the modes a plain mkdir/open give on this machine."""
  mask = os.umask(0)
  os.umask(mask)
  return mask


def check_writable(path: str, what: str) -> None:
  """Raises `InputError` naming ``path`` unless a folder can be created (or written) there: checked
  before any work starts, with a probe file in the nearest existing ancestor that is removed at
  once. A remote path is not probed (its store reports its own errors)."""
  if is_remote(path):
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise InputError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
  try:
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=existing)
  except OSError as e:
    raise InputError(f"{what} {path} cannot be written: {e.strerror} ({existing})") from None
  os.close(fd)
  os.remove(probe)


def cache_root() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jip2p",
                                                   "models")


def local_copy(url: str) -> str:
  """A local copy of the remote folder ``url``, downloaded once per host (per version: the key is
  the URL and every file's size and modification time, so a re-export is fetched again).

  Processes of one host may call it at once: each downloads into its own temporary folder and the
  first rename wins."""
  source = epath.Path(url)
  names = _files(source)
  key = hashlib.sha256(url.encode())
  for name in names:
    stat = (source / name).stat()
    key.update(f"\0{name}\0{stat.length}\0{stat.mtime}".encode())
  root = cache_root()
  final = os.path.join(root, key.hexdigest()[:32])
  if os.path.isdir(final):
    return final
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
  try:
    for name in names:
      os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
      _copy_file(source / name, epath.Path(tmp) / name)
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the cache from a team
    try:
      os.rename(tmp, final)
    except OSError:  # another process of this host finished first
      if not os.path.isdir(final):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return final


def _stamps(folder: str) -> dict[str, tuple[int, int]]:
  """(size, modification time in ns) of every file under the local ``folder``, by relative path."""
  return {name: (st.st_size, st.st_mtime_ns)
          for name in _files(epath.Path(folder))
          for st in [os.stat(os.path.join(folder, name))]}


@contextlib.contextmanager
def working_copy(url: str) -> Iterator[str]:
  """A local folder for a program that writes an output folder with local files (appends, renames,
  plotting libraries). A local ``url`` is yielded as it is. A remote one: a temporary folder filled
  with what ``url`` already holds (a resumed run reads it), whose new and changed files are copied
  to ``url`` when the block ends, also when it fails, so that the work done is kept (a process
  killed outright keeps nothing of this start: a resumed run redoes it). Errors of jip2p name
  ``url``, not the local folder."""
  if not is_remote(url):
    yield url
    return
  remote = epath.Path(url)
  local = tempfile.mkdtemp(prefix="jip2p-output-")
  try:
    if remote.exists():
      for name in _files(remote):
        os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
        _copy_file(remote / name, epath.Path(local) / name)
    before = _stamps(local)
    try:
      yield local
    except Jip2pError as e:  # named by the folder the user gave, not the local copy
      raise type(e)(str(e).replace(local, url.rstrip("/"))) from None
    finally:
      for name, stamp in _stamps(local).items():
        if before.get(name) != stamp:
          (remote / name).parent.mkdir(parents=True, exist_ok=True)
          _copy_file(epath.Path(local) / name, remote / name)
  finally:
    shutil.rmtree(local, ignore_errors=True)


class AppendedText:
  """A text file that grows across starts of a program. A local one is appended to at each
  `write`; a remote one keeps the writes until `flush` rewrites it whole."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.remote = is_remote(path)
    self._text = self.path.read_text() if self.remote and self.path.exists() else ""
    self._pending: list[str] = []
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, text: str) -> None:
    self._pending.append(text)
    if not self.remote:
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    new, self._pending = "".join(self._pending), []
    if self.remote:
      self._text += new
      self.path.write_text(self._text)
    else:
      with open(self.path, "a") as f:
        f.write(new)
