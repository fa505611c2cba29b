r"""InstructPix2Pix paired-image generation with SDXL base 1.0 (the paper's recipe at 1024 px).

  jip2p-generate --config configs/generate_sdxl.py:model=/models/sdxl,clip=/models/ViT-L-14.pt \
      --prompts gpt-generated-prompts.jsonl --out /data/ip2p-gen-sdxl [--partition 0 \
      --num-partitions 8]

Expect: what configs/generate_sd15.py gives, at SDXL's 1024 px: per prompt 100 candidates (Euler
ancestral on the discrete grid, 100 steps, p ~ U(0.1, 0.9), CFG ~ U(7.5, 15), self-attention
logit sharing in all of SDXL's transformer layers), both text encoders, the pooled text and the
micro-conditioning of a generated image (original size = target size = the image's, crop (0, 0)),
the empty caption as zeros (SDXL base's force_zeros_for_empty_prompt), scored by OpenAI CLIP
ViT-L/14 in the sidecar with the paper's thresholds. ``dtype=bfloat16`` computes in bfloat16 (the
VAE stays float32: its config's force_upcast); ``vae=`` puts another VAE folder in its place.

Prompt-to-Prompt instead of attention sharing: ``mode=p2p`` (see configs/generate_sd15.py); at
1024 px LocalBlend reads, and self-attention maps are replaced at, SDXL's coarsest down/up level
(32×32 queries), as at SD 1.5's 16×16 at 512 px.

Arguments (``configs/generate_sdxl.py:key=value,…``): model, clip, vae, candidates, steps, batch,
res, mode, dtype. With several devices, candidates are sharded over all of them: make batch a
multiple of the device count (otherwise only gcd(batch, devices) of them are used).
"""

from jip2p.p2p import generation_config
from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="", clip="", vae="", candidates=100, steps=100, batch=4,
                           res=1024, mode="ip2p", dtype="float32")
  c = generation_config.base_config()
  c.model = a["model"]
  c.vae = a["vae"]
  c.clip.weights = a["clip"]
  c.compute_dtype = a["dtype"]
  c.steps = a["steps"]
  c.height = c.width = a["res"]
  c.candidates = a["candidates"]
  c.batch_size = a["batch"]
  c.mode = a["mode"]
  return c
