"""`jip2p-clip-filter`: rescore a TFRecord triplet dataset with the CLIP sidecar, keep a subset.

  jip2p-clip-filter DATA_DIR... --out DIR --clip-weights ViT-L-14.pt \\
      [--min-sim-image 0.75 --min-sim-direction 0.2 --min-sim-0 0.2 --min-sim-1 0.2 --top-k 4]

Records are grouped by prompt (consecutive records of one source and ``prompt_index``; a record
without a prompt index is its own group); each group keeps its pairs that pass the thresholds,
best ``sim_direction`` first, at most ``top-k``. The kept records are written with their new
scores to ``--out``; every record's scores go to ``OUT/scores.jsonl`` (``index`` is its position
in the input), so other thresholds can be tried later. Rerunning after a crash resumes.

Checked before the sidecar starts, each with one line and exit status 2, nothing written: the
input datasets (they exist and hold the split), the output folder (writable, not an input; a
dataset there must be this tool's), then the CLIP weights. An image that does not decode stops
the run naming its record; a run that keeps no record exits 2, its dataset left incomplete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from jip2p.cli import run
from jip2p.errors import ConfigError, InputError

PROG = "jip2p-clip-filter"
SCORES_FILE = "scores.jsonl"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument("data_dirs", nargs="+", metavar="DATA_DIR", help="jip2p datasets")
  parser.add_argument("--out", required=True, help="output dataset directory")
  parser.add_argument("--split", default="train")
  parser.add_argument("--clip-weights", required=True, help="local CLIP weights file")
  parser.add_argument("--clip-model", default="ViT-L-14-quickgelu",
                      help="open_clip architecture")
  parser.add_argument("--clip-config", default=None, help="open_clip model config JSON")
  parser.add_argument("--device", default="auto")
  parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
  parser.add_argument("--batch-size", type=int, default=32, help="pairs per sidecar request")
  parser.add_argument("--min-sim-image", type=float, default=0.75)
  parser.add_argument("--min-sim-direction", type=float, default=0.2)
  parser.add_argument("--min-sim-0", type=float, default=0.2)
  parser.add_argument("--min-sim-1", type=float, default=0.2)
  parser.add_argument("--top-k", type=int, default=4, help="per prompt; 0 keeps all that pass")
  parser.add_argument("--examples-per-shard", type=int, default=1000)
  return parser.parse_args(argv)


def _groups(triplets):
  """(first index, [triplets]) runs of one prompt, in input order."""
  group, key, first = [], None, 0
  for index, t in enumerate(triplets):
    this = (t.source, t.prompt_index) if t.prompt_index >= 0 else ("", -1 - index)
    if group and this != key:
      yield first, group
      group = []
    if not group:
      key, first = this, index
    group.append(t)
  if group:
    yield first, group


def _score(scorer, triplets, indices) -> dict[str, np.ndarray]:
  """Scores of every triplet (``indices``: their input positions, to name a bad image), requests
  of one image size at a time."""
  from jip2p.eval.sets import decode
  from jip2p.sidecar import SCORE_KEYS
  pairs = [(decode(t.input_image, f"input record {i} input_image"),
            decode(t.edited_image, f"input record {i} edited_image"))
           for i, t in zip(indices, triplets)]
  out = {k: np.zeros(len(triplets), np.float32) for k in SCORE_KEYS}
  by_shape = {}
  for n, (a, b) in enumerate(pairs):
    by_shape.setdefault((a.shape, b.shape), []).append(n)
  for group in by_shape.values():
    scores = scorer.score(np.stack([pairs[n][0] for n in group]),
                          np.stack([pairs[n][1] for n in group]),
                          [triplets[n].input_caption for n in group],
                          [triplets[n].edited_caption for n in group])
    for k in SCORE_KEYS:
      out[k][group] = scores[k]
  return out


def _check(args: argparse.Namespace) -> None:
  """What can be wrong before the sidecar starts and before the output folder is made."""
  from jip2p import files
  from jip2p.data.reader import list_shards
  from jip2p.p2p.dataset import check_resumable
  for name in ("batch_size", "examples_per_shard"):
    if getattr(args, name) < 1:
      raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
  if any(os.path.abspath(d) == os.path.abspath(args.out) for d in args.data_dirs):
    raise ConfigError(f"--out {args.out} is one of the input datasets; choose another folder")
  files.check_output_dir(args.out)
  list_shards(args.data_dirs, args.split)  # the inputs exist and hold records of the split
  check_resumable(args.out, "filter", PROG)


def _filter(args, config, scorer, writer) -> tuple[int, int]:
  """Scores and filters the input into ``writer``, resuming; (records written, kept this run)."""
  from jip2p.data.reader import iter_triplets
  from jip2p.p2p import filter as filter_lib
  from jip2p.p2p.dataset import reopen_scores, resume_point
  from jip2p.sidecar import SCORE_KEYS
  written = kept_total = 0
  # The cursor names the input index of a group's first record.
  first, skip = resume_point(writer.cursor(args.split))
  pending = []

  def flush():
    nonlocal written, kept_total
    flat = [(start + n, t) for start, group in pending for n, t in enumerate(group)]
    if not flat:
      return
    scores = _score(scorer, [t for _, t in flat], [i for i, _ in flat])
    offset = 0
    for start, group in pending:
      table = {k: v[offset:offset + len(group)] for k, v in scores.items()}
      offset += len(group)
      kept = filter_lib.select(table, config)
      for n, t in enumerate(group):
        row = {"index": start + n, "prompt_index": t.prompt_index,
               "source_id": t.source_id, **{k: float(table[k][n]) for k in SCORE_KEYS},
               "kept": bool(n in kept)}
        scores_file.write(json.dumps(row) + "\n")
      scores_file.flush()  # before the group's records can be committed
      for j, n in enumerate(kept):
        kept_total += 1
        if start == first and j < skip:
          continue
        t = dataclasses.replace(
            group[n], clip_sim_0=float(table["sim_0"][n]), clip_sim_1=float(table["sim_1"][n]),
            clip_sim_direction=float(table["sim_direction"][n]),
            clip_sim_image=float(table["sim_image"][n]))
        writer.write(t, args.split, cursor={"prompt": start, "written": j + 1, "of": len(kept)})
        written += 1
    pending.clear()

  with reopen_scores(f"{writer.directory}/{SCORES_FILE}", first, "index") as scores_file:
    for start, group in _groups(iter_triplets(args.data_dirs, args.split)):
      if start < first:
        continue
      pending.append((start, group))
      if sum(len(g) for _, g in pending) >= args.batch_size:
        flush()
    flush()
  return written, kept_total


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  from jip2p.data.writer import DatasetWriter
  from jip2p.p2p import filter as filter_lib
  from jip2p.sidecar import ClipScorer

  config = filter_lib.FilterConfig(
      min_sim_image=args.min_sim_image, min_sim_direction=args.min_sim_direction,
      min_sim_0=args.min_sim_0, min_sim_1=args.min_sim_1, top_k=args.top_k or None)
  _check(args)
  scorer = ClipScorer(args.clip_weights, model=args.clip_model, config=args.clip_config,
                      device=args.device, precision=args.precision, batch_size=args.batch_size)
  metadata = {"filter": PROG, "inputs": list(args.data_dirs),
              "thresholds": dataclasses.asdict(config), "clip_weights": args.clip_weights}
  with scorer, DatasetWriter(args.out, examples_per_shard=args.examples_per_shard,
                             metadata=metadata) as writer:
    stored = writer.committed(args.split)
    written, kept_total = _filter(args, config, scorer, writer)
    if not stored + written:
      # Left incomplete (no split), so that training cannot take it for a finished dataset.
      raise InputError(f"no record passed the thresholds; every score is in "
                       f"{args.out}/{SCORES_FILE}: choose lower ones and run again")
  print(f"{PROG}: {written} records written ({kept_total} kept this run); scores in "
        f"{args.out}/{SCORES_FILE}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
