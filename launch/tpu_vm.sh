#!/usr/bin/env bash
# jip2p-train on a Cloud TPU VM pod slice (v4, v5e, v5p, v6e): every worker runs the same command;
# JAX finds the other workers by itself (jax.distributed on TPU needs no coordinator flags).
#
#   bash launch/tpu_vm.sh create  NAME ZONE ACCELERATOR [RUNTIME]   e.g. ip2p us-west4-a v5litepod-32
#   bash launch/tpu_vm.sh setup   NAME ZONE       copy this checkout to all workers, install jip2p[tpu]
#   bash launch/tpu_vm.sh train   NAME ZONE JIP2P-TRAIN-ARGS...   start training on all workers
#   bash launch/tpu_vm.sh logs    NAME ZONE       follow worker 0's log (only process 0 logs)
#   bash launch/tpu_vm.sh stop    NAME ZONE       SIGTERM on all workers: save a checkpoint and exit
#   bash launch/tpu_vm.sh delete  NAME ZONE
#
# Example, SD 1.5 at 256 px on a v5e-32 slice (16 GB chips: FSDP over 8 chips, 4-way data parallel):
#   bash launch/tpu_vm.sh train ip2p us-west4-a \
#     --config=configs/ip2p_sd15.py:init=/mnt/sd15,data=gs://BUCKET/ip2p-shards,fsdp=8,accum=1 \
#     --workdir=gs://BUCKET/runs/ip2p_sd15
# Models are read from a local path on every worker (copy them with `setup`'s scp or gcloud storage
# cp); data, checkpoints, logs and exports may live on gs://. Running `train` again resumes from the
# latest checkpoint, so after a spot preemption: `create` again, `setup`, `train` with the same
# --workdir. SPOT=1 creates a spot (preemptible) slice.
set -euo pipefail
cd "$(dirname "$0")/.."

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
# Compiled programs survive restarts: a resumed run skips recompiling (minutes for SD).
JAX_CACHE=${JAX_COMPILATION_CACHE_DIR:-"\$HOME/.cache/jip2p-jax"}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

case "$action" in
  create)
    accelerator=${1:?accelerator type, e.g. v4-32, v5litepod-32, v5p-64, v6e-32}
    # Runtimes: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
    # v6e v2-alpha-tpuv6e.
    runtime=${2:-v2-alpha-tpuv5-lite}
    spot=()
    [ "${SPOT:-0}" = 1 ] && spot=(--spot)
    gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" \
      --version="$runtime" "${spot[@]}"
    ;;
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git ls-files -z | xargs -0 tar czf "$archive"
    gcloud compute tpus tpu-vm scp "$archive" "$name":jip2p.tar.gz --zone="$zone" --worker=all
    rm -f "$archive"
    ssh_all "mkdir -p jip2p && tar xzf jip2p.tar.gz -C jip2p && cd jip2p && \
      python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
      .venv/bin/pip install -q -c launch/constraints.txt -e '.[tpu]'"
    ;;
  train)
    args=$(printf ' %q' "$@")
    ssh_all "cd jip2p && LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS' JAX_COMPILATION_CACHE_DIR=$JAX_CACHE \
      nohup .venv/bin/jip2p-train$args > train.log 2>&1 < /dev/null & echo \$! > train.pid"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=0 --command="tail -f jip2p/train.log"
    ;;
  stop)
    ssh_all "kill -TERM \$(cat jip2p/train.pid) 2>/dev/null || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
    ;;
  *)
    echo "unknown action $action; see the top of launch/tpu_vm.sh" >&2
    exit 2
    ;;
esac
