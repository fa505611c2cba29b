r"""The world's text-to-image base model: what an editor of the procedural world is fine-tuned from.

  jip2p-train --config=configs/synthetic_t2i.py --workdir=/tmp/jip2p-world-t2i

InstructPix2Pix fine-tunes a pretrained text-to-image model; no such model exists for the
procedural world (`jip2p.data.synthetic`), so this trains one the way Stable Diffusion was
trained: the same loop and step as an editor (``config.task = "text_to_image"``), on images and
captions of the whole scene (shapes, colours, places, background) in several wordings, the
held-out ones never seen. The model is the "world" preset's (a 3-level UNet predicting v, the
exact pixel codec in the VAE's place) with 3 input channels; its frozen text encoder is the text tower
of the world CLIP (the open_clip model in ``data/world-clip``, converted once and cached), as
Stable Diffusion's is a CLIP's.

Expect: the loss (v-MSE) falls from 0.84 at the first steps to 0.52 by step 20 (a 20-step run on
the 2-core CPU, 2026-12-07, with other work beside it: 4.5–7.7 s a step of 16) and to 0.056 by
step 3,000. How many steps the model needs to draw held-out captions right is being measured
(bench/RESULTS.md: at step 2,500 it reads colour words but does not yet bind them to objects);
score an export with ``python -m jip2p.eval.drawings --model <workdir>/export/ema``, and see
whether it reads its captions at all, in seconds, with ``... --caption-use``.

The snapshot shipped in data/world-t2i (the EMA weights of step 2,500 of a run from scratch,
2026-12-08) continues in a later sitting with ``init=data/world-t2i,text=`` (its own text encoder,
a fresh optimizer and EMA).

Arguments (``configs/synthetic_t2i.py:key=value,…``): init, text (an open_clip config JSON or a
text-encoder folder; "" keeps init's), steps, batch, lr, res, scenes.
"""

import os

from jip2p.train import config as config_lib

# The world CLIP (open_clip format), shipped in the repository beside this folder.
WORLD_CLIP = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "data", "world-clip",
                                           "world-clip.json"))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, init="random:world",
                           text=WORLD_CLIP, steps=20000, batch=16, lr=1e-3, res=32,
                           scenes=1_000_000)
  c = config_lib.base_config()
  c.task = "text_to_image"
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]
  c.grad_accum = 1
  c.model.init = a["init"]
  c.model.text_encoder = a["text"]
  c.model.unet_in_channels = 3
  c.model.compute_dtype = "float32"
  c.data.source = "synthetic"
  c.data.num_examples = a["scenes"]
  c.data.res = c.data.resize_min = c.data.resize_max = a["res"]
  c.data.flip = False
  c.optimizer.lr = a["lr"]
  c.optimizer.grad_clip_norm = 1.0
  c.ema.decay = 0.995
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 4
  c.log_every_steps = 50
  c.eval.every_steps = 0
  return c
