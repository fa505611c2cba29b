"""A `jax.profiler` trace of a few training steps, from ``config.profile``.

Every process traces its own host (the files land side by side under ``<workdir>/profile``, local
or gs://), after ``skip`` steps of this start so that compilation and warm-up stay out of it. Open
the folder with TensorBoard's profile plugin or Perfetto.
"""

from __future__ import annotations

import jax


class StepProfiler:
  """Starts the trace before step ``first + skip`` and stops it after ``steps`` steps."""

  def __init__(self, logdir: str, *, first_step: int, steps: int, skip: int):
    self.logdir = logdir
    self.start = first_step + skip if steps else None
    self.stop = self.start + steps - 1 if steps else None
    self.active = False

  def before_step(self, step: int) -> None:
    if step == self.start:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, outputs) -> None:
    """``outputs``: the step's results, waited for so that the trace holds the device work."""
    if self.active and step == self.stop:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
