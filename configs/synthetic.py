r"""InstructPix2Pix on the procedural edit world (`jip2p.data.synthetic`), small enough for a CPU.

  jip2p-import synthetic --out /tmp/world --num 20000
  jip2p-train --config=configs/synthetic.py --workdir=/tmp/jip2p-world \
      --config.data.path=/tmp/world

(`jip2p-demo` does both and scores the result.) The real pipeline at a small size: the "world"
preset (jip2p.checkpoints.PRESETS) — a 3-level UNet with cross-attention predicting v (the preset's
scheduler config says v_prediction), a 2-layer CLIP text encoder (random, with unit-normal token
embeddings: `jip2p.checkpoints.presets.RANDOM_INIT` says why; frozen, as SD's is) and, in the
VAE's place, the exact pixel codec (jip2p.models.pixel_codec with patch 1: the latents are the
32×32×3 pixels in [-1, 1], and the UNet takes 6 channels). No VAE was pretrained for this world,
and a learned one would blur the exact edges the world's metrics score; the codec is lossless and
costs nothing to train.

Arguments (``configs/synthetic.py:key=value,…``): path, steps, batch, lr, accum, res.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, path="", steps=11000, batch=16, lr=1e-3, accum=1, res=32)
  c = config_lib.base_config()
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]
  c.grad_accum = a["accum"]
  c.model.init = "random:world"
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
