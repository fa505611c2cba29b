#!/usr/bin/env bash
# The issue's targets in one short call on one GPU: ≤ 8 minutes of wall time, set-up included.
#
#   bash bench/device_quick.sh [--dry-run] [--seconds N] [OUT_DIR]
#
# OUT_DIR (default $OUT if set, else bench/out/quick-<host>-<yyyymmdd-hhmm>) receives quick.md
# (the side-by-side table), quick.json (every record), setup.txt (what ran, from where) and
# log.txt. Set-up: the wheels of bench/device_wheels.txt (how to fill the folder is written there)
# are installed from JIP2P_WHEELS (default .whl/) with --no-deps into a fresh folder that comes
# first on PYTHONPATH; the machine needs Python with JAX and torch (PYTHON, default python3).
#
# Cases in this order, so that a cut-off run still has the most important rows: the UNet-only and
# the full train step at 256 px, the 20-step edit at 512 px, the full step at 512 px, then P2P
# pairs; PyTorch eager beside each, torch.compile after all of them if time remains. Each case
# has its own time budget (name@seconds: each of its processes), and the run stops at N seconds
# (default 450) from the start of this script: what did not fit is a "not run" row, and the table
# and JSON always hold what finished.
#
# --dry-run proves the same path on a CPU: tiny preset, float32, one timed run per case, N = 120
# by default, and the CPU compiler's code generation turned down (it measures nothing).
# tests/test_device_quick.py runs it.
set -euo pipefail
start=$(date +%s)
repo="$(cd "$(dirname "$0")/.." && pwd)"
dry=0 seconds=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --seconds) seconds="$2"; shift 2 ;;
    *) echo "device_quick.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
out="${1:-${OUT:-$repo/bench/out/quick-$(uname -n)-$(date +%Y%m%d-%H%M)}}"
wheels="${JIP2P_WHEELS:-$repo/.whl}"
python="${PYTHON:-python3}"
if ! compgen -G "$wheels/*.whl" >/dev/null; then
  echo "device_quick.sh: no wheels in $wheels: fill it as bench/device_wheels.txt says" >&2
  exit 2
fi

if [[ $dry == 1 ]]; then
  seconds="${seconds:-120}"
  cases=train_unet_32_b2@80,train_full_32_b2@80,edit_64_s2_b1@60,train_full_64_b2@80
  cases+=,p2p_64_s2_k1@60
  bench_args=(--preset tiny --dtype float32 --warmup 0 --iters 1)
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  export XLA_FLAGS="$XLA_FLAGS --xla_llvm_disable_expensive_passes=true"
else
  seconds="${seconds:-450}"
  cases=train_unet_256_b64@150,train_full_256_b64@150,edit_512_s20_b1@120
  cases+=,train_full_512_b32@150,p2p_512_s20_k4@120
  bench_args=(--preset sd15)
fi
mkdir -p "$out"

site="$(mktemp -d "${TMPDIR:-/tmp}/jip2p-quick-site.XXXXXX")"
trap 'rm -rf "$site"' EXIT
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --disable-pip-version-check --root-user-action=ignore --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -n)  wheels: $wheels -> $site"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  "$python" - "$site" <<'EOF'
import importlib.metadata as md
import importlib.util
import sys

site = sys.argv[1]
print("python", sys.version.split()[0], sys.executable)
for module, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("torch", "torch"),
                     ("transformers", "transformers"), ("diffusers", "diffusers"),
                     ("ftfy", "ftfy"), ("wcwidth", "wcwidth"), ("open_clip", "open_clip_torch"),
                     ("tensorflow", "tensorflow")):
  spec = importlib.util.find_spec(module)
  if spec is None:
    print(f"{module}: absent")
    continue
  try:
    version = md.version(dist)
  except md.PackageNotFoundError:
    version = "?"
  where = "carried" if (spec.origin or "").startswith(site) else "installed"
  print(f"{module}: {version} {where} ({spec.origin})")
EOF
} >"$out/setup.txt"
cat "$out/setup.txt" >&2

left=$((seconds - ($(date +%s) - start) - 5))
status=0
"$python" -m jip2p.cli.bench "${bench_args[@]}" --cases "$cases" --second-start none \
  --budget "$left" --json "$out/quick.json" --markdown "$out/quick.md" \
  2> >(tee "$out/log.txt" >&2) || status=$?
echo "device_quick.sh: $(($(date +%s) - start)) s in all; tables: $out/quick.md" >&2
exit "$status"
