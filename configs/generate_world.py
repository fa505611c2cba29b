r"""Paired generation in the procedural world: the paper's stage 2 on the world's own models.

  jip2p-generate --config configs/generate_world.py:model=BASE --prompts world-prompts.jsonl \
      --out /tmp/world-pairs

BASE is a world text-to-image model (configs/synthetic_t2i.py's export); the CLIP is the world
CLIP shipped in data/world-clip (open_clip format), the default of ``clip`` and ``clip_config``.

Expect: 16 candidates per prompt at 32 px (Euler ancestral, 50 steps, p ~ U(0.1, 0.9) as the
paper, text guidance ~ U(2, 5)), scored by the world CLIP in the sidecar; with the default
thresholds (all -1, top_k 0) every candidate is written: the all-candidates dataset that
``python -m jip2p.p2p.world score`` scores exactly and ``... thresholds`` calibrates the filter
on. Not yet measured: the fraction of exact pairs and the filter's precision and recall (the
world text-to-image model, configs/synthetic_t2i.py, is still being trained).

Prompts come from ``python -m jip2p.p2p.world prompts --num N --seed S --out FILE`` (one seed to
calibrate the thresholds, another to check them). Images are PNG: JPEG's error would move the
colours the exact scores read. The CLIP sidecar runs on the CPU (the world CLIP is small; JAX
holds the accelerator).

Arguments (``configs/generate_world.py:key=value,…``): model, clip, clip_config, candidates,
steps, batch, res, mode (ip2p or p2p), min_cfg, max_cfg (the world editor works best at text
guidance 3; the base model's best guidance is not measured), min_sim_image, min_sim_direction,
min_sim_0, min_sim_1, top_k (0: every candidate that passes), seed, shard.
"""

import os

from jip2p.p2p import generation_config
from jip2p.train import config as config_lib

WORLD_CLIP = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "data", "world-clip"))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="",
                           clip=os.path.join(WORLD_CLIP, "world-clip.safetensors"),
                           clip_config=os.path.join(WORLD_CLIP, "world-clip.json"), candidates=16, steps=50,
                           batch=32, res=32, mode="ip2p", min_cfg=2.0, max_cfg=5.0,
                           min_sim_image=-1.0, min_sim_direction=-1.0, min_sim_0=-1.0,
                           min_sim_1=-1.0, top_k=0, seed=0, shard=1000)
  c = generation_config.base_config()
  c.model = a["model"]
  c.steps = c.show_attention_steps = a["steps"]
  c.height = c.width = a["res"]
  c.candidates = a["candidates"]
  c.batch_size = a["batch"]
  c.seed = a["seed"]
  c.mode = a["mode"]
  c.min_p, c.max_p = 0.1, 0.9
  c.min_cfg, c.max_cfg = float(a["min_cfg"]), float(a["max_cfg"])
  c.clip.weights = a["clip"]
  c.clip.config = a["clip_config"]
  c.clip.device = "cpu"
  for key in ("min_sim_image", "min_sim_direction", "min_sim_0", "min_sim_1"):
    c.filter[key] = float(a[key])
  c.filter.top_k = a["top_k"] or a["candidates"]  # every candidate: the filter's top_k has no "all"
  c.output.name = "world_pairs"
  c.output.examples_per_shard = a["shard"]
  c.output.image_format = "png"
  return c
