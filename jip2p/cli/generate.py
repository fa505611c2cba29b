"""`jip2p-generate`: InstructPix2Pix prompts JSONL → CLIP-filtered paired images as TFRecords.

  jip2p-generate --config configs/generate_sd15.py:model=/models/sd15,clip=/models/ViT-L-14.pt \\
      --prompts prompts.jsonl --out DIR [--partition k --num-partitions n]
  jip2p-generate --config configs/generate_sdxl.py:model=/models/sdxl,clip=/models/ViT-L-14.pt \\
      --prompts prompts.jsonl --out DIR
  jip2p-generate --config ... --show-attention "a photo of a cat" --out DIR

The model is a Stable Diffusion 1.x/2.x or SDXL text-to-image folder (SDXL: both text encoders,
the pooled text and the micro-conditioning of a generated image, (H, W, 0, 0, H, W)).

Prompts go to partition ``line mod (num_partitions·process_count)``; each partition writes its
own dataset directory (``DIR/part-KKKKK-of-NNNNN`` when there is more than one). Rerunning the
same command after a crash resumes: finished prompts are skipped, nothing is written twice.
With ``config.mode = "p2p"`` every prompt uses ``config.p2p``'s Prompt-to-Prompt options, or the
line's own ``"p2p"`` object over them (bad objects skip the line, counted by line number). Each
batch of candidates is sharded over this host's devices (batch_size a multiple of their count).
``--show-attention PROMPT`` saves one heat map per token of PROMPT (and the image) under
OUT/attention. This process runs JAX and TensorFlow; the CLIP model runs in the torch sidecar.

Checked before any work, each with one line and exit status 2, nothing written: the config, the
model folder, the output folder (writable; a dataset there must be this tool's), the prompts file
(UTF-8, at least one usable line for this partition), the CLIP weights. A run in which no
candidate passes the filter also exits 2, its dataset left incomplete (no split) beside the scores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from jip2p.cli import run
from jip2p.errors import ConfigError, InputError

PROG = "jip2p-generate"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True,
                      help="a configs/generate_*.py file, with an optional ':arg' for get_config")
  parser.add_argument("--prompts", help="JSONL with input (or caption), edit, output per line, "
                                          "and optionally p2p (an object of P2P options)")
  parser.add_argument("--out", required=True, help="output directory (local or gs://)")
  parser.add_argument("--partition", type=int, default=0, help="this job's partition k")
  parser.add_argument("--num-partitions", type=int, default=1, help="n independent jobs")
  parser.add_argument("--show-attention", metavar="PROMPT",
                      help="only save per-token cross-attention heat maps of PROMPT (one PNG "
                           "per token, bos and eos included, plus image.png and attention.png) "
                           "under OUT/attention and exit")
  args = parser.parse_args(argv)
  if args.show_attention is None and not args.prompts:
    parser.error("--prompts is required (unless --show-attention)")
  return args


def _load_pipeline(c):
  import jax.numpy as jnp

  from jip2p import checkpoints
  return checkpoints.load_pipeline(c.model, dtype=getattr(jnp, c.compute_dtype),
                                   vae=c.vae or None)


def _read_prompts(path: str, model: str, options, index: int, total: int) -> list:
  """The usable prompts of partition ``index`` of ``total`` (their report on stderr); a file or
  partition without any is an error, found before any work."""
  from jip2p import files
  from jip2p.p2p import dataset
  from jip2p.tokenizer import load_tokenizer
  prompts, report = dataset.read_prompts(files.read_lines(path, "prompts file"),
                                         load_tokenizer(model),
                                         p2p=options.p2p if options.mode == "p2p" else None)
  print(f"{PROG}: prompts: {report.summary()}", file=sys.stderr, flush=True)
  if not prompts:
    raise InputError(f"{path}: no usable prompt ({report.summary()})")
  mine = dataset.partition(prompts, index, total)
  if not mine:
    raise ConfigError(f"partition {index} of {total} gets none of the {len(prompts)} usable "
                      f"prompts (line number mod {total}); use fewer partitions")
  return mine


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  from jip2p import files
  from jip2p.p2p import generation_config
  from jip2p.train import config as config_lib
  c = config_lib.load(args.config)
  generation_config.validate(c, scoring=args.show_attention is None)
  if args.show_attention is not None:
    from jip2p.p2p import sampling
    files.require_local(args.out, "--out (with --show-attention)")
    out = os.path.join(args.out, "attention")
    files.check_output_dir(out)
    paths = sampling.show_attention(_load_pipeline(c), args.show_attention, out, seed=c.seed,
                                    steps=c.show_attention_steps, height=c.height, width=c.width)
    print(f"wrote {len(paths)} images to {out}")
    return 0

  import jax
  from tqdm import tqdm

  from jip2p.data.writer import DatasetWriter
  from jip2p.p2p import dataset, sampling
  from jip2p.sidecar import ClipScorer

  options = generation_config.from_config(c)
  total = args.num_partitions * jax.process_count()
  index = args.partition * jax.process_count() + jax.process_index()
  if not 0 <= args.partition < args.num_partitions:
    raise ConfigError(f"--partition {args.partition} must be in [0, {args.num_partitions})")
  out = args.out if total == 1 else os.path.join(args.out, f"part-{index:05d}-of-{total:05d}")
  files.check_output_dir(out)
  dataset.check_resumable(out)
  prompts = _read_prompts(args.prompts, c.model, options, index, total)
  devices = jax.local_device_count()
  if options.batch_size % devices:
    print(f"{PROG}: batch_size {options.batch_size} is not a multiple of the {devices} devices: "
          f"each batch runs on {math.gcd(options.batch_size, devices)} of them",
          file=sys.stderr, flush=True)

  # The sidecar first: CLIP weights that do not load or a sidecar that cannot start fail before
  # any work.
  scorer = ClipScorer(c.clip.weights, model=c.clip.model, config=c.clip.config or None,
                      device=c.clip.device, precision=c.clip.precision,
                      batch_size=c.clip.batch_size, timeout=c.clip.timeout,
                      start_timeout=c.clip.start_timeout)
  with scorer:
    generator = sampling.PairGenerator(_load_pipeline(c), steps=c.steps, height=c.height,
                                       width=c.width)
    metadata = {"generator": PROG, "config": c.to_dict(), "prompts": os.path.abspath(args.prompts),
                "partition": index, "num_partitions": total}
    writer = DatasetWriter(out, name=c.output.name,
                           examples_per_shard=c.output.examples_per_shard, metadata=metadata)
    throughput = dataset.Throughput()
    with writer, tqdm(total=len(prompts), desc=PROG, unit="prompt", file=sys.stderr) as bar:
      def progress(report):
        bar.update(1)
        bar.set_postfix(throughput.postfix(report), refresh=False)

      first, _ = dataset.resume_point(writer.cursor(options.split))
      stored = writer.committed(options.split)
      bar.update(sum(p.index < first for p in prompts))
      report = dataset.generate_dataset(generator, scorer, prompts, writer, options,
                                        progress=progress)
      if not stored + report.written:
        # Left incomplete (no split), so that training cannot take it for a finished dataset.
        raise InputError(f"no candidate of the {report.prompts} prompts passed the CLIP filter "
                         f"({c.filter.to_dict()}); every score is in "
                         f"{out}/{dataset.SCORES_FILE}: lower config.filter's thresholds and "
                         "run again")
  rate = report.passed / report.candidates if report.candidates else 0.0
  resumed = (f", resumed at prompt line {report.resumed_after + 1}"
             if report.resumed_after is not None else "")
  print(f"{PROG}: {report.prompts} prompts, {report.candidates} candidates, pass rate "
        f"{rate:.1%}, {report.written} records written{resumed}")
  print(f"dataset: {out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
