"""Starting JAX on several hosts, and stopping them all at one step when one is preempted.

`initialize` must run before anything touches a JAX device. Which environment this is comes from
JAX's own cluster detection (``jax._src.clusters``: the first environment whose
``is_env_present()`` holds, as ``jax.distributed.initialize`` picks it):

  * explicit arguments (``jip2p-train --coordinator_address --num_processes --process_id``) or
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: those;
  * a Cloud TPU VM (``gcloud compute tpus tpu-vm``, queued resources: the metadata server names
    the workers) or a GKE TPU pod (``TPU_WORKER_HOSTNAMES``): always, with no arguments, on one
    host too: orbax's multi-host saves and the preemption service need the distributed client;
  * SLURM (``srun``) or Open MPI with more than one task: no arguments, JAX reads the ranks;
  * anything else is one process on one machine: nothing to start.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from jax._src import clusters
from jax._src import distributed as jax_distributed
from jax._src.clusters import cloud_tpu_cluster
from jax.experimental import multihost_utils

from jip2p.errors import ConfigError

MODES = ("auto", "on", "off")


def detect_cluster() -> type[clusters.ClusterEnv] | None:
  """The environment JAX's auto-detection picks: the first present one that is not opt-in."""
  return next((env for env in clusters.ClusterEnv._cluster_types
               if not env.opt_in_only_method and env.is_env_present()), None)


def plan(mode: str = "auto", *, coordinator_address: str | None = None,
         num_processes: int | None = None,
         process_id: int | None = None) -> dict[str, Any] | None:
  """The arguments for ``jax.distributed.initialize`` (None: do not start it).

  ``mode``: "auto" (start on a Cloud TPU, with a coordinator, or under a launcher that started
  several processes), "on" (always: JAX detects what is not given), "off" (never).
  """
  if mode not in MODES:
    raise ConfigError(f"distributed mode {mode!r}; choose one of {MODES}")
  if mode == "off":
    return None
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  given = {k: v for k, v in (("coordinator_address", coordinator_address),
                             ("num_processes", num_processes), ("process_id", process_id))
           if v is not None}
  cluster = detect_cluster()
  if cluster is None:
    if coordinator_address is None:
      if mode == "on":
        raise ConfigError("--distributed=on, but no cluster was detected (Cloud TPU, SLURM, Open "
                          "MPI) and no coordinator was given (--coordinator_address, "
                          "--num_processes, --process_id)")
      return None
    if len(given) < 3:
      raise ConfigError("a coordinator address needs the number of processes and this "
                        "process's id (--num_processes, --process_id or JAX_NUM_PROCESSES, "
                        "JAX_PROCESS_ID)")
    return given
  if (mode == "on" or coordinator_address is not None
      or issubclass(cluster, cloud_tpu_cluster.BaseTpuCluster)):
    return given
  return given if cluster.get_process_count() > 1 else None


def initialize(mode: str = "auto", **explicit) -> bool:
  """Joins the distributed run if `plan` says there is one; True when it was started."""
  kwargs = plan(mode, **explicit)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


class Preemption:
  """Whether to save and stop now, the same answer on every process at the same step.

  With the distributed client (any run `initialize` started), JAX's preemption service catches
  SIGTERM on whichever hosts get it and the processes agree on the step to save at. One process
  without it catches SIGTERM itself. Several processes without it could never agree, so a
  preemption would kill them unsaved: that is refused at start.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._sync = jax_distributed.global_state.client is not None
    if self._sync and jax_distributed.global_state.preemption_sync_manager is None:
      raise ConfigError("JAX's preemption service is off (jax_enable_preemption_service): the "
                        "processes could not agree on a step to save at when preempted")
    if not self._sync and jax.process_count() > 1:
      raise ConfigError(f"{jax.process_count()} processes without jax.distributed: start it "
                        "(jip2p-train --distributed=on) so that a preemption can be saved")
    if not self._sync and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def reached(self, step: int) -> bool:
    if self._sync:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
