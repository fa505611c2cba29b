"""Starting JAX on several hosts: `jax.distributed.initialize` from flags, environment or cluster.

Must run before anything touches a JAX device. Sources, first found wins:
  * explicit arguments (``jip2p-train --coordinator_address=… --num_processes=… --process_id=…``);
  * the environment: ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
  * JAX's own cluster detection: a Cloud TPU pod slice (every worker finds the others), SLURM
    (``srun``, one process per task) and Open MPI.
One process on one machine initialises nothing.
"""

from __future__ import annotations

import os

import jax

from jip2p.errors import ConfigError

MODES = ("auto", "on", "off")


def _cluster_detected() -> bool:
  """True when a launcher started several processes, or on a multi-host TPU slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(mode: str = "auto", *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins the distributed run if there is one; returns True when `jax.distributed` was started.

  ``mode``: "auto" (start when a coordinator is given or a cluster is detected), "on" (always:
  let JAX detect what is not given), "off" (never).
  """
  if mode not in MODES:
    raise ConfigError(f"distributed mode {mode!r}; choose one of {MODES}")
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if mode == "off" or (mode == "auto" and coordinator_address is None
                       and not _cluster_detected()):
    return False
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ConfigError("a coordinator address needs the number of processes and this process's "
                      "id (--num_processes, --process_id or JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True
