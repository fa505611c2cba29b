"""``jip2p-train``: train InstructPix2Pix from an ML Collections config.

  jip2p-train --config=configs/ip2p_sd15.py:init=/models/sd15,data=/data/ip2p \\
      --config.optimizer.lr=5e-5 --workdir=/runs/ip2p
  jip2p-train --config=configs/tiny.py --show_config     # the config's keys and values; no run

Running it again with the same work directory resumes from the latest checkpoint. On several
hosts every host runs the same command (see launch/README.md); `--coordinator_address`,
`--num_processes` and `--process_id` are only needed where JAX cannot detect the cluster.
"""

from __future__ import annotations

import difflib
import glob
import os
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jip2p import runtime
from jip2p.cli import run
from jip2p.errors import ConfigError
from jip2p.train import config as config_lib
from jip2p.train import distributed, loop

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
CONFIG_HELP = ("A configs/*.py file, with an optional ':key=value,…' argument for its "
               "get_config; --config.KEY=VALUE sets one key (KEY as --show_config lists it).")


def _define_flags(fv: flags.FlagValues) -> None:
  """Every flag but --config (a string in --help, the loaded config otherwise)."""
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go (local or gs://).",
                      flag_values=fv)
  flags.DEFINE_bool("show_config", False, "Print the config's keys and values (after the "
                    "--config.KEY overrides) and exit without training.", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Start jax.distributed: auto = when a coordinator is given or a cluster (TPU "
                    "pod, SLURM, Open MPI) is detected.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: "
                      "$JAX_COORDINATOR_ADDRESS).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes (default: "
                       "$JAX_NUM_PROCESSES).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's id (default: $JAX_PROCESS_ID).",
                       flag_values=fv)


def _training_configs() -> list[tuple[str, str]]:
  """(file name, first docstring line) of each training config in `CONFIGS`."""
  out = []
  for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
    with open(path) as f:
      text = f.read()
    if "config_lib.base_config()" in text:  # not the generation configs
      first = text.lstrip("rR").lstrip('"').splitlines()[0].strip()
      out.append((os.path.basename(path), first))
  return out


def help_text(prog: str) -> str:
  """--help: usage, the flags, the configs shipped in configs/ and how to see a config's keys."""
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, CONFIG_HELP, flag_values=fv)
  _define_flags(fv)
  flag_lines = [line for line in fv.get_help(include_special_flags=False).splitlines()
                if line.startswith(" ")]  # without absl's per-module headers
  configs = "\n".join(f"  {name}: {doc}" for name, doc in _training_configs())
  return (f"usage: {prog} --config=FILE[:ARGS] [--config.KEY=VALUE …] --workdir=DIR\n\n"
          + __doc__.split("\n", 1)[1].strip("\n") + "\n\nflags:\n" + "\n".join(flag_lines)
          + f"\n\ntraining configs in {CONFIGS}:\n" + (configs or "  (none)")
          + f"\n\nA config's keys and values: {prog} --config=FILE[:ARGS] --show_config (every "
          "key, its meaning and its default: base_config in jip2p/train/config.py).")


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
  """(the --config value, the other arguments)."""
  spec, rest, i = None, [], 0
  while i < len(args):
    if args[i] == "--config" and i + 1 < len(args):
      spec, i = args[i + 1], i + 2
      continue
    if args[i].startswith("--config="):
      spec = args[i].partition("=")[2]
    else:
      rest.append(args[i])
    i += 1
  return spec, rest


def _check_override_keys(config: ml_collections.ConfigDict, args: list[str]) -> None:
  """A --config.KEY naming no key of the config → one line with the nearest key."""
  for arg in args:
    if not arg.startswith("--config."):
      continue
    path = arg[2:].partition("=")[0]
    node = config
    for part in path.split(".")[1:]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        keys = list(node) if isinstance(node, ml_collections.ConfigDict) else []
        near = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"--{path}: the config has no key {part!r}{hint} "
                          "(--show_config lists the keys)")
      node = node[part]


def parse(argv: Sequence[str] | None, prog: str) -> flags.FlagValues:
  """Fresh absl flags for each call (so `main` can run twice in one process); their errors
  (unknown flags or config keys, a missing or failing config file, a bad value) as one-line
  `ConfigError`s."""
  spec, rest = _split_config(list(sys.argv[1:] if argv is None else argv))
  if spec is None:
    raise ConfigError("--config is required, e.g. --config=configs/tiny.py (--help lists the "
                      "configs)")
  config = config_lib.load(spec)
  _check_override_keys(config, rest)
  fv = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, flag_values=fv,
                                    lock_config=True, sys_argv=[prog] + rest)
    _define_flags(fv)
    fv([prog] + rest)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    raise ConfigError(" ".join(str(e).split())) from None
  return fv


def _main(argv: Sequence[str] | None) -> int:
  args = list(sys.argv[1:] if argv is None else argv)
  if {"-h", "--help", "--helpfull"} & set(args):
    print(help_text("jip2p-train"))
    return 0
  fv = parse(args, "jip2p-train")
  if fv.show_config:
    print(fv.config)
    return 0
  if not fv.workdir:
    raise ConfigError("--workdir is required")
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
  # Before anything touches a device: XLA reads its flags once, when its backend starts.
  runtime.configure()
  distributed.initialize(fv.distributed, coordinator_address=fv.coordinator_address,
                         num_processes=fv.num_processes, process_id=fv.process_id)
  loop.train(fv.config, fv.workdir)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, "jip2p-train")


if __name__ == "__main__":
  sys.exit(main())
