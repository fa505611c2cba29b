"""`jip2p-bench`: jip2p (JAX) against diffusers (PyTorch) on this machine, side by side.

  jip2p-bench                                   # every case of the issue, SD 1.5 sizes
  jip2p-bench --preset sdxl                     # SDXL base: its default cases (SDXL_CASES)
  jip2p-bench --cases train_full_256_b64,edit_512_s20_b1 --json out.json --markdown out.md
  jip2p-bench --preset tiny --cases train_full_32_b2 --iters 2 --warmup 0   # CPU smoke run
  jip2p-bench --cases train_unet_256_b64@150,edit_512_s20_b1@90 --budget 420  # a short call
  jip2p-bench --memory configs/ip2p_sd15.py --preset sd15   # what fits where (CPU estimate)

Each (side, case, variant) runs in its own process on the same device, with identical shapes and
random weights of the same configs (a preset of `jip2p.checkpoints.PRESETS`, or --model-configs);
the figures' definitions are in `jip2p.bench.cases`. Cases run in the order given, each JAX then
PyTorch eager; torch.compile variants (minutes of compilation each) run after all cases. Prints the
markdown table; --json and --markdown also write the records and the table, rewritten after every
process, so that a run cut short leaves what it finished. A failing process (e.g. out of memory)
becomes a "failed" row, one that --budget leaves no time for a "not run" row, and the others still
run.

--memory CONFIG compiles a training config's train step instead (no device is used; see
`jip2p.bench.memory`) and prints per-device bytes and the largest micro-batch per chip.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from jip2p.bench import cases as cases_lib
from jip2p import files
from jip2p.bench import report
from jip2p.cli import run
from jip2p.errors import ConfigError, OutputError

PROG = "jip2p-bench"
SIDES = ("jax", "torch")
MIN_START_S = 10  # Under this many seconds of --budget left, a process is not started.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default=None,
                 help="comma-separated case names (see jip2p.bench.cases); default: SD's "
                      f"{', '.join(cases_lib.DEFAULT_CASES)}; with SDXL models (--preset sdxl) "
                      f"{', '.join(cases_lib.SDXL_CASES)}")
  models = p.add_mutually_exclusive_group()
  models.add_argument("--preset", default=None,
                      help="model shapes: sd15 (default), sd21, sdxl, tiny, tiny-sdxl; with "
                           "--memory: instead of the config's model.init")
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
                 help="tuned: jip2p.runtime.TUNED_FLAGS (GPU and CPU) added to XLA_FLAGS")
  p.add_argument("--second-start", choices=("first", "all", "none"), default="first",
                 help="JAX train cases whose start is repeated with the persistent compilation "
                      "cache the first start filled (first: the first train case)")
  p.add_argument("--compile-cache", default=None,
                 help="compilation cache folder (default: a fresh one per run, so first starts "
                      "are cold)")
  p.add_argument("--warmup", type=int, default=None, help="override every case's warm-up runs")
  p.add_argument("--iters", type=int, default=None, help="override every case's timed runs")
  p.add_argument("--timeout", type=float, default=3600,
                 help="seconds per side process (a case's own: name@seconds in --cases)")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds for the whole run: a process gets at most what is left, and none "
                      "starts with less than %d s left" % MIN_START_S)
  p.add_argument("--json", default=None, help="write the records here")
  p.add_argument("--markdown", default=None, help="write the table here")
  p.add_argument("-v", "--verbose", action="store_true", help="show the side processes' output")
  mem = p.add_argument_group("memory", "--memory CONFIG: per-device bytes of the compiled train "
                             "step (only --preset, --json and --markdown of the above apply)")
  mem.add_argument("--memory", metavar="CONFIG", default=None,
                   help="a training config, path.py[:args] as jip2p-train's --config")
  mem.add_argument("--fsdp", default="1,4,8,64", help="FSDP device counts to compile for")
  mem.add_argument("--memory-remat", default="off,on",
                   help="UNet rematerialisation settings to compile: off, on or off,on")
  mem.add_argument("--chips", default=None,
                   help="NAME=GiB,… to fit (default: TPU v5e=16,TPU v4=32,H100=80,TPU v5p=95)")
  return p.parse_args(argv)


def _configs(args) -> dict:
  if args.model_configs:
    try:
      configs = json.loads(files.read_text(args.model_configs, "model configs file"))
    except json.JSONDecodeError as e:
      raise ConfigError(f"{args.model_configs}: the model configs file is not JSON ({e})") from None
    if not isinstance(configs, dict):
      raise ConfigError(f"{args.model_configs}: expected a JSON object of component configs")
    missing = {"unet", "vae", "text_encoder", "scheduler"} - set(configs)
    if missing:
      raise ConfigError(f"{args.model_configs} lacks {sorted(missing)}")
    return configs
  from jip2p.checkpoints import preset_configs
  return preset_configs(args.preset or "sd15", unet_in_channels=8)


def _run_side(module: str, argv: list[str], *, timeout: float, verbose: bool,
              log) -> tuple[list[dict], str | None]:
  """Runs ``python -m module argv``: (its BENCH records, None) or ([], why it failed)."""
  command = [sys.executable, "-m", module] + argv
  log("$ " + " ".join(shlex.quote(c) for c in command[1:]))
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  start = time.perf_counter()
  # Its own process group, so that a timeout also ends the workers it started (torch.compile's).
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, process_group=0)
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    log(f"  timed out after {timeout:.0f} s")
    return [], f"timed out after {timeout:.0f} s"
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
  if verbose:
    sys.stderr.write(stdout + stderr)
  records = [json.loads(line[len("BENCH "):]) for line in stdout.splitlines()
             if line.startswith("BENCH ")]
  log(f"  exit {proc.returncode} after {time.perf_counter() - start:.0f} s")
  if proc.returncode or not records:
    text = (stderr + stdout).strip().splitlines()
    why = next((l for l in reversed(text) if "Error" in l or "error" in l), text[-1] if text
               else f"exit status {proc.returncode}")
    if "out of memory" in (stderr + stdout).lower() or "RESOURCE_EXHAUSTED" in why:
      why = "out of memory: " + why
    return [], why.strip()[:300]
  return records, None


class _Run:
  """The records of a run so far, rewritten to --json / --markdown after every process."""

  def __init__(self, args, command: str, title: str, log):
    self.args, self.command, self.title, self.log = args, command, title, log
    self.records: list[dict] = []
    self.second_start: dict[str, float] = {}
    self.deadline = None if args.budget is None else time.monotonic() + args.budget

  def side(self, module: str, argv: list[str], case: cases_lib.Case, *, keep: bool = True,
           **row) -> list[dict]:
    """Runs one side process of ``case`` within its time limit and the budget. ``keep``: add its
    records to the table, or a row saying why there are none (``row``: its side and variant)."""
    limit = case.limit_s or self.args.timeout
    failure = dict(row, case=case.name, kind=case.kind)
    found, error = [], None
    left = None if self.deadline is None else self.deadline - time.monotonic()
    if left is not None and left < MIN_START_S:
      self.log(f"not run ({left:.0f} s of the budget left): {module} {' '.join(argv[:2])}")
      failure.update(not_run=True, error=f"the run's {self.args.budget:.0f} s budget was spent")
    else:
      cut = left is not None and left < limit
      found, error = _run_side(module, argv, timeout=min(limit, left) if cut else limit,
                               verbose=self.args.verbose, log=self.log)
      if cut and error and error.startswith("timed out"):
        error = f"{error}, where the run's {self.args.budget:.0f} s budget ended"
      failure["error"] = error
    if keep:
      self.records += found or [failure]
      self.write()
    return found

  def document(self) -> tuple[dict, str]:
    records = report.derive(self.records)
    text = report.markdown(records, title=self.title, command=self.command,
                           second_start=self.second_start)
    doc = {"command": self.command, "title": self.title,
           "environment": report.environment(records),
           "torch_unet_flops_per_image": {str(k): v for k, v in
                                          report.torch_flops(records).items()},
           "second_start_s": self.second_start, "budget_s": self.args.budget,
           "records": records}
    return doc, text

  def write(self) -> str:
    doc, text = self.document()
    if self.args.markdown:
      report.write_text(self.args.markdown, text + "\n")
    if self.args.json:
      report.write_text(self.args.json, json.dumps(doc, indent=1))
    return text


def _side_by_side(args, command: str, log) -> int:
  sides = [s.strip() for s in args.sides.split(",") if s.strip()]
  if not sides or set(sides) - set(SIDES):
    raise ConfigError(f"--sides={args.sides!r}: choose from {SIDES}")
  configs = _configs(args)
  default = cases_lib.SDXL_CASES if cases_lib.is_sdxl(configs) else cases_lib.DEFAULT_CASES
  selected = cases_lib.parse_list(args.cases or ",".join(default), warmup=args.warmup,
                                  iters=args.iters)
  cases_lib.check_models(selected, configs)
  runs = []
  if args.warmup is not None:
    runs += ["--warmup", str(args.warmup)]
  if args.iters is not None:
    runs += ["--iters", str(args.iters)]
  title = f"jip2p-bench, {args.model_configs or 'preset ' + (args.preset or 'sd15')}"
  state = _Run(args, command, title, log)

  with tempfile.TemporaryDirectory(prefix="jip2p-bench-") as tmp:
    configs_path = os.path.join(tmp, "configs.json")
    with open(configs_path, "w") as f:
      json.dump(configs, f)
    cache = args.compile_cache or os.path.join(tmp, "compilation-cache")
    jax_common = ["--configs", configs_path, "--dtype", args.dtype, "--attention", args.attention,
                  "--xla-flags", args.xla_flags, "--compile-cache", cache] + runs
    if args.remat:
      jax_common.append("--remat")
    train_cases = [c for c in selected if c.kind == "train"]
    repeat = {"first": train_cases[:1], "all": train_cases, "none": []}[args.second_start]
    compiled = [c for c in train_cases if args.torch_compile == "all" or (
        args.torch_compile == "targets" and c.name in cases_lib.COMPILE_CASES)]
    torch_argv = lambda case, variant: (
        ["--case", case.name, "--configs", configs_path, "--variant", variant] + runs
        + ([] if args.torch_ema else ["--no-ema"]))

    for case in selected:
      if "jax" in sides:
        found = state.side("jip2p.bench.jax_side", ["--case", case.name] + jax_common, case,
                           side="jax", variant="jax", dtype=args.dtype)
        if found and case in repeat:
          again = state.side("jip2p.bench.jax_side",
                             ["--case", case.name, "--first-only"] + jax_common, case, keep=False)
          if again:
            state.second_start[case.name] = again[0]["first_s"]
            state.write()
      if "torch" in sides and case.kind != "p2p":
        state.side("jip2p.bench.torch_side", torch_argv(case, "eager"), case, side="torch",
                   variant="eager")
    if "torch" in sides:
      for case in compiled:
        state.side("jip2p.bench.torch_side", torch_argv(case, "compile"), case, side="torch",
                   variant="compile")
  print(state.write())
  return 0


def _memory(args, command: str, log) -> int:
  fsdp = _positive_ints(args.fsdp, "--fsdp")
  modes = {"off": False, "on": True}
  names = [m.strip() for m in args.memory_remat.split(",") if m.strip()]
  if not names or set(names) - set(modes):
    raise ConfigError(f"--memory-remat={args.memory_remat!r}: off, on or off,on")
  # Before JAX starts: as many fake CPU devices as the largest mesh.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count="
                                              f"{max(fsdp)}"])
  os.environ["JAX_PLATFORMS"] = "cpu"
  from jip2p.bench import memory
  chips = memory.parse_chips(args.chips) if args.chips else memory.CHIPS
  config, configs = memory.load(args.memory, args.preset)
  memory.check_devices(max(fsdp))
  rows = memory.analyse(config, configs, fsdp=fsdp, remat=[modes[m] for m in names],
                        chips=chips, log=log)
  c = config.model
  title = (f"{args.memory}: {args.preset or c.init or '?'}, {config.data.res} px, "
           f"{c.compute_dtype}, {c.attention_impl} attention, grad_accum {config.grad_accum}")
  text = memory.markdown(rows, title=title, command=command, chips=chips)
  print(text)
  if args.markdown:
    report.write_text(args.markdown, text + "\n")
  if args.json:
    report.write_text(args.json, json.dumps({"command": command, "title": title,
                                             "chips_gib": dict(chips), "rows": rows}, indent=1))
  return 0


def _positive_ints(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise ConfigError(f"{flag}={text!r}: comma-separated counts ≥ 1")
  return values


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  log = lambda message: print(f"{PROG}: {message}", file=sys.stderr, flush=True)
  command = " ".join([PROG] + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
  for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
    if path is not None:  # before any case runs: they are rewritten after each one
      files.require_local(path, flag)
      if os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a folder; name a file")
      files.check_output_dir(os.path.dirname(os.path.abspath(path)), f"folder of {flag}")
  if args.memory:
    return _memory(args, command, log)
  return _side_by_side(args, command, log)


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
