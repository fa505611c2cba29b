"""When jip2p-train starts jax.distributed, and with what, on every environment it supports.

Each environment is faked where JAX's own cluster detection reads it (``jax._src.clusters``): the
Cloud TPU VM flag and metadata server of ``cloud_tpu_cluster``, GKE's and SLURM's and Open MPI's
variables. ``jax.distributed.initialize`` is replaced by a recorder, and what it was given is run
through JAX's own auto-detection to show the processes it would connect.
"""

from __future__ import annotations

import os
import signal

import jax
import pytest
from jax._src import clusters
from jax._src import distributed as jax_distributed
from jax._src.clusters import cloud_tpu_cluster

from jip2p.errors import ConfigError
from jip2p.train import distributed

CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                    "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_")


@pytest.fixture
def calls(monkeypatch):
  """A machine with no cluster at all; returns the recorded ``jax.distributed.initialize`` calls."""
  for name in list(os.environ):
    if name.startswith(CLUSTER_PREFIXES):
      monkeypatch.delenv(name)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)

  def no_metadata_server(key):
    raise AssertionError(f"metadata server asked for {key!r} off a Cloud TPU VM")

  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", no_metadata_server)
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def tpu_vm(monkeypatch, metadata: dict[str, str]) -> None:
  """A Cloud TPU VM: JAX found a TPU at import, and the metadata server answers ``metadata``."""
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata",
                      lambda key: (metadata[key], 200) if key in metadata else ("", 404))


def jax_would_connect(kwargs: dict) -> tuple:
  """(coordinator, process count, process id) that JAX's detection completes ``kwargs`` to."""
  address, count, pid, _ = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      kwargs.get("coordinator_address"), kwargs.get("num_processes"), kwargs.get("process_id"),
      None, None, 5)
  return address, count, pid


def test_single_host_starts_nothing(calls):
  assert distributed.initialize("auto") is False
  assert calls == []


def test_cloud_tpu_vm_pod_always_starts_with_no_arguments(calls, monkeypatch):
  """tpu-vm workers learn the slice from the metadata server, not from TPU_WORKER_HOSTNAMES
  (unset here, as on a TPU VM)."""
  tpu_vm(monkeypatch, {"agent-worker-number": "2",
                       "worker-network-endpoints": "127.0.0.10,127.0.0.11,127.0.0.12,127.0.0.13",
                       "tpu-env": "ACCELERATOR_TYPE: 'v5litepod-32'"})
  assert distributed.initialize("auto") is True
  assert calls == [{}]
  assert jax_would_connect(calls[0]) == ("127.0.0.10:8482", 4, 2)


def test_cloud_tpu_vm_multislice_counts_every_slice(calls, monkeypatch):
  tpu_vm(monkeypatch, {"agent-worker-number": "1",
                       "worker-network-endpoints": "127.0.0.20,127.0.0.21",
                       "tpu-env": "MEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n"
                                  "MEGASCALE_COORDINATOR_ADDRESS: '127.0.0.5:8080'"})
  distributed.initialize("auto")
  assert calls == [{}]
  assert jax_would_connect(calls[0]) == ("127.0.0.5:8482", 4, 3)


def test_single_host_tpu_vm_starts_too(calls, monkeypatch):
  """One worker (v5litepod-8): the client is still started, for orbax and the preemption
  service."""
  tpu_vm(monkeypatch, {"agent-worker-number": "0", "worker-network-endpoints": "127.0.0.30",
                       "tpu-env": ""})
  assert distributed.initialize("auto") is True
  assert jax_would_connect(calls[0]) == ("127.0.0.30:8482", 1, 0)


def test_gke_tpu_pod_starts_with_no_arguments(calls, monkeypatch):
  """A GKE node's metadata server has no TPU worker number; GKE sets the variables instead."""
  tpu_vm(monkeypatch, {})
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "127.0.0.40,127.0.0.41")
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  assert distributed.initialize("auto") is True
  assert calls == [{}]
  assert jax_would_connect(calls[0]) == ("127.0.0.40:8482", 2, 1)


def slurm(monkeypatch, ntasks: int, procid: int) -> None:
  for name, value in {"SLURM_JOB_ID": "4097", "SLURM_STEP_NODELIST": "node[007-010]",
                      "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
                      "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(name, value)


def test_slurm_with_several_tasks_starts_and_jax_reads_the_ranks(calls, monkeypatch):
  slurm(monkeypatch, ntasks=4, procid=3)
  assert distributed.initialize("auto") is True
  assert calls == [{}]
  assert jax_would_connect(calls[0]) == ("node007:61441", 4, 3)


def test_slurm_with_one_task_starts_nothing(calls, monkeypatch):
  slurm(monkeypatch, ntasks=1, procid=0)
  assert distributed.initialize("auto") is False
  assert calls == []


def test_launch_script_variables_win_under_slurm(calls, monkeypatch):
  """launch/slurm_gpu.sbatch names the coordinator, count and rank itself."""
  slurm(monkeypatch, ntasks=2, procid=1)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node007:29500")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  distributed.initialize("auto")
  assert calls == [{"coordinator_address": "node007:29500", "num_processes": 2, "process_id": 1}]


def test_open_mpi_with_several_ranks_starts(calls, monkeypatch):
  for name, value in {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.50,127.0.0.51:34911",
                      "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
                      "OMPI_COMM_WORLD_LOCAL_RANK": "0"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize("auto") is True
  assert calls == [{}]
  address, count, pid = jax_would_connect(calls[0])
  assert address.startswith("127.0.0.50:") and (count, pid) == (4, 2)


def test_explicit_flags_and_their_errors(calls, monkeypatch):
  explicit = dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0)
  assert distributed.initialize("auto", **explicit) is True
  assert calls == [explicit]
  with pytest.raises(ConfigError, match="needs the number of processes"):
    distributed.initialize("auto", coordinator_address="127.0.0.1:1234")
  with pytest.raises(ConfigError, match="no cluster was detected"):
    distributed.initialize("on")
  with pytest.raises(ConfigError, match="distributed mode 'sometimes'"):
    distributed.initialize("sometimes")
  tpu_vm(monkeypatch, {"agent-worker-number": "0", "worker-network-endpoints": "127.0.0.1"})
  assert distributed.initialize("off") is False
  assert calls == [explicit]


def test_one_process_catches_sigterm_itself(monkeypatch):
  monkeypatch.setattr(jax_distributed.global_state, "client", None)
  preemption = distributed.Preemption()
  try:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.reached(2)
  finally:
    preemption.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class FakeSyncManager:
  def reached_sync_point(self, step: int) -> bool:
    return step == 5


def test_with_the_client_the_processes_agree_through_jax(monkeypatch):
  monkeypatch.setattr(jax_distributed.global_state, "client", object())
  monkeypatch.setattr(jax_distributed.global_state, "preemption_sync_manager", FakeSyncManager())
  preemption = distributed.Preemption()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # JAX's handler, not jip2p's
  assert [preemption.reached(s) for s in (4, 5)] == [False, True]


def test_processes_that_could_not_agree_are_refused(monkeypatch):
  monkeypatch.setattr(jax_distributed.global_state, "client", None)
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(ConfigError, match="4 processes without jax.distributed"):
    distributed.Preemption()
  monkeypatch.setattr(jax_distributed.global_state, "client", object())
  monkeypatch.setattr(jax_distributed.global_state, "preemption_sync_manager", None)
  with pytest.raises(ConfigError, match="preemption service is off"):
    distributed.Preemption()
