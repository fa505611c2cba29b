"""``jip2p-convert``: a single-file checkpoint (original CompVis layout) → diffusers-format folder.

  jip2p-convert instruct-pix2pix-00-22000.ckpt /models/ip2p
  jip2p-convert v1-5-pruned-emaonly.safetensors /models/sd15-ip2p --expand-conv-in 8
  jip2p-convert sd_xl_base_1.0.safetensors /models/sdxl-ip2p --expand-conv-in 8
  jip2p-convert --open-clip-config world-clip.json world-clip.safetensors /models/world-text

The last form converts an open_clip CLIP's text tower into text_encoder/ + tokenizer/ (what
``config.model.text_encoder`` of a training run names, as SD uses a CLIP's text tower).

This process imports torch (`jip2p.checkpoints.convert_single_file` runs it as a child process).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jip2p import files
from jip2p.checkpoints import convert
from jip2p.checkpoints.folders import SAVE_DTYPES, check_output_folder
from jip2p.checkpoints.presets import PRESETS
from jip2p.cli import run
from jip2p.errors import CheckpointError, ConfigError

PROG = "jip2p-convert"


def _main(argv: Sequence[str] | None) -> int:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="Convert a single-file Stable Diffusion / InstructPix2Pix checkpoint (original "
                  "CompVis layout, or SDXL's SGM layout; .ckpt or .safetensors) into a "
                  "diffusers-format folder that jip2p and diffusers load.",
      epilog="The paths are checked before the file is read; a path, file or weight that cannot "
             "be used ends the run with one line naming it and exit status 2. dst is written "
             "under a temporary name (.tmp-DST… beside it) and renamed when complete: a failed "
             "run leaves no dst, and running the same command again converts from the start "
             "(after a kill -9, delete the .tmp-DST… folder it left).")
  parser.add_argument("src", help="the .ckpt / .safetensors file")
  parser.add_argument("dst", help="output folder (diffusers format)")
  parser.add_argument("--open-clip-config", metavar="JSON", default=None,
                      help="src is an open_clip CLIP (its weights; JSON its model config): write "
                           "its text tower as dst/text_encoder/ + dst/tokenizer/, the frozen text "
                           "encoder a training run can use (config.model.text_encoder)")
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="architecture of the file (default: detected, sd15, sd21 or sdxl)")
  parser.add_argument("--no-ema", action="store_true",
                      help="take the raw weights where the file also has EMA ones (default: EMA)")
  parser.add_argument("--expand-conv-in", type=int, default=None, metavar="N",
                      help="grow the UNet's input conv to N channels (8 for InstructPix2Pix "
                           "training from a text-to-image model); new channels start at zero")
  parser.add_argument("--dtype", choices=SAVE_DTYPES, default="float32",
                      help="the stored weights' type; float16 halves the folder and loads back "
                           "as float32 (default: float32)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace dst if it is a diffusers pipeline folder (or empty)")
  args = parser.parse_args(argv)
  if args.open_clip_config is not None:
    if args.preset or args.no_ema or args.expand_conv_in is not None:
      raise ConfigError("--open-clip-config converts a text tower only: drop --preset, --no-ema "
                        "and --expand-conv-in")
    convert.check_source(args.src)
    files.require_local(args.dst, "dst (with --open-clip-config)")
    if not (args.overwrite and os.path.isdir(args.dst)):  # else save_text_encoder decides
      check_output_folder(args.dst)
    elif not os.access(os.path.dirname(os.path.abspath(args.dst)), os.W_OK | os.X_OK):
      raise CheckpointError(f"cannot replace {args.dst}: the folder it is in is not writable "
                            "(its replacement is written beside it)")
    encoder, tokenizer = convert.convert_open_clip_text(args.src, args.open_clip_config)
    convert.save_text_encoder(encoder, tokenizer, args.dst, overwrite=args.overwrite,
                              dtype=args.dtype)
    print(f"wrote {args.dst} (text_encoder/ with {encoder.config.num_hidden_layers} layers of "
          f"width {encoder.config.hidden_size}, tokenizer/; {args.dtype} weights)")
    return 0
  if args.expand_conv_in is not None and args.expand_conv_in < 1:
    raise ConfigError(f"--expand-conv-in={args.expand_conv_in}: must be a channel count ≥ 1")
  pipeline = convert.convert_file(args.src, args.dst, preset=args.preset,
                                  extract_ema=not args.no_ema, expand_conv_in=args.expand_conv_in,
                                  overwrite=args.overwrite, dtype=args.dtype)
  print(f"wrote {args.dst} (UNet with {pipeline.unet.config.in_channels} input channels, "
        f"{args.dtype} weights)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
