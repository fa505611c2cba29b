r"""InstructPix2Pix paired-image generation with Stable Diffusion 1.5 (the paper's settings).

  jip2p-generate --config configs/generate_sd15.py:model=/models/sd15,clip=/models/ViT-L-14.pt \
      --prompts gpt-generated-prompts.jsonl --out /data/ip2p-gen [--partition 0 --num-partitions 8]

Expect: per prompt 100 candidates (Euler ancestral, 100 steps, 512 px, p ~ U(0.1, 0.9),
CFG ~ U(7.5, 15), self-attention logit sharing), scored by OpenAI CLIP ViT-L/14 in the sidecar,
kept when sim_image ≥ 0.75, sim_direction ≥ 0.2, sim_0, sim_1 ≥ 0.2, best 4 by direction; about
a quarter of the prompts keep nothing. Rerun the same command to resume after a crash.

Arguments (``configs/generate_sd15.py:key=value,…``): model, clip, candidates, steps, batch, res.
"""

import ml_collections

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="", clip="", candidates=100, steps=100, batch=8, res=512)
  c = ml_collections.ConfigDict()
  c.model = a["model"]  # a diffusers-format SD folder (text-to-image UNet)
  c.compute_dtype = "float32"
  c.steps = a["steps"]
  c.height = c.width = a["res"]
  c.candidates = a["candidates"]  # per prompt
  c.batch_size = a["batch"]  # candidate pairs per device batch, across prompts
  c.seed = 0  # candidate seeds = f(seed, prompt line number)
  c.mode = "ip2p"  # or "p2p" (Prompt-to-Prompt with default options)
  c.min_p, c.max_p = 0.1, 0.9
  c.min_cfg, c.max_cfg = 7.5, 15.0

  c.filter = ml_collections.ConfigDict()
  c.filter.min_sim_image = 0.75  # the paper; the original code used 0.7
  c.filter.min_sim_direction = 0.2
  c.filter.min_sim_0 = 0.2
  c.filter.min_sim_1 = 0.2
  c.filter.top_k = 4

  c.clip = ml_collections.ConfigDict()
  c.clip.weights = a["clip"]  # local file: OpenAI's ViT-L-14.pt, safetensors or a state dict
  c.clip.model = "ViT-L-14-quickgelu"  # open_clip architecture
  c.clip.config = ""  # or an open_clip model config JSON (overrides model)
  c.clip.device = "auto"
  c.clip.precision = "fp32"
  c.clip.batch_size = 32
  c.clip.timeout = 300.0
  c.clip.start_timeout = 600.0

  c.output = ml_collections.ConfigDict()
  c.output.name = "jip2p_triplets"
  c.output.split = "train"
  c.output.examples_per_shard = 1000
  c.output.image_format = "jpeg"
  c.output.jpeg_quality = 95

  c.show_attention_steps = 50
  return c
