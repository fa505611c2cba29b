"""Throughput of the tf.data reader (jip2p.data.reader) with the paired augmentation, 256 px out.

  .venv/bin/python bench/reader_throughput.py [--examples 256] [--batches 24] [--threads 1,0]

Writes two small datasets of real photos (scikit-image's) in a temporary folder: 512x512 JPEG
sources (quality 95, like the generator's output) and the same stored at 288 px (what
`jip2p-import --store-resolution 288` writes). Then reads batches of 32 forever (random resize to
256–288, shared crop to 256 and flip) and reports, per variant:

  ex/s        examples per wall-clock second;
  ex/cpu-s    examples per CPU-second the whole process used (= examples/s per fully busy core:
              the figure that scales with the host's cores).

`--threads 1,0` runs each variant on a private tf.data pool of 1 thread and on TensorFlow's
default (all cores). Tokenizing in the pipeline is compared with no tokenization at all, which
bounds what tokenizing at write time could save.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jip2p.data import importers, reader, schema, writer  # noqa: E402
from jip2p.data.tf_setup import import_tf  # noqa: E402
from jip2p.tokenizer import load_tokenizer  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat", "colorwheel")


def photo_pairs(n: int, size: int = 512):
  """n (input, edited) uint8 pairs: random square crops of real photos; edited = hue-rolled."""
  import skimage.data
  from PIL import Image
  rng = np.random.default_rng(0)
  photos = []
  for name in PHOTOS:
    image = getattr(skimage.data, name, None)
    if image is not None:
      array = np.asarray(image())
      if array.ndim == 3 and array.shape[2] >= 3:
        photos.append(array[..., :3])
  for i in range(n):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.6, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size),
                                                                Image.Resampling.LANCZOS)
    a = np.asarray(crop)
    yield a, np.ascontiguousarray(a[..., [1, 2, 0]])


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def build(directory: str, n: int) -> dict[str, str]:
  sources = {"512 px JPEG sources": os.path.join(directory, "jpeg512"),
             "stored at 288 px (JPEG)": os.path.join(directory, "jpeg288")}
  with writer.DatasetWriter(sources["512 px JPEG sources"], examples_per_shard=64) as w512, \
       writer.DatasetWriter(sources["stored at 288 px (JPEG)"], examples_per_shard=64) as w288:
    for i, (a, b) in enumerate(photo_pairs(n)):
      t = schema.Triplet(input_image=encode_jpeg(a), edited_image=encode_jpeg(b),
                         instruction=f"swap the colour channels of photo number {i}")
      w512.write(t)
      w288.write(importers.prepare(t, store_resolution=288))
  return sources


def measure(directory: str, config: reader.ReaderConfig, batches: int, tokenize) -> tuple:
  it = reader.make_iterator(directory, config, tokenize=tokenize, process_index=0,
                            process_count=1)
  for _ in range(4):  # Warm-up: tracing, autotuning, filling the shuffle buffer.
    next(it)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu0, wall0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  wall = time.perf_counter() - wall0
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu = usage.ru_utime + usage.ru_stime - cpu0
  assert batch["input"].shape == (config.batch_size, 256, 256, 3)
  n = batches * config.batch_size
  return n / wall, n / cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", type=int, default=256)
  parser.add_argument("--batches", type=int, default=24)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--threads", default="1,0", help="comma list; 0 = TensorFlow's default")
  parser.add_argument("--methods", default="area,bilinear,lanczos3")
  args = parser.parse_args()
  import_tf()
  tokenizer = load_tokenizer()
  texts = [f"swap the colour channels of photo number {i}" for i in range(4096)]
  t0 = time.perf_counter()
  tokenizer(texts)
  tok_us = (time.perf_counter() - t0) / len(texts) * 1e6
  print(f"host: {os.cpu_count()} cores; tokenizer alone: {tok_us:.1f} us/instruction "
        f"(one thread)\n")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    sources = build(tmp, args.examples)
    variants = [(src, m, True) for src in sources for m in args.methods.split(",")]
    variants.append((next(iter(sources)), "area", False))
    for threads in [int(t) for t in args.threads.split(",")]:
      for source, method, tokenize in variants:
        config = reader.ReaderConfig(batch_size=args.batch_size, resize_method=method,
                                     num_threads=threads or None, shuffle_buffer=256)
        ex_s, ex_cpu = measure(sources[source], config, args.batches,
                               tokenizer if tokenize else None)
        rows.append((source, method, "pipeline" if tokenize else "none",
                     str(threads or "default"), ex_s, ex_cpu))
        print(f"  {rows[-1][:4]}: {ex_s:.0f} ex/s, {ex_cpu:.0f} ex/cpu-s", file=sys.stderr)
  print("| source | resize | tokenize | tf.data threads | ex/s | ex/cpu-s |")
  print("|---|---|---|---|---:|---:|")
  for source, method, tokenize, threads, ex_s, ex_cpu in rows:
    print(f"| {source} | {method} | {tokenize} | {threads} | {ex_s:.0f} | {ex_cpu:.0f} |")


if __name__ == "__main__":
  main()
