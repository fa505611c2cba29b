#!/usr/bin/env bash
# Issue 7's benchmark on one GPU: the side-by-side table, then the JAX-side ablations.
#
#   bash bench/h100.sh [OUT_DIR]      # default bench/out/<host>-<yyyymmdd-hhmm>
#
# Needs jip2p with its GPU extra (jax[cuda12]) and the PyTorch side (torch, diffusers,
# transformers) in the same Python. Takes about an hour, most of it torch.compile's first steps
# and the 100-step edits. Writes OUT_DIR/*.md (tables) and OUT_DIR/*.json (every record); copy the
# tables into bench/RESULTS.md with the date and this command.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/out/$(hostname)-$(date +%Y%m%d-%H%M)}"
mkdir -p "$out"
bench() { python -m jip2p.cli.bench "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"

# 1. Every case of the issue, both sides (PyTorch eager everywhere, torch.compile on the targets).
bench --json "$out/main.json" --markdown "$out/main.md"

# 2. What each JAX setting is worth, on the target cases (JAX side only; compare with main.md).
targets=train_full_256_b64,train_unet_256_b64,train_full_512_b32,edit_512_s20_b1
bench --sides jax --cases "$targets" --xla-flags none \
  --json "$out/no_xla_flags.json" --markdown "$out/no_xla_flags.md"
bench --sides jax --cases "$targets" --attention xla \
  --json "$out/xla_attention.json" --markdown "$out/xla_attention.md"
bench --sides jax --cases train_full_256_b64,train_full_256_b128,train_full_512_b32 --remat \
  --json "$out/remat.json" --markdown "$out/remat.md"

# 3. docs/design.md §3's baseline definition (no EMA in PyTorch's step), to check this machine
#    against the recorded baseline figures.
bench --sides torch --cases train_full_256_b64,train_unet_256_b64 --no-torch-ema \
  --torch-compile none --json "$out/torch_no_ema.json" --markdown "$out/torch_no_ema.md"

echo "tables: $out/*.md"
