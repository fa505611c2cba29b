r"""InstructPix2Pix on Stable Diffusion 2.1-base (ε-prediction, OpenCLIP ViT-H text), 512 px.

  jip2p-train --config=configs/ip2p_sd21.py:init=/models/sd21-base,data=/data/ip2p-shards \
      --workdir=gs://bucket/runs/ip2p_sd21

Expect: the paper's recipe on the SD 2.1-base UNet (865M parameters, linear attention projections,
1024-wide text states). Only ε-prediction checkpoints train: the 768 px SD 2.1 is v-prediction and
is refused at start with a message naming its scheduler's prediction_type. Rematerialisation on;
16 per device × 8 devices × grad_accum 8 by default; ``fsdp=8`` on 16 GB chips.

Known: the train state (parameters, EMA and the two AdamW moments of 865.9M parameters with the
8-channel conv_in, float32) holds 13.9 GB, computed from the shapes. The paper did not train on
SD 2.1: its 25.5 h on 8× A100-40GB are for SD 1.5 at 256 px (ip2p_sd15.py).
Not yet measured: this UNet's FLOPs per image (bench/RESULTS.md has SD 1.5's only), step time,
MFU and peak memory on any accelerator, and the loss and edits of a run.

Arguments: init, data, res, batch, accum, fsdp, steps.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, init="", data="", res=512, batch=1024, accum=8, fsdp=1,
                           steps=10_000)
  c = config_lib.base_config()
  c.model.init = a["init"]
  c.model.family = "sd"
  c.model.remat = True
  c.data.path = a["data"]
  c.data.res = c.data.resize_min = a["res"]
  c.data.resize_max = a["res"] * 288 // 256
  c.batch_size = a["batch"]
  c.grad_accum = a["accum"]
  c.mesh.fsdp = a["fsdp"]
  c.total_steps = a["steps"]
  c.eval.num_images = 2
  return c
