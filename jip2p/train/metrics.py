"""Training metrics: TensorBoard + console writers (process 0 only), FLOPs and MFU.

FLOPs of a step come from XLA's cost analysis of one micro-batch's loss-and-gradient at the global
micro-batch shape (before partitioning), times the accumulation count: the cost analysis of the
whole step would count the body of its `lax.scan` once. MFU is achieved FLOP/s per device over the
device's peak dense bfloat16 FLOP/s, from `PEAK_FLOPS` or the config.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from jip2p import storage
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


class MetricWriter:
  """Scalars and images to TensorBoard event files under ``logdir`` (see `events`) and a line
  per write to the console and to ``log_file`` (appended to at each start, so a resumed run keeps
  its history; on gs:// it is stored at each flush); events reach storage at least every
  ``flush_secs``.

  On processes other than 0 every method does nothing, so the loop calls them unconditionally.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, flush_secs: float = 30.0,
               log_file: str | None = None):
    self.enabled = enabled
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

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._events.write(step, [events.scalar_value(k, v) for k, v in values.items()])
    log.info("step %d  %s", step, "  ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    self._maybe_flush()

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 [H, W, 3] images."""
    if not self.enabled:
      return
    self._events.write(step, [events.image_value(k, v) for k, v in images.items()])
    self._maybe_flush()

  def text(self, message: str) -> None:
    if self.enabled:
      log.info("%s", message)

  def _maybe_flush(self) -> None:
    if time.monotonic() - self._flushed >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._events.flush()
      if self._log_handler is not None:
        self._log_handler.file.flush()
      self._flushed = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      self._events.close()
    if self._log_handler is not None:
      self._log_handler.file.flush()
      log.removeHandler(self._log_handler)


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
