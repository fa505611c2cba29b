"""The PyTorch baseline of docs/design.md §3: diffusers' InstructPix2Pix on one GPU, SD 1.5 shapes.

  python bench/baseline.py train edit          # the baseline's figures (the default)
  python bench/baseline.py compile             # the full step with the UNet compiled

Groups of figures:
  train    the train step of diffusers' train_instruct_pix2pix.py, eager, no EMA: from pixels
           at 256 px, batch 32 / 64 / 128, and 512 px, batch 32; from precomputed latents and
           text at 256 px, batch 64; each eager record also carries the UNet's training FLOPs
           per image at its resolution (``torch_unet_flops_per_image``, FlopCounterMode)
  compile  the full step at 256 px, batch 64, with the UNet under torch.compile
  edit     StableDiffusionInstructPix2PixPipeline, 512 px, 20 and 100 Euler-a steps, float16

Each figure is one case of `jip2p.bench.torch_side` (the PyTorch side of `jip2p-bench`, where the
step, the pipeline call, the timing and the FLOP count are defined) in its own process, with EMA
off: the baseline's step. Random weights at the preset's shapes. Prints the side's ``BENCH {json}``
line per figure; a figure whose process fails (e.g. out of memory) is named at the end, and the
exit status is 1. Needs jip2p with torch, diffusers and transformers (``pip install -e
".[torch]"``) and, for figures that mean anything, a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

GROUPS = {
    "train": [["--case", c] for c in ("train_full_256_b32", "train_full_256_b64",
                                      "train_full_256_b128", "train_unet_256_b64",
                                      "train_full_512_b32")],
    "compile": [["--case", "train_full_256_b64", "--variant", "compile"]],
    "edit": [["--case", "edit_512_s20_b1"], ["--case", "edit_512_s100_b1"]],
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("groups", nargs="*", metavar="GROUP",
                 help=f"any of {', '.join(GROUPS)} (default: train edit)")
  p.add_argument("--preset", default="sd15", help="model shapes (jip2p.checkpoints.PRESETS)")
  p.add_argument("--warmup", type=int, default=None, help="untimed runs (default: the case's)")
  p.add_argument("--iters", type=int, default=None, help="timed runs (default: the case's)")
  args = p.parse_args(argv)
  args.groups = args.groups or ["train", "edit"]
  unknown = [g for g in args.groups if g not in GROUPS]
  if unknown:
    p.error(f"unknown group(s) {', '.join(unknown)}: choose from {', '.join(GROUPS)}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  from jip2p.checkpoints import preset_configs
  from jip2p.errors import ConfigError
  runs = [f"--{name}={value}" for name, value in (("warmup", args.warmup), ("iters", args.iters))
          if value is not None]
  failed = []
  with tempfile.TemporaryDirectory(prefix="torch-baseline-") as tmp:
    configs = os.path.join(tmp, "configs.json")
    try:
      shapes = preset_configs(args.preset, unet_in_channels=8)
    except ConfigError as e:
      print(f"baseline: {e}", file=sys.stderr)
      return 2
    with open(configs, "w") as f:
      json.dump(shapes, f)
    for group in args.groups:
      for figure in GROUPS[group]:
        command = [sys.executable, "-m", "jip2p.bench.torch_side", *figure, "--configs", configs]
        if subprocess.run(command + runs + ["--no-ema"]).returncode:
          failed.append(" ".join(figure))
  for figure in failed:
    print(f"baseline: {figure} failed (its output is above)", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
