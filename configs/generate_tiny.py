r"""Paired generation on a tiny random model: for tests and smoke runs, seconds on a CPU.

  jip2p-generate --config configs/generate_tiny.py:model=/tmp/tiny_sd,clip=/tmp/clip.pt,\
clip_config=/tmp/clip.json --prompts data/prompts.jsonl --out /tmp/gen

Expect: 4 candidates per prompt, 3 steps at 32 px, every candidate passing (thresholds at -1),
the best 2 by CLIP direction kept: 2 records per prompt.

Arguments: model, clip, clip_config, candidates, steps, batch, res, top_k, shard, mode.
"""

from jip2p.p2p import generation_config
from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="", clip="", clip_config="", candidates=4, steps=3,
                           batch=3, res=32, top_k=2, shard=1000, mode="ip2p")
  c = generation_config.base_config()
  c.model = a["model"]
  c.steps = c.show_attention_steps = a["steps"]
  c.height = c.width = a["res"]
  c.candidates = a["candidates"]
  c.batch_size = a["batch"]
  c.mode = a["mode"]
  c.clip.weights = a["clip"]
  c.clip.config = a["clip_config"]
  c.clip.device = "cpu"
  c.clip.start_timeout = 120.0
  for key in ("min_sim_image", "min_sim_direction", "min_sim_0", "min_sim_1"):
    c.filter[key] = -1.0
  c.filter.top_k = a["top_k"]
  c.output.examples_per_shard = a["shard"]
  c.output.image_format = "png"
  return c
