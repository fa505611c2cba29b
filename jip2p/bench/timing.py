"""Timing shared by both sides: the first run alone, then a median of synchronised runs."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable


def first_run(fn: Callable[[], object], sync: Callable[[object], None]) -> float:
  """Seconds of one call of ``fn`` until ``sync`` of its result returns (compilation included)."""
  start = time.perf_counter()
  sync(fn())
  return time.perf_counter() - start


def median_run(fn: Callable[[], object], sync: Callable[[object], None], *, warmup: int,
               iters: int) -> tuple[float, list[float]]:
  """(median seconds, every timed run): ``warmup`` untimed calls, then ``iters`` timed calls,
  each synchronised with the device before the clock stops. The median of an even count is the
  upper middle run, as the baseline takes it."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2], times


def peak_rss_gib() -> float:
  """This process's resident-memory high-water mark (``getrusage`` maxrss, the kernel's VmHWM),
  GiB: the same measure of both sides where the device (a CPU) reports no memory of its own."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def emit(record: dict) -> None:
  """One JSON line on stdout: how a side hands its figures to `jip2p-bench` (with the process's
  `peak_rss_gib`)."""
  record = dict(record, peak_rss_gib=peak_rss_gib())
  print("BENCH " + json.dumps(record), flush=True)
  sys.stdout.flush()
