"""How well a text-to-image model of the procedural world draws captions it never saw.

The base model an editor of the world is fine-tuned from is measured the way the world measures
edits, exactly: each caption's scene is known, so every drawn object is checked for its colour
and shape in its own cell, and the background for its colour and for stray objects
(`world_metrics.score_drawing`). Captions come from `synthetic.drawing_at` with another seed than
training's and, by default, the held-out wordings.

Sampling is the paired generator's first image (`p2p.sampling.PairGenerator` with both captions
equal and no attention sharing): the same Euler-ancestral sampler and guidance that generate the
edit dataset, so the figure measured here is the quality of the images that generation starts
from.

  python -m jip2p.eval.drawings --model data/world-t2i --num 192 --seed 100
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from jip2p.data import synthetic
from jip2p.errors import ConfigError
from jip2p.eval import world_metrics


def evaluate(pipeline, *, num: int = 192, seed: int = 100, split: str = "heldout",
             steps: int = 50, cfg_scale: float = 5.0, batch: int = 32,
             progress: bool = True) -> tuple[dict[str, float], list[np.ndarray]]:
  """(`world_metrics.aggregate_drawings` of ``num`` drawings, the drawings uint8 [H, W, 3]).

  Drawing i is of scene i of the caption dataset ``seed`` (``split`` wordings), sampled from
  seed ``seed + i``.
  """
  from jip2p.p2p.sampling import PairGenerator  # jax: only when a model is evaluated
  for name, value in (("num", num), ("steps", steps), ("batch", batch)):
    if value < 1:
      raise ConfigError(f"--{name} must be ≥ 1, got {value}")
  generator = PairGenerator(pipeline, steps=steps)
  size = generator.height
  results, images = [], []
  with tqdm(total=num, desc="drawing", unit="scene", file=sys.stderr, disable=not progress) as bar:
    for start in range(0, num, batch):
      drawings = [synthetic.drawing_at(i, seed=seed, size=size, split=split)
                  for i in range(start, min(num, start + batch))]
      pairs = generator([(d.caption, d.caption) for d in drawings],
                        [seed + d.index for d in drawings], p=0.0, cfg_scale=cfg_scale)
      for d, drawn in zip(drawings, pairs.images[:, 0]):
        results.append(world_metrics.score_drawing(drawn, d.scene))
        images.append(drawn)
      bar.update(len(drawings))
  return world_metrics.aggregate_drawings(results), images


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m jip2p.eval.drawings",
      description="Scores a text-to-image model of the procedural world on captions it never saw: "
                  "the fraction of objects drawn with the right colour and shape in the right "
                  "place, and of drawings wholly right. Prints one JSON line.")
  p.add_argument("--model", required=True, help="diffusers-format folder of a world text-to-image "
                 "model (3 input channels), e.g. one jip2p-train exported from "
                 "configs/synthetic_t2i.py")
  p.add_argument("--num", type=int, default=192, help="captions to draw (default 192)")
  p.add_argument("--seed", type=int, default=100,
                 help="the caption dataset's seed, not training's (default 100)")
  p.add_argument("--split", choices=synthetic.SPLITS, default="heldout",
                 help="caption wordings (default heldout: never trained on)")
  p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
  p.add_argument("--cfg-scale", type=float, default=5.0, help="text guidance (default 5)")
  p.add_argument("--batch", type=int, default=32, help="captions per program run (default 32)")
  p.add_argument("--grid", help="also write the first drawings as a PNG grid here")
  args = p.parse_args(argv)
  from jip2p import checkpoints, grids
  pipeline = checkpoints.load_pipeline(args.model)
  summary, images = evaluate(pipeline, num=args.num, seed=args.seed, split=args.split,
                             steps=args.steps, cfg_scale=args.cfg_scale, batch=args.batch)
  if args.grid:
    truth = [synthetic.drawing_at(i, seed=args.seed, size=images[0].shape[0]).image
             for i in range(min(16, len(images)))]
    from jip2p import files
    files.save_png(grids.image_grid(zip(truth, images[:len(truth)])), args.grid)
  print(json.dumps({"model": args.model, "num": args.num, "seed": args.seed,
                    "split": args.split, "steps": args.steps, "cfg_scale": args.cfg_scale,
                    **summary}))
  return 0


if __name__ == "__main__":
  from jip2p.errors import run
  sys.exit(run(main, None, "jip2p.eval.drawings"))
