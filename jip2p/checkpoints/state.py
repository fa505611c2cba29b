"""Saving and restoring a module's Flax state with orbax (the native, resharding-friendly format)."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from flax import nnx

from jip2p.errors import CheckpointError


def save_state(path: str, model: nnx.Module, *, overwrite: bool = False) -> None:
  """Writes all of ``model``'s state under ``path`` (a directory; atomic, as orbax finalises it)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), nnx.state(model), force=overwrite)
  checkpointer.wait_until_finished()


def restore_state(path: str, model: nnx.Module) -> None:
  """Fills ``model`` (possibly abstract, from `nnx.eval_shape`) in place from ``path``."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"missing orbax checkpoint: {path}")
  target = nnx.state(model)
  try:
    restored = ocp.StandardCheckpointer().restore(path, target)
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"{path} does not match {type(model).__name__}: {e}") from None
  nnx.update(model, restored)
