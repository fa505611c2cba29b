r"""InstructPix2Pix on SDXL (both text encoders, the pooled text, micro-conditioning), 768 px.

  jip2p-train --config=configs/ip2p_sdxl.py:init=/models/sdxl-ip2p,data=/data/ip2p-shards \
      --workdir=gs://bucket/runs/ip2p_sdxl

init: an SDXL folder with an 8-channel UNet (jip2p-convert --preset sdxl --expand-conv-in 8 of
SDXL base, or an SDXL InstructPix2Pix folder), or a 4-channel one, whose conv_in grows to 8 here
(new channels zero); an SD 1.x/2.x folder, or one without text_encoder_2/, is refused in one line.
Expect: the paper's recipe on the SDXL UNet — AdamW 1e-4 constant, EMA 0.9999, conditioning
dropout 5/5/5% where dropped text means both the prompt states and the pooled text; random flip
and a 768–864 resize then 768 crop, 768 px as diffusers' sdxl-instructpix2pix-768 (``res=1024``:
1024 px, 1024–1152). The null text of a dropped example is what jip2p-edit uses for the same
folder: zeros for the states and the pooled text when its model_index.json says
``force_zeros_for_empty_prompt`` (true when absent, diffusers' default), else the encoding of "".
Micro-conditioning is per example: each example's original size (its stored edited image's height
and width), the crop's top-left corner in the resized square (mirrored when flipped) and the crop's
size as the target (jip2p.data.reader's include_geometry). The VAE (scaling 0.13025) computes in
float32 when its config says force_upcast, as SDXL's does. Rematerialisation on; bfloat16
compute; a global batch of 1024 = per device × devices × grad_accum 16; FSDP over 8 devices by
default (``fsdp=8``).

Known: the train state (parameters, EMA and the two AdamW moments of the UNet's 2,567,475,204
parameters with the 8-channel conv_in, float32) holds 41.1 GB, computed from the shapes, 5.1 GB
per device at fsdp=8 (tests/train/test_sdxl.py checks that FSDP splits every large tensor). The
paper did not train on SDXL: its 25.5 h on 8× A100-40GB are for SD 1.5 at 256 px (ip2p_sd15.py).
Per-device memory of the compiled step is being measured separately (``jip2p-bench --memory
configs/ip2p_sdxl.py --preset sdxl``); until it is in README "What fits where", lower the
per-device batch (``batch``, ``accum``) if the first step runs out of memory.
Not yet measured: step time, MFU and peak memory on any accelerator, and the loss and edits of a
run.

Arguments (``configs/ip2p_sdxl.py:key=value,…``): init (SDXL diffusers folder), data (folder of
training shards), res (768 or 1024), batch (global), accum, fsdp, steps.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, init="", data="", res=768, batch=1024, accum=16, fsdp=8,
                           steps=10_000)
  c = config_lib.base_config()
  c.model.init = a["init"]
  c.model.family = "sdxl"
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
