"""``jip2p-export``: a training run's weights as a diffusers-format InstructPix2Pix folder.

  jip2p-export --workdir=/runs/ip2p --out=/models/my-ip2p            # EMA weights, latest step
  jip2p-export --workdir=gs://b/run --out=/models/raw --weights=raw --step=5000
  jip2p-export --workdir=/runs/ip2p --out=/models/my-ip2p-fp16 --dtype=float16   # half the size

The folder loads in jip2p-edit and in diffusers' StableDiffusionInstructPix2PixPipeline. The
frozen VAE and text encoder come from the model the run started from (its config.model.init).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jip2p.cli import run


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(prog="jip2p-export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the jip2p-train work directory")
  parser.add_argument("--out", required=True, help="the diffusers folder to write")
  parser.add_argument("--weights", choices=("ema", "raw"), default="ema",
                      help="the EMA weights or the raw (optimised) ones (default: ema)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                      help="the stored weights' type; float16 halves the folder and loads "
                           "back as float32 (default: float32)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  from jip2p.train import exporting  # JAX is imported once the arguments are known to be good.
  step = exporting.export_from_workdir(args.workdir, args.out, weights=args.weights,
                                       step=args.step, overwrite=args.overwrite, dtype=args.dtype)
  print(f"exported {args.weights} weights of step {step} to {args.out} ({args.dtype})")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, "jip2p-export")


if __name__ == "__main__":
  sys.exit(main())
