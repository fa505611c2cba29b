"""`jip2p-bench`: jip2p (JAX) against diffusers (PyTorch) on this machine, side by side.

  jip2p-bench                                   # every case of the issue, SD 1.5 sizes
  jip2p-bench --cases train_full_256_b64,edit_512_s20_b1 --json out.json --markdown out.md
  jip2p-bench --preset tiny --cases train_full_32_b2 --iters 2 --warmup 0   # CPU smoke run

Each (side, case, variant) runs in its own process on the same device, with identical shapes and
random weights of the same configs (a preset of `jip2p.checkpoints.PRESETS`, or --model-configs);
the figures' definitions are in `jip2p.bench.cases`. Prints the markdown table; --json and
--markdown also write the records and the table. A failing process (e.g. out of memory) becomes a
"failed" row, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from jip2p.bench import cases as cases_lib
from jip2p.cli import run

PROG = "jip2p-bench"
SIDES = ("jax", "torch")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default=",".join(cases_lib.DEFAULT_CASES),
                 help="comma-separated case names (see jip2p.bench.cases); default: all")
  models = p.add_mutually_exclusive_group()
  models.add_argument("--preset", default="sd15", help="model shapes: sd15, sd21, tiny")
  models.add_argument("--model-configs", default=None,
                      help="JSON file {unet, vae, text_encoder, scheduler} of diffusers configs")
  p.add_argument("--sides", default="jax,torch", help="jax, torch or both")
  p.add_argument("--torch-compile", choices=("targets", "all", "none"), default="targets",
                 help="train cases also run with the UNet under torch.compile: "
                      f"targets = {', '.join(cases_lib.COMPILE_CASES)}")
  p.add_argument("--torch-ema", action=argparse.BooleanOptionalAction, default=True,
                 help="EMA in PyTorch's train step, as in JAX's (docs/design.md §3 baseline: off)")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="JAX compute dtype (parameters stay float32)")
  p.add_argument("--attention", choices=("auto", "xla", "cudnn", "pallas"), default="auto",
                 help="JAX attention (auto: cudnn on GPU, pallas on TPU, xla elsewhere)")
  p.add_argument("--remat", action="store_true", help="JAX: rematerialise UNet blocks")
  p.add_argument("--xla-flags", choices=("tuned", "none"), default="tuned",
                 help="tuned: jip2p.runtime.GPU_FLAGS added to XLA_FLAGS")
  p.add_argument("--second-start", choices=("first", "all", "none"), default="first",
                 help="JAX train cases whose start is repeated with the persistent compilation "
                      "cache the first start filled (first: the first train case)")
  p.add_argument("--compile-cache", default=None,
                 help="compilation cache folder (default: a fresh one per run, so first starts "
                      "are cold)")
  p.add_argument("--warmup", type=int, default=None, help="override every case's warm-up runs")
  p.add_argument("--iters", type=int, default=None, help="override every case's timed runs")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per side process")
  p.add_argument("--json", default=None, help="write the records here")
  p.add_argument("--markdown", default=None, help="write the table here")
  p.add_argument("-v", "--verbose", action="store_true", help="show the side processes' output")
  return p.parse_args(argv)


def _configs(args) -> dict:
  if args.model_configs:
    with open(args.model_configs) as f:
      configs = json.load(f)
    missing = {"unet", "vae", "text_encoder", "scheduler"} - set(configs)
    if missing:
      from jip2p.errors import ConfigError
      raise ConfigError(f"{args.model_configs} lacks {sorted(missing)}")
    return configs
  from jip2p.checkpoints import preset_configs
  return preset_configs(args.preset, unet_in_channels=8)


def _run_side(module: str, argv: list[str], *, timeout: float, verbose: bool,
              log) -> tuple[list[dict], str | None]:
  """Runs ``python -m module argv``: (its BENCH records, None) or ([], why it failed)."""
  command = [sys.executable, "-m", module] + argv
  log("$ " + " ".join(shlex.quote(c) for c in command[1:]))
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.perf_counter()
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return [], f"timed out after {timeout:.0f} s"
  if verbose:
    sys.stderr.write(done.stdout + done.stderr)
  records = [json.loads(line[len("BENCH "):]) for line in done.stdout.splitlines()
             if line.startswith("BENCH ")]
  log(f"  exit {done.returncode} after {time.perf_counter() - start:.0f} s")
  if done.returncode or not records:
    text = (done.stderr + done.stdout).strip().splitlines()
    why = next((l for l in reversed(text) if "Error" in l or "error" in l), text[-1] if text
               else f"exit status {done.returncode}")
    if "out of memory" in (done.stderr + done.stdout).lower() or "RESOURCE_EXHAUSTED" in why:
      why = "out of memory: " + why
    return [], why.strip()[:300]
  return records, None


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  from jip2p.bench import report
  from jip2p.errors import ConfigError

  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  if not sides or set(sides) - set(SIDES):
    raise ConfigError(f"--sides={args.sides!r}: choose from {SIDES}")
  selected = cases_lib.parse_list(args.cases, warmup=args.warmup, iters=args.iters)
  runs = []
  if args.warmup is not None:
    runs += ["--warmup", str(args.warmup)]
  if args.iters is not None:
    runs += ["--iters", str(args.iters)]
  log = lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True)
  records: list[dict] = []
  torch_flops: dict[int, float] = {}
  second_start: dict[str, float] = {}
  side_kw = dict(timeout=args.timeout, verbose=args.verbose, log=log)

  with tempfile.TemporaryDirectory(prefix="jip2p-bench-") as tmp:
    configs_path = os.path.join(tmp, "configs.json")
    with open(configs_path, "w") as f:
      json.dump(_configs(args), f)
    cache = args.compile_cache or os.path.join(tmp, "compilation-cache")
    jax_common = ["--configs", configs_path, "--dtype", args.dtype, "--attention", args.attention,
                  "--xla-flags", args.xla_flags, "--compile-cache", cache] + runs
    if args.remat:
      jax_common.append("--remat")
    train_cases = [c for c in selected if c.kind == "train"]
    repeat = {"first": train_cases[:1], "all": train_cases, "none": []}[args.second_start]

    if "torch" in sides:
      for res in sorted({c.res for c in train_cases}):
        found, error = _run_side("jip2p.bench.torch_side",
                                 ["--flops", str(res), "--configs", configs_path], **side_kw)
        if found:
          torch_flops[res] = found[0]["flops_per_image"]
        else:
          log(f"PyTorch FLOP count at {res} px failed ({error}); using XLA's count")

    for case in selected:
      if "jax" in sides:
        found, error = _run_side("jip2p.bench.jax_side", ["--case", case.name] + jax_common,
                                 **side_kw)
        records += found or [{"side": "jax", "variant": "jax", "case": case.name,
                              "kind": case.kind, "error": error}]
        if found and case in repeat:
          again, error = _run_side("jip2p.bench.jax_side",
                                   ["--case", case.name, "--first-only"] + jax_common, **side_kw)
          if again:
            second_start[case.name] = again[0]["first_s"]
      if "torch" in sides and case.kind != "p2p":
        variants = ["eager"]
        if case.kind == "train" and (args.torch_compile == "all" or (
            args.torch_compile == "targets" and case.name in cases_lib.COMPILE_CASES)):
          variants.append("compile")
        for variant in variants:
          torch_argv = ["--case", case.name, "--configs", configs_path, "--variant", variant]
          torch_argv += runs + ([] if args.torch_ema else ["--no-ema"])
          found, error = _run_side("jip2p.bench.torch_side", torch_argv, **side_kw)
          records += found or [{"side": "torch", "variant": variant, "case": case.name,
                                "kind": case.kind, "error": error}]

  records = report.derive(records, torch_flops)
  command = " ".join([PROG] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
  title = f"jip2p-bench, {args.model_configs or 'preset ' + args.preset}"
  text = report.markdown(records, title=title, command=command, torch_flops=torch_flops,
                         second_start=second_start)
  print(text)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(text + "\n")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"command": command, "title": title, "environment": report.environment(records),
                 "torch_unet_flops_per_image": {str(k): v for k, v in torch_flops.items()},
                 "second_start_s": second_start, "records": records}, f, indent=1)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
