"""`jip2p-cache-latents`: a triplet dataset → a latent cache to train from (``data.latents=True``).

  jip2p-cache-latents --data DIR --model SD_FOLDER --out CACHE_DIR [--resolution 256]

Per example: the VAE moments (mean, log-variance) of the input and edited images' centre crop and
of its horizontal flip, and the instruction's text-encoder output (``--text embeddings``) or token
ids (``--text ids``); for an SDXL model both encoders' prompt states (77 × 2048), the pooled text
(1280) and the edited image's original size, which with the crop make each example's
micro-conditioning; see `jip2p.data.latents`. The model must be the one training starts from
(its VAE and text encoder are frozen): a diffusers-format folder, or ``random:<preset>`` for
smoke runs.

The input split, the output folder (writable, no finished cache in it) and the model are checked
before any work: one line and exit status 2, nothing written. Shards are written under temporary
names and ``latents.json`` last; rerunning an interrupted run writes the cache again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jip2p.cli import VAE_HELP, run

PROG = "jip2p-cache-latents"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, nargs="+", help="triplet dataset folder(s)")
  parser.add_argument("--model", required=True,
                      help="diffusers-format folder (SD 1.x/2.x, SDXL, or an InstructPix2Pix "
                           "model of either), or random:<preset> (sd15, sdxl, tiny, tiny-sdxl)")
  parser.add_argument("--vae", metavar="DIR", default=None, help=VAE_HELP)
  parser.add_argument("--out", required=True, help="the cache folder to create (local or gs://)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--resolution", type=int, default=256, help="crop side in pixels")
  parser.add_argument("--resize", type=int, default=None,
                      help="square side the images are resized to before the centre crop "
                           "(default: the resolution, i.e. the whole image)")
  parser.add_argument("--text", choices=("embeddings", "ids"), default="embeddings",
                      help="store the text encoder's output (no text encoder in the train step) "
                           "or the token ids")
  parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                      help="storage type of moments and embeddings")
  parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute type of the VAE and text encoder")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--examples-per-shard", type=int, default=1024)
  parser.add_argument("--max-examples", type=int, default=None,
                      help="cache only the first N records (smoke runs)")
  return parser.parse_args(argv)


def load_model(spec: str, compute_dtype: str, vae: str | None = None):
  """A `Pipeline` from a folder or ``random:<preset>``, its VAE replaced by ``vae``'s."""
  import jax.numpy as jnp

  from jip2p import checkpoints
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[compute_dtype]
  if spec.startswith("random:"):
    pipeline = checkpoints.random_pipeline(spec.split(":", 1)[1], unet_in_channels=8, dtype=dtype)
    if vae:
      pipeline.vae = checkpoints.load_vae(vae, dtype=dtype)
    return pipeline
  return checkpoints.load_pipeline(spec, dtype=dtype, vae=vae)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  from jip2p.data import latents

  latents.check_target(args.data, args.out, args.split)
  pipeline = load_model(args.model, args.compute_dtype, args.vae)
  start = time.perf_counter()

  def log(message: str) -> None:
    print(f"{PROG}: {message} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
          flush=True)

  info = latents.write_cache(
      args.data, args.out, pipeline, split=args.split, resolution=args.resolution,
      resize=args.resize, text=args.text, dtype=args.dtype, batch_size=args.batch_size,
      examples_per_shard=args.examples_per_shard, max_examples=args.max_examples,
      model_name=args.model, log=log)
  print(f"cached {info.num_examples} examples ({info.skipped} skipped) in {len(info.shards)} "
        f"shard(s): latents {info.latent_shape}, text {info.text} {info.text_shape}")
  print(f"latent cache: {args.out}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run(_main, argv, PROG)


if __name__ == "__main__":
  sys.exit(main())
