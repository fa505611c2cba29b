"""The device mesh and how every array of the train state is laid out on it.

Mesh axes ``('data', 'fsdp')``. The batch is split over both axes. Parameters, EMA and optimizer
moments follow path-pattern rules, declared as data (first match wins):

  * ``"replicate"`` — a full copy on every device;
  * ``"fsdp"``      — FSDP / ZeRO-3: the tensor is split along one axis over ``'fsdp'`` (the
                      largest axis the fsdp size divides) and replicated over ``'data'``; tensors
                      smaller than ``min_size`` elements, or with no divisible axis, stay
                      replicated (splitting them saves nothing and costs a collective);
  * a tuple          — an explicit `PartitionSpec`, e.g. ``(None, "fsdp")``.

Paths are dotted, e.g. ``params.down_blocks.0.resnets.1.conv1.kernel`` or
``opt_state.0.mu.conv_in.kernel``; rules are matched with `re.search`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jip2p.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Biases and norm scales are small: keep them whole. Everything else: FSDP.
DEFAULT_RULES = (
    (r"\.(bias|scale)$", "replicate"),
    (r".*", "fsdp"),
)


def make_mesh(data: int, fsdp: int, devices: Sequence[jax.Device] | None = None, *,
              dcn_data: int = 1) -> Mesh:
  """A ``(data, fsdp)`` mesh; the devices of one process stay contiguous along the batch.

  ``dcn_data`` > 1: the devices are ``dcn_data`` TPU slices (``device.slice_index``) and the data
  axis is split across them, each slice holding a ``(data / dcn_data, fsdp)`` block."""
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) != data * fsdp:
    raise ValueError(f"a {data}×{fsdp} mesh needs {data * fsdp} devices, got {len(devices)}")
  if dcn_data > 1:
    try:
      grid = mesh_utils.create_hybrid_device_mesh((data // dcn_data, fsdp), (dcn_data, 1),
                                                  devices, allow_split_physical_axes=True)
    except (ValueError, AttributeError) as e:
      raise ConfigError(f"config.mesh.dcn_data={dcn_data}: these {len(devices)} devices are "
                        f"not {dcn_data} slices ({e})") from None
    return Mesh(grid, MESH_AXES)
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, MESH_AXES)


def path_str(path: tuple) -> str:
  """A pytree key path as a dotted name (NNX's trailing ``.value`` dropped)."""
  parts = []
  for key in path:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
    parts.append(str(name if name is not None else key))
  if parts and parts[-1] == "value":
    parts.pop()
  return ".".join(parts)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Split the largest axis that ``fsdp_size`` divides; replicate small or indivisible tensors."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return P(*(["fsdp" if i == axis else None for i in range(len(shape))]))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules, min_size: int) -> P:
  for pattern, action in rules:
    if re.search(pattern, path):
      if action == "replicate":
        return P()
      if action == "fsdp":
        return fsdp_spec(shape, mesh.shape["fsdp"], min_size)
      return P(*action)
  raise ValueError(f"no sharding rule matches {path!r}")


def tree_shardings(tree, mesh: Mesh, *, rules=DEFAULT_RULES, min_size: int = 2 ** 14):
  """A pytree of `NamedSharding`s matching ``tree`` (arrays or `jax.ShapeDtypeStruct`s)."""
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(path_str(path), tuple(np.shape(leaf)), mesh, rules,
                                        min_size))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Host arrays that are equal on every process → global arrays replicated over ``mesh``."""
  spec = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), spec, lambda i: np.asarray(x)[i]), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over every device; the other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def per_device_bytes(tree) -> dict[jax.Device, int]:
  """Bytes of ``tree``'s arrays held by each addressable device."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
