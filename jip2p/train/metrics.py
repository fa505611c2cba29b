"""Training metrics: TensorBoard + console writers (process 0 only), FLOPs and MFU, and the
loop's bookkeeping of the step's metrics (`StepLog`).

FLOPs of a step come from XLA's cost analysis of one micro-batch's loss-and-gradient at the global
micro-batch shape (before partitioning), times the accumulation count: the cost analysis of the
whole step would count the body of its `lax.scan` once. MFU is achieved FLOP/s per device over the
device's peak dense bfloat16 FLOP/s, from `PEAK_FLOPS` or the config.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from jip2p import storage
from jip2p.errors import Jip2pError, OutputError
from jip2p.train import events

# Peak dense bfloat16 FLOP/s per device (one chip, or one GPU), matched as substrings of
# `jax.Device.device_kind`, first match wins (so "v5 lite" precedes "v5").
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
)

log = logging.getLogger("jip2p.train")


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
  """Peak FLOP/s per device: ``override`` when > 0, else from the table; None if unknown."""
  if override > 0:
    return float(override)
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def cost_flops(fn, *abstract_args) -> float:
  """FLOPs XLA counts for ``jax.jit(fn)`` on these shapes (lowered only, not compiled)."""
  cost = jax.jit(fn).lower(*abstract_args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def step_flops(loss_fn, grad_accum: int, params, frozen, micro_batch) -> float:
  """FLOPs of a train step: ``grad_accum`` × those of ``loss_fn``'s value and gradient on one
  micro-batch (arrays or `jax.ShapeDtypeStruct`s; their shardings are dropped)."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        (params, frozen, micro_batch))
  return grad_accum * cost_flops(jax.value_and_grad(loss_fn), *shapes, jax.random.key(0))


def throughput(*, examples: int, steps: int, seconds: float, flops_per_step: float,
               num_devices: int, peak: float | None) -> dict[str, float]:
  """examples/s, step time, achieved TFLOP/s per device and (if the peak is known) MFU."""
  out = {"examples_per_sec": examples / seconds, "step_time_sec": seconds / steps}
  if flops_per_step > 0:
    achieved = flops_per_step * steps / seconds / num_devices
    out["tflops_per_device"] = achieved / 1e12
    if peak:
      out["mfu"] = achieved / peak
  return out


class _FileHandler(logging.Handler):
  """Log lines into a `storage.AppendedText` (local or gs://). Stored by `MetricWriter`, not by
  logging's own flush: that one also runs at interpreter exit, when gs:// clients are gone."""

  def __init__(self, path: str):
    super().__init__()
    self.file = storage.AppendedText(path)
    self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))

  def emit(self, record: logging.LogRecord) -> None:
    self.file.write(self.format(record) + "\n")


def _named_write_errors(method):
  """A log, event or metrics file that cannot be written (a full disk) stops the run with one
  `OutputError` naming it, not a traceback."""

  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except OSError as e:
      raise OutputError(f"cannot write the training logs ({e.filename or self.logdir}): "
                        f"{e.strerror or e}; once that is fixed (a full disk: make room), "
                        "rerun the same command to resume from the last checkpoint") from None

  return wrapped


class MetricWriter:
  """Scalars and images to TensorBoard event files under ``logdir`` (see `events`) and a line
  per write to the console and to ``log_file`` (appended to at each start, so a resumed run keeps
  its history; on gs:// it is stored at each flush); events reach storage at least every
  ``flush_secs``. With ``jsonl`` (a local file: objects in gs:// cannot be appended to), scalars
  also as a JSON line ``{"step": …, name: value, …}`` per write, for scripts and tests.

  On processes other than 0 every method does nothing, so the loop calls them unconditionally.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, flush_secs: float = 30.0,
               log_file: str | None = None, jsonl: str | None = None):
    self.enabled = enabled
    self.logdir = logdir
    self._jsonl = jsonl
    self._events = events.EventWriter(logdir) if enabled else None
    self._flush_secs = flush_secs
    self._flushed = time.monotonic()
    self._log_handler = _FileHandler(log_file) if enabled and log_file else None
    if enabled and not log.handlers:
      handler = logging.StreamHandler(sys.stdout)
      handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
      log.addHandler(handler)
      log.setLevel(logging.INFO)
      log.propagate = False
    if self._log_handler is not None:
      log.addHandler(self._log_handler)

  @_named_write_errors
  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._events.write(step, [events.scalar_value(k, v) for k, v in values.items()])
    log.info("step %d  %s", step, "  ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    if self._jsonl is not None:
      with open(self._jsonl, "a") as f:
        f.write(json.dumps({"step": step, **values}) + "\n")
    self._maybe_flush()

  @_named_write_errors
  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 [H, W, 3] images."""
    if not self.enabled:
      return
    self._events.write(step, [events.image_value(k, v) for k, v in images.items()])
    self._maybe_flush()

  @_named_write_errors
  def text(self, message: str) -> None:
    if self.enabled:
      log.info("%s", message)

  def _maybe_flush(self) -> None:
    if time.monotonic() - self._flushed >= self._flush_secs:
      self.flush()

  @_named_write_errors
  def flush(self) -> None:
    if self.enabled:
      self._events.flush()
      if self._log_handler is not None:
        self._log_handler.file.flush()
      self._flushed = time.monotonic()

  @_named_write_errors
  def close(self) -> None:
    if self.enabled:
      self._events.close()
    if self._log_handler is not None:
      self._log_handler.file.flush()
      log.removeHandler(self._log_handler)


def workdir_writer(workdir: str, *, enabled: bool) -> MetricWriter:
  """A run's writer: ``tensorboard/``, ``train.log`` and (local work directories only: gs://
  objects cannot be appended to) ``metrics.jsonl`` in ``workdir``."""
  return MetricWriter(os.path.join(workdir, "tensorboard"), enabled=enabled,
                      log_file=os.path.join(workdir, "train.log"),
                      jsonl=os.path.join(workdir, "metrics.jsonl") if "://" not in workdir else None)


def _fmt(value: float) -> str:
  value = float(value)
  return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.4e}"


class Stopwatch:
  """Seconds and steps since the last `lap` (the time of compiling the first step excluded)."""

  def __init__(self):
    self._t = time.perf_counter()
    self._steps = 0

  def tick(self) -> None:
    self._steps += 1

  def lap(self) -> tuple[float, int]:
    now = time.perf_counter()
    out = (now - self._t, self._steps)
    self._t, self._steps = now, 0
    return out


class StepLog:
  """The train step's metrics, read from the device late so that the host never waits for it.

  `add` reads the previous step's finite flag while the new step runs. A non-finite loss stops
  the run naming the step (``config.nonfinite="stop"``; every checkpoint holds only checked
  steps, as the loop `check`s before saving) or is counted (``"skip"``: the step left the state
  unchanged). `write` logs the averages since the previous write and the throughput, timed from
  the end of the first step (mostly compilation); ``flops_per_step()`` is called once, at the
  first write on process 0.
  """

  def __init__(self, config: ml_collections.ConfigDict, writer: MetricWriter, checkpointer,
               flops_per_step: Callable[[], float]):
    self._nonfinite, self._examples = config.nonfinite, config.batch_size
    self._peak = peak_flops(jax.devices()[0].device_kind, config.metrics.peak_flops_per_device)
    self._writer, self._checkpointer = writer, checkpointer
    self._flops_fn, self._flops = flops_per_step, 0.0
    self._unchecked: list[tuple[int, dict[str, jax.Array]]] = []
    self._unwritten: list[dict[str, jax.Array]] = []
    self._stopwatch = Stopwatch()
    self._started = False
    self.skipped = 0
    self.loss: float | None = None  # The last written average.

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Takes the metrics of ``step`` (on device) and checks the steps before it."""
    self._unchecked.append((step, metrics))
    self._unwritten.append(metrics)
    self._stopwatch.tick()
    self.check(step - 1)
    if not self._started:
      self._started = True
      self._stopwatch.lap()

  def check(self, step: int) -> None:
    """Reads the finite flag of every step ≤ ``step``: stops (or counts a skip) on a bad one."""
    while self._unchecked and self._unchecked[0][0] <= step:
      s, m = self._unchecked.pop(0)
      if bool(m["finite"]):
        continue
      if self._nonfinite == "skip":
        self.skipped += 1
        self._writer.text(f"step {s}: non-finite loss ({float(m['loss'])}), update skipped")
        continue
      saved = self._checkpointer.last_saved
      kept = (f"the last good checkpoint is step {saved} in {self._checkpointer.directory}"
              if saved is not None else "no checkpoint was saved")
      raise Jip2pError(
          f"non-finite loss at step {s} (loss={float(m['loss'])}, grad norm="
          f"{float(m['grad_norm'])}); {kept}. Check the model weights and data, lower "
          "config.optimizer.lr or set config.optimizer.grad_clip_norm; "
          "config.nonfinite='skip' skips such steps instead")

  def write(self, step: int) -> None:
    """Checks every step up to ``step`` and logs the averages of those not yet written."""
    self.check(step)
    values = jax.device_get(self._unwritten)
    self._unwritten.clear()
    seconds, steps = self._stopwatch.lap()
    if self._writer.enabled and not self._flops:
      self._flops = self._flops_fn()
    means = {k: float(np.mean([m[k] for m in values])) for k in ("loss", "grad_norm", "lr")}
    self.loss = means["loss"]
    record = dict(means, ema_decay=float(values[-1]["ema_decay"]), skipped_steps=self.skipped)
    if steps:  # None to time right after the first step (its time is mostly compilation).
      record.update(throughput(
          examples=self._examples * steps, steps=steps, seconds=seconds,
          flops_per_step=self._flops, num_devices=jax.device_count(), peak=self._peak))
    self._writer.scalars(step, record)
