"""Train-state checkpoints with orbax: async, atomic, pruned, resumable, on local disk or ``gs://``.

A checkpoint ``<workdir>/checkpoints/<step>/`` holds four items, so that export can read only the
weights it needs:

  * ``params``, ``ema`` — the UNet parameters (NNX state, float32), sharded as in training;
  * ``train``           — the optimizer state, the step and the RNG key;
  * ``data``            — the input pipeline's position, one JSON value per process (each reads
                          its own part of the data), so a resumed run sees exactly the batches an
                          uninterrupted one would.

orbax writes each checkpoint into a temporary directory and renames it when complete, so a process
killed mid-save (even ``kill -9``) leaves no checkpoint that looks complete; leftovers are removed
when the manager next opens. Saves run in a background thread; `wait` blocks until they are done.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jip2p.errors import CheckpointError, ConfigError
from jip2p.train.step import TrainState

ITEMS = ("params", "ema", "train", "data")


def checkpoint_dir(workdir: str) -> epath.Path:
  """``<workdir>/checkpoints``, absolute (orbax refuses a relative local path)."""
  local = "://" not in workdir
  return epath.Path(os.path.abspath(workdir) if local else workdir) / "checkpoints"


class Checkpointer:
  """Periodic saves every ``every_steps`` (forced saves at any step), keeping the newest ``keep``
  and, when ``keep_every`` > 0, every step that is a multiple of it. ``last_saved``: the step of
  the last save started or checkpoint restored (None before either)."""

  def __init__(self, workdir: str, *, every_steps: int = 1000, keep: int = 3,
               keep_every: int = 0, async_save: bool = True, read_only: bool = False):
    # Read-only, the manager gets no way to write (no saves, no directory creation, no clean-up)
    # and `save` refuses; orbax's own ``read_only`` option would do the same but log a warning
    # for every manager opened (each export, each demo evaluation).
    self.read_only = read_only
    saving = not read_only
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps if saving else 0, max_to_keep=keep if saving else None,
        keep_period=(keep_every or None) if saving else None,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=saving, create=saving)
    self.directory = checkpoint_dir(workdir)
    if read_only and not self.directory.exists():
      raise CheckpointError(f"no checkpoints in {workdir}: {self.directory} does not exist")
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.last_saved: int | None = None
    if saving:  # a background save's failure (a full disk) is reported once, by `wait`
      _silence_orphaned_tasks()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state: TrainState, data_position: Any, *, force: bool = False) -> bool:
    """Starts saving ``state`` at its step (if due, or ``force``); True when a save started.

    Raises `CheckpointError` when the previous background save failed: a run must not go on
    believing it can resume from a checkpoint that was never written. (orbax runs one save at a
    time, so waiting for the previous one here costs nothing when saves are spaced out.)"""
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only: not saving")
    self.wait()
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        ema=ocp.args.StandardSave(state.ema),
        train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step,
                                     "rng": state.rng}),
        data=ocp.args.JsonSave({"position": data_position}))
    started = self.manager.save(step, args=args, force=force)
    if started:
      self.last_saved = step
    return started

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
    """(state, data position) at ``step`` (default: latest), laid out like ``abstract`` (a
    `TrainState` of `jax.ShapeDtypeStruct`s carrying shardings)."""
    step = self.resolve_step(step)
    restored = self._read(step, abstract.params, ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        ema=ocp.args.StandardRestore(abstract.ema),
        train=ocp.args.StandardRestore({"opt_state": abstract.opt_state, "step": abstract.step,
                                        "rng": abstract.rng}),
        data=ocp.args.JsonRestore()))
    self.last_saved = step
    train = restored["train"]
    state = TrainState(step=train["step"], params=restored["params"],
                       opt_state=train["opt_state"], ema=restored["ema"], rng=train["rng"])
    return state, restored["data"]["position"]

  def restore_weights(self, which: str, abstract_params: Any, step: int | None = None) -> Any:
    """Only the ``"params"`` or ``"ema"`` item (for export), laid out like ``abstract_params``."""
    step = self.resolve_step(step)
    restored = self._read(step, abstract_params, ocp.args.Composite(
        **{which: ocp.args.StandardRestore(abstract_params)}))
    return restored[which]

  def _read(self, step: int, abstract_params: Any, args: ocp.args.Composite):
    """orbax's restore of ``step``; a checkpoint it cannot read (a truncated or corrupt file) as
    a `CheckpointError` naming the step, orbax's first line (the file) and the way out; one of
    another model than ``abstract_params`` (the config's) as a `ConfigError` naming a parameter
    that differs (every checkpoint of the run differs alike: no earlier one is a way out)."""
    try:
      return self.manager.restore(step, args=args)
    except Exception as e:  # orbax and tensorstore raise ValueError, OSError, their own errors…
      _silence_orphaned_tasks()
      differs = self._first_difference(step, abstract_params)
      if differs:
        workdir = self.directory.parent
        raise ConfigError(
            f"the checkpoints in {self.directory} are of another model than this config's "
            f"({differs}): resume with the config the run was started with "
            f"({workdir / 'config.json'}, the config.model it names) or choose another "
            "--workdir") from None
      while e.__cause__ is not None:  # the innermost error names the file
        e = e.__cause__
      reason = next((line.strip() for line in str(e).splitlines() if line.strip()),
                    type(e).__name__).split(" [tensorstore_spec")[0]
      earlier = [s for s in self.all_steps() if s < step]
      way_out = (f"move {self.directory / str(step)} out of the way to resume training from "
                 f"step {max(earlier)}, or export that step with --step={max(earlier)}"
                 if earlier else
                 f"no earlier checkpoint is left; move {self.directory / str(step)} out of the "
                 "way to start again from step 0")
      raise CheckpointError(f"the checkpoint of step {step} cannot be read ({reason}); "
                            f"{way_out}") from None

  def _first_difference(self, step: int, abstract_params: Any) -> str | None:
    """The first parameter (by name) that ``step``'s stored ``params`` lack, have in excess or
    hold in another shape than ``abstract_params``; None when they match or their metadata
    cannot be read (then the checkpoint itself is damaged)."""
    try:
      stored = _shapes(ocp.StandardCheckpointHandler().metadata(
          self.directory / str(step) / "params"))
    except Exception:  # no or damaged metadata: a damaged checkpoint, named as such
      return None
    model = _shapes(abstract_params)
    for name in sorted(stored.keys() | model.keys()):
      if name not in model:
        return f"the checkpoint has {name}, the model has not"
      if name not in stored:
        return f"the model has {name}, the checkpoint has not"
      if stored[name] != model[name]:
        return f"{name} is {stored[name]} in the checkpoint, {model[name]} in the model"
    return None

  def resolve_step(self, step: int | None) -> int:
    """``step`` checked to exist, or the latest when None."""
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no checkpoint in {self.directory}")
      return max(steps)
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                            f"available: {sorted(steps)}")
    return step

  def wait(self) -> None:
    """Blocks until the background save is done; `CheckpointError` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # orbax re-raises whatever the background save raised.
      _silence_orphaned_tasks()  # the save's other writes, failing in turn
      while e.__cause__ is not None:  # the innermost error names the file
        e = e.__cause__
      reason = next((line.strip() for line in str(e).splitlines() if line.strip()),
                    type(e).__name__)
      kept = [s for s in self.all_steps() if s != self.last_saved]
      way_out = (f"rerun the same command to resume from step {max(kept)}" if kept else
                 "rerun the same command to start again")
      raise CheckpointError(f"saving the checkpoint of step {self.last_saved} under "
                            f"{self.directory} failed ({reason}); once that is fixed (a full "
                            f"disk: make room), {way_out}") from None

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Each leaf's dotted name → its shape (the abstract state's and orbax's metadata alike)."""
  return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class _ReraisedBackgroundError(logging.Filter):
  """Drops orbax's logs of an exception with its traceback (a background save's failure, logged
  by each thread it passes through): the exception reaches `wait`, which raises it, named, as a
  `CheckpointError`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and record.exc_info
                and os.path.join("orbax", "checkpoint") in record.pathname)


_silenced = False


def _silence_orphaned_tasks() -> None:
  """After a failed restore or save, orbax's other reads or writes of the checkpoint are still in
  flight; they fail in turn on a closed event loop, each printing a traceback of the error already
  reported (as asyncio's "Task exception was never retrieved", or through sys.excepthook or
  sys.unraisablehook), and orbax logs each failed background write. Once per process."""
  global _silenced
  if _silenced:
    return
  _silenced = True
  logging.getLogger("absl").addFilter(_ReraisedBackgroundError())
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  # Writes that never started are coroutines collected unawaited, often only at exit: after the
  # entry point's warning filters are gone, hence the filter again from atexit; those collected
  # only in the interpreter's teardown, when no filter is left, would still print (seen under
  # load), so once the handlers have run the teardown's stderr goes nowhere.
  ignore = lambda: warnings.filterwarnings(
      "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
  ignore()

  def at_exit():
    ignore()
    gc.collect()
    sys.stderr.flush()
    sys.stderr = open(os.devnull, "w")  # The process is ending: never closed.

  atexit.register(at_exit)
  orphan = lambda e: isinstance(e, RuntimeError) and "Event loop is closed" in str(e)
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda kind, e, tb: None if orphan(e) else excepthook(kind, e, tb)
  sys.unraisablehook = lambda u: None if orphan(u.exc_value) else unraisablehook(u)
