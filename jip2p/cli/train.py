"""``jip2p-train``: train InstructPix2Pix from an ML Collections config.

  jip2p-train --config=configs/ip2p_sd15.py:init=/models/sd15,data=/data/ip2p \\
      --config.optimizer.lr=5e-5 --workdir=/runs/ip2p

Running it again with the same work directory resumes from the latest checkpoint. On several
hosts every host runs the same command (see launch/README.md); `--coordinator_address`,
`--num_processes` and `--process_id` are only needed where JAX cannot detect the cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jip2p import runtime
from jip2p.cli import run
from jip2p.errors import ConfigError
from jip2p.train import distributed, loop


def parse(argv: Sequence[str] | None, prog: str) -> flags.FlagValues:
  """Fresh absl flags for each call (so `main` can run twice in one process); their errors
  (unknown flags, unknown config keys, a config file that raises…) as `ConfigError`."""
  args = [prog] + list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "A configs/*.py file, with an optional ':arg' for its get_config.",
      lock_config=True, flag_values=fv, sys_argv=args)
  flags.DEFINE_string("workdir", None, "Where checkpoints, logs and exports go (local or gs://).",
                      flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Start jax.distributed: auto = when a coordinator is given or a cluster (TPU "
                    "pod, SLURM, Open MPI) is detected.", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: "
                      "$JAX_COORDINATOR_ADDRESS).", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes (default: "
                       "$JAX_NUM_PROCESSES).", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's id (default: $JAX_PROCESS_ID).",
                       flag_values=fv)
  try:
    fv(args)
  except ConfigError:
    raise
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    raise ConfigError(str(e)) from None
  return fv


def _main(argv: Sequence[str] | None) -> int:
  fv = parse(argv, "jip2p-train")
  if fv.config is None:
    raise ConfigError("--config is required, e.g. --config=configs/tiny.py")
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
