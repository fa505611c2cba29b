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

Before a model draws captions right, `caption_use` says whether it reads them at all, in seconds
instead of minutes: its denoising error on training scenes with each scene's own caption,
another scene's and the empty one (``--caption-use``). A model that reads its captions does
better with its own than with none, and worse with another scene's.
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


def caption_use(pipeline, *, num: int = 64, seed: int = 0, split: str = "train",
                timesteps: Sequence[int] = (500, 900), noise_seed: int = 0
                ) -> dict[str, dict[str, float]]:
  """{t: {"own", "other", "empty"}}: the model's mean squared error against its training target
  (ε or v, the scheduler's prediction type) on drawings 0 .. num-1 of the caption dataset
  ``seed``, noised at each t with the same noise, given each scene's own caption, the next
  scene's caption, or the empty caption."""
  import jax.numpy as jnp

  from jip2p.diffusion import schedules
  from jip2p.train.step import noised_and_target
  if num < 2:
    raise ConfigError(f"--num must be ≥ 2 (a scene needs another's caption), got {num}")
  config = schedules.from_scheduler_config(pipeline.scheduler_config)
  alphas = config.alphas_cumprod()
  bad = [t for t in timesteps if not 0 <= t < len(alphas)]
  if bad:
    raise ConfigError(f"timesteps {bad} outside [0, {len(alphas)})")
  size = pipeline.vae.config.sample_size
  drawings = [synthetic.drawing_at(i, seed=seed, size=size, split=split) for i in range(num)]
  images = np.stack([d.image for d in drawings]).astype(np.float32) / 127.5 - 1.0
  latents = pipeline.vae.encode(jnp.asarray(images)).mode() * pipeline.vae.config.scaling_factor
  own = pipeline.text_encoder(jnp.asarray(pipeline.tokenizer([d.caption for d in drawings])))
  empty = jnp.broadcast_to(pipeline.text_encoder(jnp.asarray(pipeline.tokenizer([""]))),
                           own.shape)
  texts = {"own": own, "other": jnp.roll(own, 1, axis=0), "empty": empty}
  rng = np.random.default_rng(noise_seed)
  out = {}
  for t in timesteps:
    noise = jnp.asarray(rng.standard_normal(latents.shape).astype(np.float32))
    noisy, target = noised_and_target(latents, noise, jnp.full((num,), np.sqrt(alphas[t])),
                                      jnp.full((num,), np.sqrt(1.0 - alphas[t])),
                                      config.prediction_type)
    step = jnp.full((num,), t)
    out[str(t)] = {name: float(jnp.mean(jnp.square(pipeline.unet(noisy, step, text) - target)))
                   for name, text in texts.items()}
  return out


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
  p.add_argument("--caption-use", action="store_true",
                 help="instead of drawing, print the model's denoising error at t = 500 and 900 "
                      "with each scene's own caption, another's and none (--num scenes of "
                      "--seed, --split wordings): whether it reads its captions at all")
  args = p.parse_args(argv)
  from jip2p import checkpoints, grids
  pipeline = checkpoints.load_pipeline(args.model)
  if args.caption_use:
    errors = caption_use(pipeline, num=args.num, seed=args.seed, split=args.split)
    print(json.dumps({"model": args.model, "num": args.num, "seed": args.seed,
                      "split": args.split, "caption_use": errors}))
    return 0
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
