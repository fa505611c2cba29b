r"""InstructPix2Pix on the procedural edit world (`jip2p.data.synthetic`), small enough for a CPU.

The commands that made the shipped model ``data/synthetic-ip2p`` (bench/RESULTS.md, 2026-12-06):

  jip2p-import synthetic --num 20000 --size 32 --out /tmp/world
  jip2p-train --config=configs/synthetic.py:path=/tmp/world --workdir=/tmp/jip2p-world
  jip2p-export --workdir=/tmp/jip2p-world --out=/tmp/synthetic-ip2p --step=11000 --dtype=float16
  jip2p-demo --pretrained /tmp/synthetic-ip2p            # score it as the shipped one is scored

Expect: 11,000 steps of batch 16 at 1.2–2.3 s each on a 2-core CPU, about 4¾ h; stop whenever
you like and rerun the jip2p-train command: it resumes from the last checkpoint (every 500 steps;
the shipped run went in four sittings). Training loss (its 50-step mean) 0.037 at 4,500 steps,
0.019–0.027 from 9,000 to 11,000. The float16 export (11 MB) scored on 32 held-out scenes at
s_T 3, s_I 1, 20 steps: 72% full success, instruction followed in 88%, PSNR 27.0 dB (copying the
input: 0%, 17.8 dB); ``--sweep`` adds the guidance trade-off. ``--size 32`` matters: the importer's
default is 64 px and this config trains at ``res=32``.

`jip2p-demo` runs the same pipeline for 300 steps (about 12 minutes on 2 cores; loss 0.50 →
0.14, held-out PSNR 5.5 → 13.4 dB, no full success yet) and scores the result.

The real pipeline at a small size: the "world" preset (jip2p.checkpoints.PRESETS) — a 3-level
UNet with cross-attention predicting v (the preset's scheduler config says v_prediction), a
2-layer CLIP text encoder (random, with unit-normal token embeddings:
`jip2p.checkpoints.presets.RANDOM_INIT` says why; frozen, as SD's is) and, in the VAE's place,
the exact pixel codec (jip2p.models.pixel_codec with patch 1: the latents are the 32×32×3 pixels
in [-1, 1], and the UNet takes 6 channels). No VAE was pretrained for this world, and a learned
one would blur the exact edges the world's metrics score; the codec is lossless and costs nothing
to train.

Fine-tuning from a text-to-image base model, as the paper does: ``init=DIR``, a world
text-to-image model folder (`configs/synthetic_t2i.py`'s export): its UNet's input conv grows from
3 to 6 channels, the new ones zero, so the editor starts as the base model that ignores the input
image; its text encoder (the world CLIP's text tower) stays frozen.

Arguments (``configs/synthetic.py:key=value,…``): path, init (default random:world), steps,
batch, lr, accum, res.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, path="", init="random:world", steps=11000, batch=16, lr=1e-3, accum=1, res=32)
  c = config_lib.base_config()
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]
  c.grad_accum = a["accum"]
  c.model.init = a["init"]
  c.model.unet_in_channels = 6
  c.model.compute_dtype = "float32"
  c.data.source = "tfrecord"
  c.data.path = a["path"]
  c.data.res = c.data.resize_min = c.data.resize_max = a["res"]
  c.data.flip = False  # "move … to the left" is not flip-invariant
  c.data.shuffle_buffer = 5000
  c.optimizer.lr = a["lr"]
  c.optimizer.grad_clip_norm = 1.0
  c.ema.decay = 0.995
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 4
  c.log_every_steps = 50
  c.eval.every_steps = 0
  return c
