"""Latency of `jip2p.edit.Editor` calls as a web editor's user makes them: what recompiles.

  PYTHONPATH=. .venv/bin/python bench/edit_latency.py [--model data/synthetic-ip2p]
      [--cache DIR] [--size-buckets N] [--json OUT]

One process, one editor, a sequence of single edits (seed 0), each timed from the call to the
pixels on the host:

  first        20 steps at the model's own size: cold (compiles, or loads from ``--cache``);
  warm         the same again (the program is in memory);
  steps 21     one more step;            steps 30    ten more;
  size A, B    two other aspect ratios (inputs of 4:3 and 8:5 → two resized shapes by the
               reference rule; with ``--size-buckets`` they may share a program);
  size A again, steps 50 at size A.

``--cache DIR`` turns the persistent compilation cache on in DIR (`jip2p.runtime.configure`); run
twice with the same DIR to see a second start, the first time with an empty DIR for a cold one.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="data/synthetic-ip2p")
  p.add_argument("--cache", default=None, help="persistent compilation cache folder (default: off)")
  p.add_argument("--size-buckets", type=int, default=None,
                 help="Editor.edits(size_buckets=N) (default: the reference's sizes)")
  p.add_argument("--json", default=None, help="also write the timings here")
  args = p.parse_args()

  from jip2p import runtime
  runtime.configure(xla_flags=False, cache_dir=args.cache)
  from jip2p.edit import Editor

  start = time.perf_counter()
  editor = Editor.from_pretrained(args.model)
  load = time.perf_counter() - start
  n = editor.native_size
  rng = np.random.default_rng(0)
  square = rng.integers(0, 256, (n, n, 3), np.uint8)
  wide_a = rng.integers(0, 256, (3 * n, 4 * n, 3), np.uint8)  # 4:3
  wide_b = rng.integers(0, 256, (5 * n, 8 * n, 3), np.uint8)  # 8:5
  extra = {} if args.size_buckets is None else {"size_buckets": args.size_buckets}
  calls = [("first", square, 20), ("warm", square, 20), ("steps 21", square, 21),
           ("steps 30", square, 30), ("size A", wide_a, 20), ("size B", wide_b, 20),
           ("size A again", wide_a, 20), ("steps 50 size A", wide_a, 50)]
  rows = []
  for name, image, steps in calls:
    start = time.perf_counter()
    [out] = editor([image], ["make it red"], steps=steps, seed=0, resolution=n,
                   output_type="np", **extra)
    seconds = time.perf_counter() - start
    rows.append({"call": name, "steps": steps, "shape": list(out.shape[:2]),
                 "seconds": round(seconds, 3)})
    print(f"{name:16s} {steps:3d} steps  {out.shape[1]}×{out.shape[0]}  {seconds:7.2f} s",
          flush=True)
  print(f"(model loaded in {load:.2f} s; cache: {args.cache or 'off'})")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"model": args.model, "cache": args.cache, "size_buckets": args.size_buckets,
                 "load_seconds": round(load, 3), "calls": rows}, f, indent=1)


if __name__ == "__main__":
  main()
