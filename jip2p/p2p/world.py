"""Paired data the paper's way in the procedural world: prompts, exact pair scores, CLIP thresholds.

InstructPix2Pix asks GPT-3 for (input caption, instruction, edited caption) triplets, generates
image pairs for them with a text-to-image model and keeps those CLIP likes. In the world
(`jip2p.data.synthetic`) the text side is known exactly, and so is what each image must show: a
generated pair can be scored exactly, which the paper could only approximate with CLIP. This
module holds what is world-specific about that stage, so the generic driver
(`jip2p.p2p.dataset`) stays the paper's:

* `prompt_rows`: the world's stand-in for GPT-3, prompts JSONL rows from `synthetic.example_at`
  (training wordings), each with ``"world": {"seed", "index"}`` to find its example again
  (`read_prompts` ignores the key; records keep the line number as ``prompt_index``);
* `score_dataset` / `summarize`: a generated dataset scored pair by pair (image 0 draws the input
  scene, image 1 is image 0 with exactly the edit), and the CLIP filter's precision and recall
  against exactness given the filtered dataset; `pair_grid` shows kept and rejected pairs;
* `choose_thresholds`: the filter's four thresholds fitted to one seed's candidates, to be
  checked on another seed's.

  python -m jip2p.p2p.world prompts --num 256 --seed 0 --out prompts.jsonl
  jip2p-generate --config configs/generate_world.py:model=M,clip=C,clip_config=J \\
      --prompts prompts.jsonl --out all
  jip2p-clip-filter all --out kept --clip-weights C --clip-config J [thresholds]
  python -m jip2p.p2p.world score all --prompts prompts.jsonl --kept kept --grid pairs.png
  python -m jip2p.p2p.world thresholds kept/scores.jsonl --dataset all --prompts prompts.jsonl

Scoring reads TFRecords, so it imports TensorFlow (lazily): keep torch out of its process.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jip2p.data import synthetic
from jip2p.errors import ConfigError, InputError, run
from jip2p.eval import world_metrics
from jip2p.p2p import filter as filter_lib
from jip2p.sidecar.protocol import SCORE_KEYS

WORLD_KEY = "world"
PROG = "python -m jip2p.p2p.world"


# ----------------------------------------------------------------------------- prompts

def prompt_rows(num: int, *, seed: int, start: int = 0) -> list[dict[str, Any]]:
  """Prompts JSONL rows of world examples ``start .. start + num - 1`` of ``seed``: input caption,
  instruction (a training wording), edited caption, and ``"world": {"seed", "index"}``."""
  return [{"input": e.input_caption, "edit": e.instruction, "output": e.edited_caption,
           WORLD_KEY: {"seed": e.seed, "index": e.index}}
          for e in synthetic.generate(num, seed=seed, start=start, size=synthetic.MIN_SIZE)]


def read_world_prompts(path: str) -> dict[int, dict[str, Any]]:
  """{0-based line number: row} of the lines of a prompts file that carry a ``"world"`` object
  (the line numbers `jip2p-generate` stores as ``prompt_index``)."""
  from jip2p import files
  rows = {}
  for index, line in enumerate(files.read_lines(path, "prompts file")):
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get(WORLD_KEY), dict):
      rows[index] = row
  if not rows:
    raise InputError(f"{path}: no prompt line has a {WORLD_KEY!r} object; write world prompts "
                     f"with `{PROG} prompts`")
  return rows


def example_of(triplet, prompts: Mapping[int, dict[str, Any]], size: int,
               what: str) -> synthetic.Example:
  """The world example behind a generated record, at ``size`` px; `InputError` when its prompt
  line is not a world prompt or its texts are not that line's (another prompts file)."""
  row = prompts.get(triplet.prompt_index)
  if row is None:
    raise InputError(f"{what}: prompt line {triplet.prompt_index + 1} is not a world prompt of "
                     "the prompts file")
  texts = (triplet.input_caption, triplet.instruction, triplet.edited_caption)
  if texts != tuple(str(row.get(k, "")).strip() for k in ("input", "edit", "output")):
    raise InputError(f"{what}: its texts are not those of prompt line {triplet.prompt_index + 1} "
                     "(the prompts file is not the one it was generated from)")
  world = row[WORLD_KEY]
  try:
    return synthetic.example_at(world["index"], seed=world["seed"], size=size)
  except (KeyError, TypeError, ConfigError) as e:
    raise InputError(f"{what}: prompt line {triplet.prompt_index + 1}: bad world object "
                     f"{world!r} ({e})") from None


# ----------------------------------------------------------------------------- exact scores

def score_pair(input_image: np.ndarray, edited_image: np.ndarray,
               example: synthetic.Example) -> dict[str, Any]:
  """Exact scores of a generated pair (uint8 [S, S, 3] each, S = ``example.size``).

  drawn: image 0 draws the input scene (`world_metrics.score_drawing`); edited: image 1 is image 0
  with exactly the edit (`world_metrics.score` with image 0 as the input); exact: both.
  """
  if input_image.shape != example.input_image.shape or edited_image.shape != input_image.shape:
    raise InputError(f"a pair of images shaped {input_image.shape} and {edited_image.shape}; "
                     f"its world example is {example.input_image.shape}")
  drawn = world_metrics.score_drawing(input_image, example.input_scene)["success"]
  edit = world_metrics.score(edited_image, dataclasses.replace(example, input_image=input_image))
  return {"family": example.family, "drawn": bool(drawn), "edited": edit["success"],
          "edit_ok": edit["edit_ok"], "rest_ok": edit["rest_ok"],
          "exact": bool(drawn and edit["success"])}


def _pairs(data_dir: str, split: str) -> Iterator[tuple[int, Any, np.ndarray, np.ndarray]]:
  """(position, triplet, image 0, image 1) of every record, in storage order (TensorFlow)."""
  from jip2p.data.reader import iter_triplets
  from jip2p.eval.sets import decode
  for position, t in enumerate(iter_triplets(data_dir, split)):
    what = f"{data_dir} record {position}"
    yield (position, t, decode(t.input_image, f"{what} input_image"),
           decode(t.edited_image, f"{what} edited_image"))


def score_dataset(data_dir: str, prompts: Mapping[int, dict[str, Any]],
                  split: str = "train") -> list[dict[str, Any]]:
  """`score_pair` of every record of a `jip2p-generate` dataset, with its ``position``,
  ``prompt_index``, ``seed`` and ``source_id``. prompts: `read_world_prompts` of its prompts file.
  """
  results, seen = [], set()
  for position, t, image0, image1 in _pairs(data_dir, split):
    what = f"{data_dir} record {position}"
    if image0.shape[0] != image0.shape[1] or image0.shape[0] < synthetic.MIN_SIZE:
      raise InputError(f"{what}: a {image0.shape[0]}×{image0.shape[1]} image; world pairs are "
                       f"square, at least {synthetic.MIN_SIZE} px")
    if pair_key(t) in seen:
      raise InputError(f"{what}: a second pair of prompt line {t.prompt_index + 1} and seed "
                       f"{t.seed}")
    seen.add(pair_key(t))
    example = example_of(t, prompts, image0.shape[0], what)
    try:
      scores = score_pair(image0, image1, example)
    except InputError as e:
      raise InputError(f"{what}: {e}") from None
    results.append({"position": position, "prompt_index": t.prompt_index, "seed": t.seed,
                    "source_id": t.source_id, **scores})
  if not results:
    raise InputError(f"{data_dir}: no record in split {split!r}")
  return results


def pair_key(triplet) -> tuple[int, int]:
  """A generated pair's identity across datasets (the CLIP filter keeps it): (prompt line, seed)."""
  return triplet.prompt_index, triplet.seed


def kept_mask(results: Sequence[Mapping[str, Any]], kept_dir: str,
              split: str = "train") -> np.ndarray:
  """bool [N]: which of the scored pairs of a dataset the filtered dataset at ``kept_dir`` holds;
  `InputError` when it holds a pair the dataset does not."""
  from jip2p.data.reader import iter_triplets
  where = {(r["prompt_index"], r["seed"]): n for n, r in enumerate(results)}
  kept = np.zeros(len(results), bool)
  for position, t in enumerate(iter_triplets(kept_dir, split)):
    if pair_key(t) not in where:
      raise InputError(f"{kept_dir} record {position} (prompt line {t.prompt_index + 1}, seed "
                       f"{t.seed}) is not a pair of the scored dataset")
    kept[where[pair_key(t)]] = True
  return kept


def filter_stats(exact: np.ndarray, kept: np.ndarray) -> dict[str, Any]:
  """A filter judged against exactness (bool [N] each): kept, precision (exact among kept),
  recall (kept among exact), f1; None where undefined (nothing kept, nothing exact)."""
  exact, kept = np.asarray(exact, bool), np.asarray(kept, bool)
  both = int((exact & kept).sum())
  precision = both / kept.sum() if kept.any() else None
  recall = both / exact.sum() if exact.any() else None
  f1 = (2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall else None)
  return {"kept": int(kept.sum()), "kept_exact": both, "precision": precision, "recall": recall,
          "f1": f1}


def _rates(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  return {"pairs": len(results),
          **{k: float(np.mean([r[k] for r in results])) for k in ("exact", "drawn", "edited")}}


def summarize(results: Sequence[Mapping[str, Any]],
              kept: np.ndarray | None = None) -> dict[str, Any]:
  """Fractions exact / drawn / edited overall and per family (`synthetic.FAMILIES` order), pairs
  and exact pairs per prompt, prompts with an exact pair; given ``kept`` (bool [N], `kept_mask`),
  the filter's `filter_stats` and the prompts it keeps a pair of."""
  by_prompt = collections.defaultdict(list)
  for r in results:
    by_prompt[r["prompt_index"]].append(r["exact"])
  out = {**_rates(results), "prompts": len(by_prompt),
         "pairs_per_prompt": len(results) / len(by_prompt),
         "exact_per_prompt": sum(map(sum, by_prompt.values())) / len(by_prompt),
         "prompts_with_exact": float(np.mean([any(v) for v in by_prompt.values()])),
         "families": {f: _rates(rs) for f in synthetic.FAMILIES
                      if (rs := [r for r in results if r["family"] == f])}}
  if kept is not None:
    prompts_kept = {r["prompt_index"] for r, k in zip(results, kept) if k}
    out["filter"] = {**filter_stats([r["exact"] for r in results], kept),
                     "prompts_kept": len(prompts_kept) / len(by_prompt)}
  return out


def pair_grid(data_dir: str, results: Sequence[Mapping[str, Any]], kept: np.ndarray | None,
              split: str = "train", *, per_group: int = 6, scale: int = 4) -> np.ndarray:
  """uint8 [H, W, 3]: the first ``per_group`` pairs of each group (kept or rejected by the filter
  when ``kept`` is given, exact or not), one row each: instruction | image 0 | image 1, under a
  label row naming the group and its size."""
  from jip2p import grids
  exact = np.array([r["exact"] for r in results])
  if kept is None:
    groups = [("exact", exact), ("not exact", ~exact)]
  else:
    groups = [("kept, exact", kept & exact), ("kept, not exact", kept & ~exact),
              ("rejected, exact", ~kept & exact), ("rejected, not exact", ~kept & ~exact)]
  chosen = {results[n]["position"] for _, mask in groups for n in np.flatnonzero(mask)[:per_group]}
  images = {}
  for position, t, image0, image1 in _pairs(data_dir, split):
    if position in chosen:
      images[position] = (t.instruction, grids.upscale(image0, scale), grids.upscale(image1, scale))
  side = next(iter(images.values()))[1].shape[0]
  text = 3 * side // 2
  rows = []
  for label, mask in groups:
    rows.append([grids.text_tile(f"{label}: {int(mask.sum())} of {len(results)}",
                                 text + 2 * side, 16)])
    for n in np.flatnonzero(mask)[:per_group]:
      instruction, image0, image1 = images[results[n]["position"]]
      rows.append([grids.text_tile(instruction, text, side), image0, image1])
  return grids.image_grid(rows, gap=2)


# ----------------------------------------------------------------------------- thresholds

def read_scores(path: str, results: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """The CLIP scores (float32 [N] each of `SCORE_KEYS`) of the scored pairs ``results`` from the
  ``scores.jsonl`` of a `jip2p-clip-filter` run over their dataset (whatever its thresholds: it
  scores every record). Its rows are ``{"index": position in the input, "prompt_index",
  "source_id", sim_0, sim_1, sim_direction, sim_image, "kept"}``."""
  from jip2p import files
  rows = {}
  for number, line in enumerate(files.read_lines(path, "CLIP scores file")):
    try:
      row = json.loads(line)
      rows[int(row["index"])] = row
    except (ValueError, TypeError, KeyError):
      raise InputError(f"{path} line {number + 1}: not a jip2p-clip-filter score row") from None
  scores = {k: np.zeros(len(results), np.float32) for k in SCORE_KEYS}
  for n, r in enumerate(results):
    row = rows.get(r["position"])
    if row is None or (row.get("prompt_index"), row.get("source_id")) != (r["prompt_index"],
                                                                          r["source_id"]):
      raise InputError(f"{path} has no scores of record {r['position']} (prompt line "
                       f"{r['prompt_index'] + 1}, {r['source_id']!r}): run jip2p-clip-filter on "
                       "the scored dataset alone")
    for k in SCORE_KEYS:
      scores[k][n] = row[k]
  return scores


def choose_thresholds(scores: Mapping[str, np.ndarray], exact: np.ndarray, *,
                      min_recall: float = 0.5, levels: int = 8
                      ) -> tuple[filter_lib.FilterConfig, dict[str, Any]]:
  """The four thresholds that keep the most precise set of candidates whose recall of the exact
  ones is at least ``min_recall``; (`FilterConfig` with top_k None, its `filter_stats`).

  Why precision under a recall floor, not F1: the editor learns from what is kept, and a wrong
  pair teaches a wrong edit, while a missed exact pair costs only generation time (more
  candidates per prompt find others); the floor keeps the filter from settling on a few easy
  pairs (often of a few families). Ties go to the higher recall, then to the lower thresholds.

  scores: `SCORE_KEYS` → float [N] of the candidates (one calibration seed); exact: bool [N].
  Each threshold is tried at -1 (off) and at the 0, 1/levels, …, (levels-1)/levels quantiles of
  its score over the exact candidates ((levels+1)^4 sets). top_k is left to the caller: apply
  the thresholds with it on another seed's prompts (`jip2p-clip-filter`, then ``score --kept``)
  to check them.
  """
  exact = np.asarray(exact, bool)
  table = filter_lib.score_table(scores)
  if exact.shape != table["sim_0"].shape:
    raise InputError(f"{exact.shape[0]} exactness labels for {table['sim_0'].shape[0]} candidates")
  if not exact.any():
    raise InputError("no candidate is exact: there is nothing to keep, no threshold to choose")
  if not 0 < min_recall <= 1:
    raise ConfigError(f"min_recall must be in (0, 1], got {min_recall}")
  names = ("min_sim_image", "min_sim_direction", "min_sim_0", "min_sim_1")
  keys = ("sim_image", "sim_direction", "sim_0", "sim_1")
  grid = [np.unique(np.concatenate([[-1.0], np.quantile(table[k][exact],
                                                        np.arange(levels) / levels)]))
          for k in keys]
  # passes[i][j]: bool [N], score i at least its j-th candidate threshold (NaN never passes).
  passes = [table[k][None, :] >= g[:, None] for k, g in zip(keys, grid)]
  n_exact = exact.sum()
  best, best_rank = None, None
  for a in range(len(grid[0])):
    for b in range(len(grid[1])):
      ab = passes[0][a] & passes[1][b]
      for c in range(len(grid[2])):
        abc = ab & passes[2][c]
        kept = abc[None, :] & passes[3]  # [levels', N] over the last threshold
        n_kept = kept.sum(1)
        hits = (kept & exact).sum(1)
        recall = hits / n_exact
        precision = np.where(n_kept > 0, hits / np.maximum(n_kept, 1), 0.0)
        for d in np.flatnonzero(recall >= min_recall):
          rank = (precision[d], recall[d], -(a + b + c + d))
          if best_rank is None or rank > best_rank:
            best, best_rank = (a, b, c, int(d)), rank
  config = filter_lib.FilterConfig(**{n: float(g[i]) for n, g, i in zip(names, grid, best)},
                                   top_k=None)
  return config, filter_stats(exact, filter_lib.passes(table, config))


# ----------------------------------------------------------------------------- command line

def _write_text(text: str, path: str) -> None:
  from jip2p import files
  with files.replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def _prompts(args) -> int:
  if args.num < 1 or args.seed < 0 or args.start < 0:
    raise ConfigError(f"--num {args.num}, --seed {args.seed}, --start {args.start}: need "
                      "num ≥ 1, seed ≥ 0, start ≥ 0")
  rows = prompt_rows(args.num, seed=args.seed, start=args.start)
  _write_text("".join(json.dumps(r) + "\n" for r in rows), args.out)
  print(f"{PROG}: {len(rows)} prompts of world seed {args.seed} written to {args.out}")
  return 0


def _score(args) -> int:
  prompts = read_world_prompts(args.prompts)
  results = score_dataset(args.dataset, prompts, args.split)
  kept = kept_mask(results, args.kept, args.split) if args.kept else None
  summary = {"dataset": args.dataset, "kept": args.kept, **summarize(results, kept)}
  if args.grid:
    from jip2p import files
    files.save_png(pair_grid(args.dataset, results, kept, args.split), args.grid)
  if args.records:
    _write_text("".join(json.dumps(r) + "\n" for r in results), args.records)
  print(json.dumps(summary))
  return 0


def _thresholds(args) -> int:
  results = score_dataset(args.dataset, read_world_prompts(args.prompts), args.split)
  scores = read_scores(args.scores, results)
  config, stats = choose_thresholds(scores, np.array([r["exact"] for r in results]),
                                    min_recall=args.min_recall)
  thresholds = {k: v for k, v in dataclasses.asdict(config).items() if k != "top_k"}
  flags = " ".join(f"--{k.replace('_', '-')} {v:.4g}" for k, v in thresholds.items())
  print(json.dumps({"dataset": args.dataset, "candidates": len(results),
                    "exact": int(sum(r["exact"] for r in results)), "min_recall": args.min_recall,
                    "thresholds": thresholds, "calibration": stats, "clip_filter_flags": flags}))
  return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("prompts", help="write world prompts JSONL for jip2p-generate")
  p.add_argument("--num", type=int, required=True, help="prompts (world examples)")
  p.add_argument("--seed", type=int, required=True, help="the world seed of the examples")
  p.add_argument("--start", type=int, default=0, help="first example index (default 0)")
  p.add_argument("--out", required=True, help="the prompts file (written whole)")
  p.set_defaults(run=_prompts)

  p = sub.add_parser("score", help="score a generated dataset's pairs exactly; print one JSON "
                                   "line")
  p.add_argument("dataset", help="a jip2p-generate dataset")
  p.add_argument("--prompts", required=True, help="the prompts file it was generated from")
  p.add_argument("--kept", help="the CLIP-filtered dataset of it (jip2p-clip-filter): report "
                                "the filter's precision and recall")
  p.add_argument("--grid", help="write a PNG grid of pairs here, grouped kept/rejected")
  p.add_argument("--records", help="write every pair's scores here (JSONL, written whole)")
  p.add_argument("--split", default="train")
  p.set_defaults(run=_score)

  p = sub.add_parser("thresholds", help="choose the CLIP filter's thresholds on a calibration "
                                        "dataset; print one JSON line")
  p.add_argument("scores", help="scores.jsonl of jip2p-clip-filter run on --dataset")
  p.add_argument("--dataset", required=True,
                 help="the jip2p-generate dataset of all candidates (thresholds -1, top_k 0)")
  p.add_argument("--prompts", required=True, help="the prompts file it was generated from")
  p.add_argument("--min-recall", type=float, default=0.5,
                 help="the least fraction of exact candidates kept (default 0.5)")
  p.add_argument("--split", default="train")
  p.set_defaults(run=_thresholds)
  return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
