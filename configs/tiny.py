r"""A tiny random InstructPix2Pix run: for tests and smoke runs, minutes on a laptop CPU.

  jip2p-train --config=configs/tiny.py --workdir=/tmp/jip2p-tiny

Expect: a random tiny SD-shaped model ("random:tiny", or pass init=<folder>), 32 px pairs of the
procedural edit world, 200 steps of batch 8; the loss starts near 1 and falls well below it;
checkpoints every 50 steps; a validation grid in <workdir>/samples every 100 steps; EMA weights
exported to <workdir>/export/ema at the end.

Arguments (``configs/tiny.py:key=value,…``): init, res, steps, batch, accum, fsdp.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, init="random:tiny", res=32, steps=200, batch=8, accum=1, fsdp=1)
  c = config_lib.base_config()
  c.total_steps = a["steps"]
  c.batch_size = a["batch"]
  c.grad_accum = a["accum"]
  c.model.init = a["init"]
  c.model.compute_dtype = "float32"
  c.data.source = "synthetic"
  c.data.res = c.data.resize_min = c.data.resize_max = a["res"]
  c.data.num_examples = 8
  c.optimizer.lr = 1e-3
  c.ema.decay = 0.99
  c.mesh.fsdp = a["fsdp"]
  c.sharding.min_fsdp_size = 1024
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 2
  c.log_every_steps = 10
  c.eval.every_steps = 100
  c.eval.num_images = 4
  c.eval.num_steps = 10
  return c
