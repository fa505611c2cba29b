r"""InstructPix2Pix on Stable Diffusion 1.5 at 512 px (the editing resolution), batch 1024.

  jip2p-train --config=configs/ip2p_sd15_512.py:init=/models/sd15,data=/data/ip2p-shards \
      --workdir=gs://bucket/runs/ip2p_sd15_512

Expect: the paper's recipe at 4× the pixels: the UNet costs ≈4.6× more per image (2470 vs 542
GFLOP fwd+bwd), so rematerialisation is on and the default is 16 per device × 8 devices ×
grad_accum 8. Pass ``fsdp=8`` on 16 GB chips. Starting from a 256 px InstructPix2Pix run
(init=<its export>) a few thousand steps adapt it to 512 px.

Known: 2470 GFLOP per image for the UNet's forward + backward at 512 px (PyTorch's
FlopCounterMode; bench/RESULTS.md), ≈ 2.5 PFLOP per step of 1024; the train state of ip2p_sd15.py
(13.8 GB float32). The paper trained at 256 px only (10,000 steps, 25.5 h on 8× A100-40GB): it
gives no time for this config.
Per-device memory (``jip2p-bench --memory configs/ip2p_sd15_512.py --preset sd15 --fsdp 1,4,8
--memory-remat on``, the CPU compiler's estimate with the xla attention; README "What fits
where"): 35.0 GiB at 1 image per device + 11.0 GiB per image without FSDP (largest per-device
batch: 5 on 80 GB), 15.5 GiB + 10.8 GiB per image with ``fsdp=8`` (1 on a 16 GB v5e, 6 on 80 GB).
Not yet measured with jip2p: step time, MFU and peak memory on any accelerator (with
rematerialisation), and how many steps the adaptation from 256 px takes.

Arguments: init, data, batch, accum, fsdp, steps.
"""

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, init="", data="", batch=1024, accum=8, fsdp=1, steps=10_000)
  c = config_lib.base_config()
  c.model.init = a["init"]
  c.model.family = "sd"
  c.model.remat = True
  c.data.path = a["data"]
  c.data.res = c.data.resize_min = 512
  c.data.resize_max = 576
  c.batch_size = a["batch"]
  c.grad_accum = a["accum"]
  c.mesh.fsdp = a["fsdp"]
  c.total_steps = a["steps"]
  c.eval.num_images = 2
  return c
