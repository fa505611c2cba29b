"""The one mapping between PyTorch state dicts and jip2p's Flax NNX modules.

jip2p names every submodule exactly like diffusers / transformers (see `jip2p.models.layers`), so
the torch key of a parameter is its NNX path joined by dots, with the leaf renamed
(``kernel``/``scale``/``embedding`` → ``weight``) and the layout changed by module type:

  * ``nnx.Conv``  kernel HWIO ↔ torch OIHW
  * ``nnx.Linear`` kernel [in, out] ↔ torch [out, in]
  * norms and embeddings: same layout.

Values cross this boundary as numpy arrays in the torch layout; parameters are stored float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jip2p.errors import CheckpointError

# Buffers that PyTorch modules may carry in a state dict but that are not parameters.
IGNORED_SUFFIXES = ("position_ids",)

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _parent(model: nnx.Module, path: tuple) -> object:
  node = model
  for part in path[:-1]:
    node = node[part] if isinstance(part, int) else getattr(node, part)
  return node


def _to_flax(value: np.ndarray, module: object, leaf: str) -> np.ndarray:
  if leaf == "kernel" and isinstance(module, nnx.Conv):
    return np.transpose(value, (2, 3, 1, 0))
  if leaf == "kernel" and isinstance(module, nnx.Linear):
    return np.transpose(value)
  return value


def _to_torch(value: np.ndarray, module: object, leaf: str) -> np.ndarray:
  if leaf == "kernel" and isinstance(module, nnx.Conv):
    return np.transpose(value, (3, 2, 0, 1))
  if leaf == "kernel" and isinstance(module, nnx.Linear):
    return np.transpose(value)
  return value


def _param_table(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable, object]]:
  """torch key → (NNX path, the Param variable, its parent module)."""
  table = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    leaf = path[-1]
    if leaf not in _LEAF_TO_TORCH:
      raise CheckpointError(f"parameter {'.'.join(map(str, path))} has no torch counterpart")
    key = ".".join(str(p) for p in path[:-1]) + "." + _LEAF_TO_TORCH[leaf]
    table[key] = (path, var, _parent(model, path))
  return table


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *,
                          source: str = "checkpoint") -> None:
  """Fills ``model``'s parameters in place from a torch-layout state dict.

  ``model`` may be abstract (from `nnx.eval_shape`): every parameter must be given. Raises
  `CheckpointError` naming missing and unexpected keys, or a key whose shape differs (both shapes,
  in the torch layout).
  """
  table = _param_table(model)
  given = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES)}
  missing = sorted(table.keys() - given)
  unexpected = sorted(given - table.keys())
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing weight(s): {_preview(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected weight(s): {_preview(unexpected)}")
    raise CheckpointError(f"{source} does not match the model ({type(model).__name__}): "
                          + "; ".join(parts))
  for key, (path, var, module) in table.items():
    value = np.asarray(state_dict[key])
    expected = _to_torch(np.empty(var.get_value().shape, np.uint8), module, path[-1]).shape
    if value.shape != expected:
      raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(value.shape)} but the model "
                            f"({type(model).__name__}) expects {tuple(expected)}")
    var.set_value(jnp.asarray(_to_flax(value, module, path[-1]), dtype=jnp.float32))


def to_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a torch-layout state dict of float32 numpy arrays."""
  return {key: np.ascontiguousarray(_to_torch(np.asarray(var.get_value(), np.float32), module,
                                              path[-1]))
          for key, (path, var, module) in _param_table(model).items()}


def _preview(keys: list[str], n: int = 5) -> str:
  more = f" … and {len(keys) - n} more" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more
