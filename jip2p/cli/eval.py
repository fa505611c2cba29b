"""``jip2p-eval``: measure an edit model the way the papers do, over guidance sweeps.

    jip2p-eval --model DIR --set world --output eval/world                      # the demo world
    jip2p-eval --model DIR --set emu_edit --data emu_edit_test_set/ --output eval/emu \\
        --clip-weights ViT-L-14.pt --dino-weights dino_deitsmall16_pretrain.pth
    jip2p-eval --model DIR --set tfrecords --data data/ip2p --split validation --sweep image \\
        --clip-weights ViT-L-14.pt --output eval/tradeoff                      # the paper's plot
    jip2p-eval ... --sweep image --sdedit-model SD15_DIR     # + SDEdit's curve (the paper's Fig. 8)
    jip2p-eval --model DIR --set magicbrush --data magicbrush/dev --mode multi \\
        --captions global_descriptions.json --clip-weights ... --dino-weights ... --output eval/mb

Writes to the output folder: ``results.jsonl`` (one line per edit, every metric that applies),
``summary.csv`` (per setting and per group — Emu Edit task, world family — the mean, its
confidence interval and n of each metric), ``tradeoff.png`` / ``tradeoff.svg`` (directional
against image CLIP similarity, one labelled point per setting) when CLIP is given, and
``run.json``. ``--sdedit-model`` (a text-to-image folder, e.g. the one the editor was trained
from) adds the paper's baseline: SDEdit at --text-guidance, one setting per --strength-values,
prompted with each edit's output caption (a set without captions is refused), on the same seeds
and drawn as one more line of the plot. Rerun the same command to resume an interrupted run; add settings to extend a sweep.
CLIP and DINO run in the sidecar process (PyTorch); without ``--clip-weights`` / ``--dino-weights``
their metrics are skipped. The options, the output folder (writable; a run there must be this
one), the set's files, the model and the metric weights are checked before the first edit (one
line, exit status 2); an image that does not decode stops the run naming it, and a rerun after
fixing it resumes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import sys
from collections.abc import Sequence

from jip2p import edit, files, storage
from jip2p.cli import VAE_HELP, run
from jip2p.errors import ConfigError
from jip2p.eval import sets, sweep
from jip2p.eval.runner import RunConfig, check_run_info, check_sdedit_prompts, evaluate
from jip2p.models.attention import IMPLEMENTATIONS
from jip2p.sidecar.server import DEFAULT_MODEL, PRECISIONS

PROG = "jip2p-eval"
TABLE_METRICS = ("clip_dir", "clip_img", "clip_out", "l1", "dino", "l1_gt", "l2_gt", "clip_i",
                 "dino_gt", "clip_t", "world_success")


def _floats(text: str) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
  return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--model", required=True, metavar="DIR", help="InstructPix2Pix model folder")
  p.add_argument("--vae", metavar="DIR", default=None,
                 help=VAE_HELP + " (for --model and --sdedit-model)")
  p.add_argument("--output", required=True, metavar="DIR",
                 help="results folder (resumable; local or gs://)")
  g = p.add_argument_group("evaluation set")
  g.add_argument("--set", required=True, choices=sets.SETS)
  g.add_argument("--data", nargs="+", metavar="PATH",
                 help="TFRecord folder(s) or parquet files/folders (not for --set world)")
  g.add_argument("--split", default="validation", help="tfrecords: the split to evaluate")
  g.add_argument("--mode", choices=sets.MAGICBRUSH_MODES, default="single",
                 help="magicbrush: each turn from its true source, or sessions from own outputs")
  g.add_argument("--captions", metavar="JSON", help="magicbrush: global_descriptions.json")
  g.add_argument("--limit", type=int, help="evaluate the first N sessions only")
  g.add_argument("--world-n", type=int, default=64, help="world: examples")
  g.add_argument("--world-seed", type=int, default=1, help="world: dataset seed (not training's)")
  g.add_argument("--world-size", type=int,
                 help="world: image size in pixels (default: the model's own size, e.g. 32 for "
                      "the shipped data/synthetic-ip2p)")
  g = p.add_argument_group("editing")
  g.add_argument("--steps", type=int, default=100)
  g.add_argument("--resolution", type=int,
                 help="editor resize rule's long side, a multiple of the model's size step (VAE "
                      "downscale × UNet downsampling: 64 for Stable Diffusion, 4 for the shipped "
                      "world model); default: the world's image size, else the model's own size "
                      "(512 for Stable Diffusion)")
  g.add_argument("--seed", type=int, default=0, help="edit f of the set uses seed + f")
  g.add_argument("--batch-size", type=int, default=1, help="edits per compiled call")
  g.add_argument("--sampler", choices=edit.SAMPLERS, default="euler_ancestral")
  g.add_argument("--schedule", choices=edit.SCHEDULES, default="discrete")
  g.add_argument("--dtype", choices=sorted(edit.DTYPES), default="float32")
  g.add_argument("--attention-impl", choices=IMPLEMENTATIONS, default="xla")
  g.add_argument("--threshold", type=float,
                 help="multi-turn: Emu Edit's sequential-edit threshold (off by default)")
  g.add_argument("--threshold-radius", type=int, default=2, help="its low-pass box radius")
  g = p.add_argument_group("guidance")
  g.add_argument("--sweep", choices=sweep.SWEEPS, default="none",
                 help="image: s_T fixed, s_I swept (the paper's plot); text: the reverse; "
                      "grid: every s_T × s_I, a line per s_T")
  g.add_argument("--text-guidance", type=float, default=7.5, help="s_T (fixed one)")
  g.add_argument("--image-guidance", type=float, default=1.5, help="s_I (fixed one)")
  g.add_argument("--image-values", type=_floats, default=list(sweep.IMAGE_VALUES),
                 help="s_I values of the image and grid sweeps, comma-separated")
  g.add_argument("--text-values", type=_floats, default=list(sweep.TEXT_VALUES),
                 help="s_T values of the text and grid sweeps, comma-separated")
  g.add_argument("--sdedit-model", metavar="DIR",
                 help="a text-to-image model folder: adds SDEdit's series (the paper's baseline)")
  g.add_argument("--strength-values", type=_floats, default=list(sweep.STRENGTH_VALUES),
                 help="SDEdit strengths, comma-separated, each in (0, 1]")
  g = p.add_argument_group("metrics (CLIP and DINO run in the PyTorch sidecar)")
  g.add_argument("--clip-weights", metavar="FILE", help="local CLIP weights (ViT-L/14 default)")
  g.add_argument("--clip-model", default=DEFAULT_MODEL, help="open_clip architecture name")
  g.add_argument("--clip-config", metavar="JSON", help="open_clip config of a custom CLIP")
  g.add_argument("--dino-weights", metavar="FILE", help="local DINO ViT-S/16 weights")
  g.add_argument("--dino-config", metavar="JSON", help="timm ViT arguments of another DINO")
  g.add_argument("--sidecar-device", default="auto", help="torch device of the sidecar")
  g.add_argument("--sidecar-precision", choices=PRECISIONS, default="fp32")
  g.add_argument("--sidecar-python", metavar="EXE",
                 help="a Python with torch for the sidecar (default: this one)")
  g.add_argument("--confidence", type=float, default=0.95, help="confidence interval level")
  p.add_argument("--plot-ci", action="store_true",
                 help="draw the confidence intervals on the trade-off plot")
  p.add_argument("--save-images", action="store_true", help="also write every edit as PNG")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def load_set(args: argparse.Namespace) -> sets.EvalSet:
  if args.set == "world":
    if args.data:
      raise ConfigError("--set world is generated; drop --data")
    return sets.world_set(args.world_n, seed=args.world_seed, size=args.world_size,
                          limit=args.limit)
  if not args.data:
    raise ConfigError(f"--set {args.set} needs --data")
  if args.set == "tfrecords":
    return sets.tfrecord_set(args.data, args.split, limit=args.limit)
  if args.set == "emu_edit":
    return sets.emu_edit_set(args.data, limit=args.limit)
  return sets.magicbrush_set(args.data, args.mode, captions=args.captions, limit=args.limit)


def _scorer(args: argparse.Namespace):
  """The sidecar (not started) for the metrics asked for, or None."""
  if args.clip_weights is None and args.dino_weights is None:
    return None
  from jip2p.sidecar import ClipScorer
  command = [args.sidecar_python, "-m", "jip2p.sidecar.server"] if args.sidecar_python else None
  return ClipScorer(args.clip_weights, model=args.clip_model, config=args.clip_config,
                    device=args.sidecar_device, precision=args.sidecar_precision,
                    dino_weights=args.dino_weights, dino_config=args.dino_config,
                    command=command)


def print_summary(table: list[dict], file=None) -> None:
  """The summary table as aligned text (stdout by default): mean ± half the interval."""
  file = file or sys.stdout
  present = [m for m in TABLE_METRICS if table and m in table[0]]
  header = ["setting", "group", "n"] + present
  lines = [header]
  for e in table:
    cells = [e["setting"], e["group"], str(e["n"])]
    for m in present:
      mean, low, high = e[m], e[f"{m}_low"], e[f"{m}_high"]
      cells.append("n/a" if math.isnan(mean) else f"{mean:.4f}" if math.isnan(low)
                   else f"{mean:.4f}±{(high - low) / 2:.4f}")
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  for line in lines:
    print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip(), file=file)


def _absolute(path: str | None) -> str | None:
  return (path if storage.is_remote(path) else os.path.abspath(path)) if path else None


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  if not 0 < args.confidence < 1:
    raise ConfigError(f"--confidence must be in (0, 1), got {args.confidence}")
  if args.threshold is not None and not (args.set == "magicbrush" and args.mode == "multi"):
    raise ConfigError("--threshold applies to multi-turn sessions (--set magicbrush --mode multi)")
  # A named set's files are checked first; the world set is drawn at the model's size.
  eval_set = None if args.set == "world" else load_set(args)
  # The size rule and default sizes come from the model's config files (no weights read yet).
  multiple, native = edit.model_sizes(args.model)
  if args.sdedit_model is not None:
    sdedit_multiple, _ = edit.model_sizes(args.sdedit_model)
    multiple = max(multiple, sdedit_multiple)
  if args.world_size is None:
    args.world_size = native
  world_default = args.set == "world" and args.resolution is None  # the world's size, then
  resolution = (args.resolution if args.resolution is not None
                else args.world_size if args.set == "world" else native)
  edit.check_resolution(resolution, multiple, "--world-size" if world_default else "--resolution")
  config = RunConfig(steps=args.steps, resolution=resolution, seed=args.seed,
                     batch_size=args.batch_size, sampler=args.sampler, schedule=args.schedule,
                     threshold=args.threshold, threshold_radius=args.threshold_radius)
  config.validate()
  files.check_output_dir(args.output)
  settings = sweep.settings(args.sweep, text_guidance=args.text_guidance,
                            image_guidance=args.image_guidance, image_values=args.image_values,
                            text_values=args.text_values)
  if args.sdedit_model is not None:
    settings += sweep.sdedit_settings(args.strength_values, text_guidance=args.text_guidance)
  if eval_set is None:
    eval_set = load_set(args)
  print(f"{PROG}: {eval_set.name}: {len(eval_set.sessions)} sessions, {eval_set.num_turns} "
        f"edits × {len(settings)} settings", file=sys.stderr)
  # What a resumed run must share, checked before the sidecar and the model are loaded.
  facts = {"model": _absolute(args.model), "sdedit_model": _absolute(args.sdedit_model),
           "dtype": args.dtype,
           "clip_weights": _absolute(args.clip_weights),
           "clip_model": (_absolute(args.clip_config) or args.clip_model) if args.clip_weights
                         else None,
           "dino_weights": _absolute(args.dino_weights),
           "dino_config": _absolute(args.dino_config)}
  # A gs:// output folder is worked on in a local copy, stored back at the end (or on failure).
  with storage.working_copy(args.output) as out_dir:
    check_run_info(out_dir, eval_set, config, facts, write=False)
    if args.sdedit_model is not None:
      check_sdedit_prompts(eval_set)
    scorer = _scorer(args)
    closing = contextlib.closing(scorer) if scorer is not None else contextlib.nullcontext()
    # The sidecar loads its models while this process loads the editor; on the way out the pool
    # waits for a start in progress, then the sidecar is shut down.
    with closing, concurrent.futures.ThreadPoolExecutor(1) as pool:
      started = pool.submit(scorer.start) if scorer is not None else None
      editor = edit.Editor.from_pretrained(args.model, dtype=args.dtype,
                                           attention_impl=args.attention_impl, vae=args.vae)
      editor.check_method("ip2p")  # an InstructPix2Pix model, before any work
      sdedit_editor = None
      if args.sdedit_model is not None:
        sdedit_editor = edit.Editor.from_pretrained(args.sdedit_model, dtype=args.dtype,
                                                    attention_impl=args.attention_impl,
                                                    vae=args.vae)
        sdedit_editor.check_method("sdedit")
      if started is not None:
        started.result()
      rows = evaluate(editor, eval_set, settings, out_dir, config=config, scorer=scorer,
                      save_images=args.save_images, progress=not args.no_progress,
                      run_info=facts, sdedit_editor=sdedit_editor)
    table = sweep.summary_table(rows, settings,
                                group_key="group" if eval_set.group_name else None,
                                confidence=args.confidence)
    sweep.write_csv(table, os.path.join(out_dir, "summary.csv"))
    model = args.model.rstrip("/") if storage.is_remote(args.model) else os.path.abspath(args.model)
    title = f"{os.path.basename(model)} on {eval_set.name}"
    plotted = sweep.plot_tradeoff(table, [os.path.join(out_dir, f"tradeoff.{ext}")
                                          for ext in ("png", "svg")],
                                  title=title, error_bars=args.plot_ci)
  print_summary(table)
  csv_path = os.path.join(args.output, "summary.csv")
  plots = [os.path.join(args.output, f"tradeoff.{ext}") for ext in ("png", "svg")]
  print(f"{PROG}: wrote {csv_path}" + (f" and {', '.join(plots)}" if plotted else
                                       " (no plot: CLIP metrics need --clip-weights)"))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
