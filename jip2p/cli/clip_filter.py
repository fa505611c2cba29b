"""`jip2p-clip-filter`: rescore a TFRecord triplet dataset with the CLIP sidecar, keep a subset.

  jip2p-clip-filter DATA_DIR... --out DIR --clip-weights ViT-L-14.pt \\
      [--min-sim-image 0.75 --min-sim-direction 0.2 --min-sim-0 0.2 --min-sim-1 0.2 --top-k 4]

Records are grouped by prompt (consecutive records of one source and ``prompt_index``; a record
without a prompt index is its own group); each group keeps its pairs that pass the thresholds,
best ``sim_direction`` first, at most ``top-k``. The kept records are written with their new
scores to ``--out``; every record's scores go to ``OUT/scores.jsonl`` (``index`` is its position
in the input), so other thresholds can be tried later. Rerunning after a crash resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Sequence

import numpy as np

from jip2p.cli import run

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


def _decode(data: bytes) -> np.ndarray:
  from PIL import Image
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def _score(scorer, triplets) -> dict[str, np.ndarray]:
  """Scores of every triplet, requests of one image size at a time."""
  from jip2p.sidecar import SCORE_KEYS
  pairs = [(_decode(t.input_image), _decode(t.edited_image)) for t in triplets]
  out = {k: np.zeros(len(triplets), np.float32) for k in SCORE_KEYS}
  by_shape = {}
  for n, (a, b) in enumerate(pairs):
    by_shape.setdefault((a.shape, b.shape), []).append(n)
  for indices in by_shape.values():
    scores = scorer.score(np.stack([pairs[n][0] for n in indices]),
                          np.stack([pairs[n][1] for n in indices]),
                          [triplets[n].input_caption for n in indices],
                          [triplets[n].edited_caption for n in indices])
    for k in SCORE_KEYS:
      out[k][indices] = scores[k]
  return out


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  import dataclasses

  from jip2p.data.reader import iter_triplets
  from jip2p.data.tf_setup import import_tf
  from jip2p.data.writer import DatasetWriter
  from jip2p.p2p import filter as filter_lib
  from jip2p.p2p.dataset import resume_point
  from jip2p.sidecar import SCORE_KEYS, ClipScorer

  config = filter_lib.FilterConfig(
      min_sim_image=args.min_sim_image, min_sim_direction=args.min_sim_direction,
      min_sim_0=args.min_sim_0, min_sim_1=args.min_sim_1, top_k=args.top_k or None)
  tf = import_tf()
  scorer = ClipScorer(args.clip_weights, model=args.clip_model, config=args.clip_config,
                      device=args.device, precision=args.precision, batch_size=args.batch_size)
  written = kept_total = 0
  with scorer:
    metadata = {"filter": PROG, "inputs": list(args.data_dirs),
                "thresholds": dataclasses.asdict(config), "clip_weights": args.clip_weights}
    with DatasetWriter(args.out, examples_per_shard=args.examples_per_shard,
                       metadata=metadata) as writer:
      # The cursor names the input index of a group's first record.
      first, skip = resume_point(writer.cursor(args.split))
      scores_path = f"{writer.directory}/{SCORES_FILE}"
      lines = []
      if first >= 0 and tf.io.gfile.exists(scores_path):
        with tf.io.gfile.GFile(scores_path) as f:
          for line in f.read().splitlines():
            try:
              row = json.loads(line)
            except ValueError:
              continue
            if row["index"] < first:
              lines.append(line)
      with tf.io.gfile.GFile(scores_path, "w") as scores_file:
        for line in lines:
          scores_file.write(line + "\n")
        pending = []

        def flush():
          nonlocal written, kept_total
          flat = [t for _, group in pending for t in group]
          if not flat:
            return
          scores = _score(scorer, flat)
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
                  group[n], clip_sim_0=float(table["sim_0"][n]),
                  clip_sim_1=float(table["sim_1"][n]),
                  clip_sim_direction=float(table["sim_direction"][n]),
                  clip_sim_image=float(table["sim_image"][n]))
              writer.write(t, args.split, cursor={"prompt": start, "written": j + 1,
                                                  "of": len(kept)})
              written += 1
          pending.clear()

        for start, group in _groups(iter_triplets(args.data_dirs, args.split)):
          if start < first:
            continue
          pending.append((start, group))
          if sum(len(g) for _, g in pending) >= args.batch_size:
            flush()
        flush()
  print(f"{PROG}: {written} records written ({kept_total} kept this run); scores in "
        f"{args.out}/{SCORES_FILE}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
