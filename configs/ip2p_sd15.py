r"""InstructPix2Pix as in the paper: Stable Diffusion 1.5, 256 px, batch 1024, 10k steps.

  jip2p-train --config=configs/ip2p_sd15.py:init=/models/sd15,data=/data/ip2p-shards \
      --workdir=gs://bucket/runs/ip2p_sd15

Expect: the SD 1.5 UNet's conv_in grown to 8 channels (new ones zero), AdamW 1e-4 constant, EMA
0.9999, 5/5/5% conditioning dropout, random flip and a 256–288 resize then 256 crop; a global batch
of 1024 = 32 per device × devices × grad_accum (8 A100s or a v4-8/v5e-8 slice: grad_accum 4). The
logged loss (ε MSE at random timesteps) is noisy and decreases slowly. On 16 GB chips (v5e) use
FSDP: ``fsdp=8``. EMA weights are exported to <workdir>/export/ema, a diffusers folder for
jip2p-edit or diffusers.

Known: the paper trained this recipe 10,000 steps at batch 1024 in 25.5 h on 8× A100-40GB. The
UNet's training FLOPs per image at 256 px are 541.7 GFLOP (forward + backward, PyTorch's
FlopCounterMode; bench/RESULTS.md), so a step of 1024 images is ≈ 555 TFLOP. Its train state
(parameters, EMA and the two AdamW moments of 859.5M parameters, float32) holds 13.8 GB
(tests/train/test_parts.py), split 8 ways with ``fsdp=8``.
Per-device memory (``jip2p-bench --memory configs/ip2p_sd15.py --preset sd15 --fsdp 1,4,8
--memory-remat off``, the CPU compiler's estimate; README "What fits where"): 24.2 GiB at 1 image
per device + 1.2 GiB per image without FSDP (largest per-device batch: 7 on 32 GB, 48 on 80 GB),
5.8 GiB + 1.5 GiB per image with ``fsdp=8`` (7 on a 16 GB v5e).
Not yet measured with jip2p: a step's time and MFU on any accelerator, peak memory on one, and
the loss curve and edits of a full run (no GPU or TPU run has been made).

Arguments (``configs/ip2p_sd15.py:key=value,…``): init (SD 1.5 diffusers folder), data (folder of
training shards), res, batch (global), accum, fsdp, steps.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, init="", data="", res=256, batch=1024, accum=4, fsdp=1,
                           steps=10_000)
  c = config_lib.base_config()
  c.model.init = a["init"]
  c.model.family = "sd"
  c.data.path = a["data"]
  c.data.res = a["res"]
  c.data.resize_min = a["res"]
  c.data.resize_max = a["res"] * 288 // 256
  c.batch_size = a["batch"]
  c.grad_accum = a["accum"]
  c.mesh.fsdp = a["fsdp"]
  c.total_steps = a["steps"]
  return c
