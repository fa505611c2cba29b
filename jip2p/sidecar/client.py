"""The generator-side client of the CLIP sidecar. Imports neither torch nor TensorFlow.

`ClipScorer` starts ``python -m jip2p.sidecar.server`` as a child process and scores candidate
pairs in the background, so the generator keeps the accelerator busy while CLIP runs:

  with ClipScorer("ViT-L-14.pt") as clip:         # start(): waits for the model to load
    for batch_id, (im0, im1, c0, c1) in enumerate(batches):
      clip.submit(batch_id, im0, im1, c0, c1)     # returns at once (blocks only past max_in_flight)
      for done_id, scores in clip.results(wait=False):
        ...                                       # scores: sim_0, sim_1, sim_direction, sim_image
    for done_id, scores in clip.results():        # the rest, as they complete
      ...

Robustness. The client keeps every unanswered request. If the sidecar exits, or holds requests
without answering for ``timeout`` seconds, it is killed and restarted and every unanswered
request is sent again. A reply is accepted only while its request is unanswered, so each batch's
scores are delivered exactly once, even when a reply of the killed process surfaces after the
restart. ``max_restarts`` restarts in a row without a single reply in between end the run with a
`Jip2pError` (a request that crashes the sidecar every time, or a machine out of memory).

Threads: one monitor thread (restarts), and per sidecar process a writer, a reader and a stderr
reader; the caller's thread never blocks on the pipe.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Hashable, Iterator, Sequence

import numpy as np

import jip2p
from jip2p.errors import InputError, Jip2pError
from jip2p.sidecar import protocol
from jip2p.sidecar.server import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Request:
  """One request, kept until answered so that it can be resent to a restarted sidecar."""
  wire_id: int
  header: dict
  arrays: dict
  batch_id: Hashable = None
  waiter: _Waiter | None = None


class _NotReady(Jip2pError):
  """A (re)started sidecar died or timed out before saying ``ready``: worth another try."""


class _Waiter:
  """The reply slot of a synchronous call."""

  def __init__(self):
    self.event = threading.Event()
    self.value = None
    self.error = None


class _Process:
  """One incarnation of the sidecar process and its three pipe threads."""

  def __init__(self, argv: Sequence[str], env: dict, on_message, on_exit):
    self._on_message, self._on_exit = on_message, on_exit
    try:
      # A session of its own: Ctrl-C reaches the generator, which then shuts the sidecar down.
      self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
      raise Jip2pError(f"cannot start the CLIP sidecar ({' '.join(argv[:3])}): {e}") from None
    self.ready: dict | None = None
    self.fatal: str | None = None
    self.dead = False
    self.stderr_tail: collections.deque[str] = collections.deque(maxlen=30)
    self._ready_event = threading.Event()
    self._outbox: queue.SimpleQueue = queue.SimpleQueue()
    for target in (self._read, self._write, self._drain_stderr):
      threading.Thread(target=target, daemon=True, name=f"clip-sidecar-{target.__name__}").start()

  @property
  def pid(self) -> int:
    return self.proc.pid

  def wait_ready(self, timeout: float) -> dict:
    """The ``ready`` header; raises `Jip2pError` on ``fatal``, an early exit or a timeout."""
    if not self._ready_event.wait(timeout):
      self.kill()
      raise _NotReady(f"CLIP sidecar did not become ready within {timeout:.0f} s"
                      f"{self.stderr_summary()}")
    if self.fatal is not None:
      self.kill()
      raise Jip2pError(f"CLIP sidecar: {self.fatal}")
    if self.ready is None:
      self.proc.wait()
      raise _NotReady(f"CLIP sidecar exited with status {self.proc.returncode} before it was "
                      f"ready{self.stderr_summary()}")
    if self.ready.get("version") != protocol.VERSION:
      self.kill()
      raise Jip2pError(f"CLIP sidecar speaks protocol version {self.ready.get('version')}, this "
                       f"client {protocol.VERSION}: the sidecar's jip2p install differs")
    return self.ready

  def send(self, request: _Request) -> None:
    self._outbox.put(request)

  def kill(self) -> None:
    self.dead = True
    if self.proc.poll() is None:
      self.proc.kill()
    self.proc.wait()
    self._outbox.put(None)

  def shutdown(self, timeout: float) -> None:
    """Asks the sidecar to exit; kills it if it has not within ``timeout`` seconds."""
    self.dead = True
    self._outbox.put(_Request(-1, {"type": "shutdown"}, {}))
    self._outbox.put(None)
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()

  def exited(self) -> bool:
    return self.dead or self.proc.poll() is not None

  def stderr_summary(self) -> str:
    """The last lines the process wrote to stderr, formatted to end an error message."""
    time.sleep(0.1)  # Let the stderr thread catch the last lines of a dying process.
    lines = [l for l in self.stderr_tail if l.strip()]
    return (":\n  " + "\n  ".join(lines[-10:])) if lines else ""

  def _read(self):
    stream = self.proc.stdout
    try:
      while True:
        message = protocol.read_message(stream)
        if message is None:
          break
        header, arrays = message
        if self.ready is None and self.fatal is None:
          if header["type"] == "ready":
            self.ready = header
          else:
            self.fatal = header.get("message", f"unexpected first message {header['type']!r}")
          self._ready_event.set()
          continue
        self._on_message(header, arrays)
    except (OSError, ValueError, protocol.ProtocolError) as e:
      log.warning("CLIP sidecar %d: reply stream broken: %s", self.pid, e)
    self.dead = True
    self._ready_event.set()
    self._on_exit()

  def _write(self):
    stream = self.proc.stdin
    try:
      while (request := self._outbox.get()) is not None:
        protocol.write_message(stream, {**request.header, "id": request.wire_id}, request.arrays)
      stream.close()
    except (OSError, ValueError):
      pass  # The process died; the monitor restarts it and resends.

  def _drain_stderr(self):
    for line in self.proc.stderr:
      text = line.decode(errors="replace").rstrip()
      self.stderr_tail.append(text)
      log.debug("clip-sidecar[%d] %s", self.pid, text)


class ClipScorer:
  """Scores image pairs against captions in a restartable CLIP sidecar process.

  Args:
    weights: local CLIP weights file (``.safetensors``, a state-dict ``.pt``/``.bin``, or OpenAI's
      TorchScript ``ViT-L-14.pt``); None for a DINO-only sidecar.
    model: open_clip architecture name; the default is OpenAI's ViT-L/14 (with QuickGELU).
    config: an open_clip model config JSON for a custom architecture (overrides ``model``).
    device, precision, batch_size: the sidecar's torch device ("auto": cuda if torch sees one;
      JAX's default preallocation of 75% of GPU memory leaves room for ViT-L/14),
      "fp32"/"fp16"/"bf16", and images per CLIP forward pass.
    timeout: seconds without any reply, while requests are outstanding, after which the sidecar
      counts as hung and is restarted. Must exceed the time one request takes.
    start_timeout: seconds allowed for a (re)start to load the model.
    max_restarts: restarts in a row without a reply before giving up.
    max_in_flight: `submit` blocks while this many batches are unanswered (bounds memory).
    dino_weights, dino_config: a DINO ViT's local weights and, for another architecture than
      ViT-S/16, its timm arguments as JSON (see `jip2p.sidecar.server`); enables `encode_dino`.
    command: the argv prefix that runs the sidecar (default: this interpreter, ``-m
      jip2p.sidecar.server``), e.g. a Python of another environment that has torch; the model
      flags are appended.

  Attributes: ``info`` (the sidecar's ``ready`` message: model, image_size, embed_dim, device…),
  ``restarts`` and ``dropped_replies`` (replies to already answered requests) for monitoring.
  """

  def __init__(self, weights: str | None, *, model: str = DEFAULT_MODEL,
               config: str | None = None, device: str = "auto", precision: str = "fp32",
               batch_size: int = 32, timeout: float = 300.0, start_timeout: float = 600.0,
               max_restarts: int = 3, max_in_flight: int = 8,
               command: Sequence[str] | None = None, dino_weights: str | None = None,
               dino_config: str | None = None):
    if (timeout <= 0 or start_timeout <= 0 or max_restarts < 0 or max_in_flight < 1
        or batch_size < 1):
      raise InputError("ClipScorer needs timeout > 0, start_timeout > 0, max_restarts ≥ 0, "
                       "max_in_flight ≥ 1 and batch_size ≥ 1")
    if weights is None and dino_weights is None:
      raise InputError("ClipScorer needs CLIP weights, DINO weights or both")
    self.weights, self.config = weights, config
    self.dino_weights, self.dino_config = dino_weights, dino_config
    self.timeout, self.start_timeout = timeout, start_timeout
    self.max_restarts, self.max_in_flight = max_restarts, max_in_flight
    argv = list(command or [sys.executable, "-m", "jip2p.sidecar.server"])
    argv += ["--device", device, "--precision", precision, "--batch-size", str(batch_size)]
    if weights is not None:
      argv += ["--clip-weights", weights]
      argv += ["--clip-config", config] if config else ["--clip-model", model]
    if dino_weights is not None:
      argv += ["--dino-weights", dino_weights]
      argv += ["--dino-config", dino_config] if dino_config else []
    self._argv = argv
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(jip2p.__file__)))
    if os.path.basename(root) not in ("site-packages", "dist-packages"):  # a source checkout
      env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    self._env = env

    self._cond = threading.Condition()
    self._process: _Process | None = None
    self._starting: _Process | None = None
    self._pending: dict[int, _Request] = {}
    self._completed: collections.deque = collections.deque()
    self._batch_ids: set = set()  # every batch id submitted, delivered or not
    self._async_pending = 0
    self._next_id = 0
    self._last_progress = time.monotonic()
    self._failed_starts = 0
    self._failure: Jip2pError | None = None
    self._closed = False
    self._monitor: threading.Thread | None = None
    self.info: dict = {}
    self.restarts = 0
    self.dropped_replies = 0

  # -- lifecycle ---------------------------------------------------------------------------------

  def start(self) -> dict:
    """Starts the sidecar and waits until the model is loaded; returns its ``ready`` info.

    Raises `Jip2pError` naming the problem (missing weights, unknown architecture, …) before any
    work is submitted.
    """
    if self._process is not None:
      raise Jip2pError("ClipScorer.start() called twice")
    for what, path in (("CLIP weights", self.weights), ("CLIP config", self.config),
                       ("DINO weights", self.dino_weights), ("DINO config", self.dino_config)):
      if path is not None and not os.path.isfile(path):
        raise Jip2pError(f"{what} file not found: {path}")
    process = self._spawn()
    self.info = process.wait_ready(self.start_timeout)
    self._process = process
    self._monitor = threading.Thread(target=self._watch, daemon=True, name="clip-sidecar-monitor")
    self._monitor.start()
    return self.info

  def close(self) -> None:
    """Stops the sidecar. Unanswered batches are abandoned; drain `results` first to keep them."""
    with self._cond:
      if self._closed:
        return
      self._closed = True
      process, starting = self._process, self._starting
      self._cond.notify_all()
    if starting is not None:
      starting.kill()  # Cuts short a restart in progress.
    if self._monitor is not None:
      self._monitor.join()
    if process is not None:
      process.shutdown(timeout=10.0)

  def __enter__(self) -> ClipScorer:
    self.start()
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def pid(self) -> int | None:
    """The current sidecar process id (it changes on restart)."""
    return self._process.pid if self._process is not None else None

  @property
  def in_flight(self) -> int:
    """Submitted batches not yet delivered through `results`' queue."""
    with self._cond:
      return self._async_pending

  # -- asynchronous scoring ----------------------------------------------------------------------

  def submit(self, batch_id: Hashable, images0, images1, captions0: Sequence[str],
             captions1: Sequence[str]) -> None:
    """Queues one batch of N candidate pairs for scoring and returns.

    images0, images1: uint8 [N, H, W, 3] (0..255) or float [N, H, W, 3] (0..1), copied here so
    the caller may reuse its buffers. captions0, captions1: N strings each. ``batch_id`` must be
    new: each id's scores come back exactly once from `results`.
    """
    header, arrays = _score_request(images0, images1, captions0, captions1)
    with self._cond:
      if batch_id in self._batch_ids:
        raise InputError(f"batch id {batch_id!r} was already submitted")
      while (self._async_pending >= self.max_in_flight and self._failure is None
             and not self._closed):
        self._cond.wait()
      self._enqueue(header, arrays, batch_id=batch_id)
      self._batch_ids.add(batch_id)
      self._async_pending += 1

  def results(self, wait: bool = True) -> Iterator[tuple[Hashable, dict[str, np.ndarray]]]:
    """Completed batches as ``(batch_id, scores)``, in completion order.

    scores maps `protocol.SCORE_KEYS` (sim_0, sim_1, sim_direction, sim_image) to float32 [N].
    wait=True: goes on until every batch submitted so far is delivered; wait=False: only those
    already complete. A batch the sidecar failed on raises `Jip2pError` when its turn comes.
    """
    while True:
      with self._cond:
        while (not self._completed and wait and self._async_pending > 0 and self._failure is None
               and not self._closed):
          self._cond.wait()
        if self._completed:
          batch_id, value = self._completed.popleft()
        elif self._failure is not None and self._async_pending > 0:
          raise self._failure
        else:
          return
      if isinstance(value, Jip2pError):
        raise value
      yield batch_id, value

  # -- synchronous calls (evaluation) ------------------------------------------------------------

  def score(self, images0, images1, captions0: Sequence[str], captions1: Sequence[str]
            ) -> dict[str, np.ndarray]:
    """Scores one batch and waits for it: {sim_0, sim_1, sim_direction, sim_image} float32 [N]."""
    return self._call(*_score_request(images0, images1, captions0, captions1))

  def encode_images(self, images) -> np.ndarray:
    """uint8 [N, H, W, 3] (or float 0..1) → L2-normalised CLIP image features float32 [N, D]."""
    return self._call({"type": "encode_images"}, {"images": _images(images, "images")})["features"]

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """N strings → L2-normalised CLIP text features float32 [N, D] (long texts truncated)."""
    return self._call({"type": "encode_texts", "texts": _texts(texts, "texts")}, {})["features"]

  def encode_dino(self, images) -> np.ndarray:
    """uint8 [N, H, W, 3] (or float 0..1) → L2-normalised DINO features float32 [N, D]."""
    return self._call({"type": "encode_dino"}, {"images": _images(images, "images")})["features"]

  def _call(self, header: dict, arrays: dict) -> dict:
    waiter = _Waiter()
    with self._cond:
      self._enqueue(header, arrays, waiter=waiter)
      while not waiter.event.is_set() and self._failure is None and not self._closed:
        self._cond.wait()
      if not waiter.event.is_set():
        raise self._failure or Jip2pError("ClipScorer was closed")
    if waiter.error is not None:
      raise waiter.error
    return waiter.value

  # -- machinery ---------------------------------------------------------------------------------

  def _enqueue(self, header: dict, arrays: dict, *, batch_id=None, waiter=None) -> None:
    """Records a request and sends it to the current sidecar (caller holds the lock)."""
    if self._process is None or self._closed:
      raise Jip2pError("ClipScorer is not running: call start() first (or it was closed)")
    if self._failure is not None:
      raise self._failure
    if not self._pending:
      self._last_progress = time.monotonic()
    request = _Request(self._next_id, header, arrays, batch_id, waiter)
    self._next_id += 1
    self._pending[request.wire_id] = request
    self._process.send(request)

  def _spawn(self) -> _Process:
    return _Process(self._argv, self._env, self._on_message, self._on_exit)

  def _on_message(self, header: dict, arrays: dict) -> None:
    """A reply from any incarnation; accepted only if its request is still unanswered."""
    with self._cond:
      request = self._pending.pop(header.get("id"), None)
      if request is None:
        self.dropped_replies += 1
        return
      self._last_progress = time.monotonic()
      self._failed_starts = 0
      if header["type"] == "error":
        value = Jip2pError(f"CLIP sidecar failed on batch {request.batch_id!r}: "
                           f"{header.get('message')}")
      else:
        value = {k: np.array(v) for k, v in arrays.items()}
      if request.waiter is not None:
        if isinstance(value, Jip2pError):
          request.waiter.error = value
        else:
          request.waiter.value = value
        request.waiter.event.set()
      else:
        self._async_pending -= 1
        self._completed.append((request.batch_id, value))
      self._cond.notify_all()

  def _on_exit(self) -> None:
    with self._cond:
      self._cond.notify_all()

  def _watch(self) -> None:
    """Monitor thread: restarts a sidecar that exited or stopped answering."""
    poll = min(1.0, self.timeout / 4)
    while True:
      with self._cond:
        self._cond.wait(poll)
        if self._closed or self._failure is not None:
          return
        if self._process.exited():
          reason = f"exited with status {self._process.proc.poll()}"
        elif self._pending and time.monotonic() - self._last_progress > self.timeout:
          reason = f"answered nothing for {self.timeout:g} s"
        else:
          continue
      self._restart(reason)

  def _restart(self, reason: str) -> None:
    """Kills the sidecar, starts a new one and resends every unanswered request."""
    old = self._process
    log.warning("CLIP sidecar %d %s; restarting it (%d unanswered requests)", old.pid, reason,
                len(self._pending))
    old.kill()
    tail = old.stderr_summary()
    while True:
      with self._cond:
        self._failed_starts += 1
        if self._closed:
          return
        if self._failed_starts > self.max_restarts:
          self._fail(Jip2pError(f"CLIP sidecar {reason}; {self.max_restarts} restarts in a row "
                                f"brought no reply, giving up{tail}"))
          return
        self.restarts += 1
        new = self._starting = self._spawn()
      try:
        new.wait_ready(self.start_timeout)
        break
      except _NotReady as e:
        reason, tail = str(e), ""
      except Jip2pError as e:  # The model cannot load any more (weights deleted meanwhile, …).
        self._fail(e)
        return
    with self._cond:
      self._starting = None
      if self._closed:
        new.kill()
        return
      self._process, self.info = new, new.ready
      self._last_progress = time.monotonic()
      for request in self._pending.values():
        new.send(request)

  def _fail(self, error: Jip2pError) -> None:
    with self._cond:
      self._failure = error
      self._starting = None
      self._cond.notify_all()


def _score_request(images0, images1, captions0, captions1) -> tuple[dict, dict]:
  images0, images1 = _images(images0, "images0"), _images(images1, "images1")
  captions0, captions1 = _texts(captions0, "captions0"), _texts(captions1, "captions1")
  n = len(images0)
  if len(images1) != n or len(captions0) != n or len(captions1) != n:
    raise InputError(f"images0 {list(images0.shape)}, images1 {list(images1.shape)}, "
                     f"{len(captions0)} and {len(captions1)} captions: all must hold the same N "
                     f"pairs")
  return ({"type": "score", "captions0": captions0, "captions1": captions1},
          {"images0": images0, "images1": images1})


def _images(images, name: str) -> np.ndarray:
  a = np.asarray(images)
  if a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] == 0:
    raise InputError(f"{name} must be [N>0, H, W, 3], got shape {list(a.shape)}")
  if a.dtype == np.uint8:
    return a.copy()
  if np.issubdtype(a.dtype, np.floating):
    return a.astype(np.float32)
  raise InputError(f"{name} must be uint8 (0..255) or float (0..1), got {a.dtype}")


def _texts(texts, name: str) -> list[str]:
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise InputError(f"{name} must be a sequence of strings")
  texts = list(texts)
  if not texts:
    raise InputError(f"{name} is empty")
  return texts
