#!/usr/bin/env bash
# jip2p-train on a Cloud TPU VM pod slice (v4, v5e, v5p, v6e): every worker runs the same command;
# JAX finds the other workers by itself (jax.distributed starts with no arguments on a Cloud TPU).
#
#   bash launch/tpu_vm.sh queue   NAME ZONE ACCELERATOR [RUNTIME]   a queued resource (waits for it)
#   bash launch/tpu_vm.sh create  NAME ZONE ACCELERATOR [RUNTIME]   a TPU VM now (or an error)
#   bash launch/tpu_vm.sh status  NAME ZONE       READY, PREEMPTED, … (queued: ACTIVE, SUSPENDED, …)
#   bash launch/tpu_vm.sh setup   NAME ZONE       copy this checkout to all workers, install it
#   bash launch/tpu_vm.sh train   NAME ZONE JIP2P-TRAIN-ARGS...   start training on all workers
#   bash launch/tpu_vm.sh resume  NAME ZONE ACCELERATOR JIP2P-TRAIN-ARGS...   after a preemption:
#                                 delete and recreate the slice the same way, setup, train
#   bash launch/tpu_vm.sh logs    NAME ZONE       follow worker 0's log (only process 0 logs)
#   bash launch/tpu_vm.sh stop    NAME ZONE       SIGTERM on all workers: save a checkpoint and exit
#   bash launch/tpu_vm.sh delete  NAME ZONE
#
# SPOT=1 asks for spot capacity (queue, create, and resume: give it again). RUNTIME defaults by
# accelerator (the Cloud TPU runtime table, cloud.google.com/tpu/docs/runtimes): v4
# tpu-ubuntu2204-base, v5e (v5litepod-*) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
# v2-alpha-tpuv6e. These images are Ubuntu 22.04 with Python 3.10, and jip2p (like JAX 0.10)
# needs 3.11: `setup` installs uv and makes .venv with a Python 3.11 of uv's.
#
# Example, SD 1.5 at 256 px on a spot v5e-32 slice (16 GB chips: FSDP over 8 chips, 4-way data):
#   SPOT=1 bash launch/tpu_vm.sh queue ip2p us-west4-a v5litepod-32
#   bash launch/tpu_vm.sh setup ip2p us-west4-a
#   JAX_COMPILATION_CACHE_DIR=gs://BUCKET/jax-cache bash launch/tpu_vm.sh train ip2p us-west4-a \
#     --config=configs/ip2p_sd15.py:init=gs://BUCKET/sd15,data=gs://BUCKET/ip2p-shards,fsdp=8 \
#     --workdir=gs://BUCKET/runs/ip2p_sd15
# Models, data, the work directory and the compilation cache may all be on gs:// (a preempted
# slice's disks are gone): each worker copies a gs:// model once into ~/.cache/jip2p/models.
set -euo pipefail
cd "$(dirname "$0")/.."
self="$PWD/launch/tpu_vm.sh"

action=${1:?usage: see the top of launch/tpu_vm.sh}
name=${2:?TPU name}
zone=${3:?zone}
shift 3

# libtpu flags worth setting for FSDP and data-parallel training (the set MaxText uses on v4/v5e/
# v5p/v6e): asynchronous, fused collectives overlapped with compute, so the parameter all-gathers
# and gradient reductions hide behind the UNet's convolutions. Names change with libtpu releases
# and an unknown one stops libtpu at start: drop any that your runtime rejects.
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-"--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"}
# Compiled programs survive restarts: a resumed run skips recompiling (minutes for SD). On a spot
# slice point it at gs:// so that it survives the slice too.
JAX_CACHE=${JAX_COMPILATION_CACHE_DIR:-"\$HOME/.cache/jip2p-jax"}

tpus=(gcloud compute tpus)
ssh_all() {
  "${tpus[@]}" tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

runtime_for() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "no default runtime for accelerator $1: pass RUNTIME" >&2; exit 2 ;;
  esac
}

spot=()
[ "${SPOT:-0}" = 1 ] && spot=(--spot)

# A queued resource of this name, if there is one (the slice's node has the same name).
queued() {
  "${tpus[@]}" queued-resources describe "$name" --zone="$zone" --format='value(state.state)' \
    2>/dev/null
}

case "$action" in
  create)
    accelerator=${1:?accelerator type, e.g. v4-32, v5litepod-32, v5p-64, v6e-32}
    runtime=${2:-$(runtime_for "$accelerator")}
    "${tpus[@]}" tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$runtime" "${spot[@]}"
    ;;
  queue)
    accelerator=${1:?accelerator type, e.g. v5litepod-32, v5p-64}
    runtime=${2:-$(runtime_for "$accelerator")}
    "${tpus[@]}" queued-resources create "$name" --node-id="$name" --zone="$zone" \
      --accelerator-type="$accelerator" --runtime-version="$runtime" "${spot[@]}"
    echo "waiting for capacity (Ctrl-C leaves the request queued; 'status' shows it)" >&2
    until [ "$(queued)" = ACTIVE ]; do
      case "$(queued)" in FAILED|SUSPENDED) echo "queued resource $(queued)" >&2; exit 1 ;; esac
      sleep 60
    done
    ;;
  status)
    state=$(queued) || true
    [ -n "$state" ] && echo "queued resource: $state"
    "${tpus[@]}" tpu-vm describe "$name" --zone="$zone" --format='value(state)'
    ;;
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git ls-files -z | xargs -0 tar czf "$archive"
    "${tpus[@]}" tpu-vm scp "$archive" "$name":jip2p.tar.gz --zone="$zone" --worker=all
    rm -f "$archive"
    # The TPU images' Python is 3.10: use it only if it is 3.11 or newer, else uv's 3.11.
    ssh_all "mkdir -p jip2p && tar xzf jip2p.tar.gz -C jip2p && cd jip2p && \
      if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
        python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
        .venv/bin/pip install -q -c launch/constraints.txt -e '.[tpu]'; \
      else \
        python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --python 3.11 .venv && \
        ~/.local/bin/uv pip install -q --python .venv/bin/python -c launch/constraints.txt \
          -e '.[tpu]'; \
      fi"
    ;;
  train)
    args=$(printf ' %q' "$@")
    # Appended: the log of every start of the run stays (the work directory has train.log too).
    # Only the trainer goes to the background (the braces), so train.pid lands in jip2p/ and holds
    # the trainer's own process id (nohup execs it), which 'stop' signals.
    ssh_all "cd jip2p && { LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' \
      JAX_COMPILATION_CACHE_DIR=$JAX_CACHE nohup .venv/bin/jip2p-train$args >> train.log 2>&1 \
      < /dev/null & echo \$! > train.pid; }"
    ;;
  resume)
    # A preempted spot slice cannot be restarted: it is deleted and created again (a queued
    # resource is queued again: capacity may take a while), then set up and trained from the
    # last checkpoint in the same --workdir.
    accelerator=${1:?accelerator type}
    shift
    if [ -n "$(queued)" ]; then
      "${tpus[@]}" queued-resources delete "$name" --zone="$zone" --force --quiet
      bash "$self" queue "$name" "$zone" "$accelerator"
    else
      "${tpus[@]}" tpu-vm delete "$name" --zone="$zone" --quiet || true
      bash "$self" create "$name" "$zone" "$accelerator"
    fi
    bash "$self" setup "$name" "$zone"
    bash "$self" train "$name" "$zone" "$@"
    ;;
  logs)
    "${tpus[@]}" tpu-vm ssh "$name" --zone="$zone" --worker=0 --command="tail -f jip2p/train.log"
    ;;
  stop)
    ssh_all "kill -TERM \$(cat jip2p/train.pid) 2>/dev/null || true"
    ;;
  delete)
    if [ -n "$(queued)" ]; then
      "${tpus[@]}" queued-resources delete "$name" --zone="$zone" --force --quiet
    else
      "${tpus[@]}" tpu-vm delete "$name" --zone="$zone" --quiet
    fi
    ;;
  *)
    echo "unknown action $action; see the top of launch/tpu_vm.sh" >&2
    exit 2
    ;;
esac
