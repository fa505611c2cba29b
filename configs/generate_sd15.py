r"""InstructPix2Pix paired-image generation with Stable Diffusion 1.5 (the paper's settings).

  jip2p-generate --config configs/generate_sd15.py:model=/models/sd15,clip=/models/ViT-L-14.pt \
      --prompts gpt-generated-prompts.jsonl --out /data/ip2p-gen [--partition 0 --num-partitions 8]

Expect: per prompt 100 candidates (Euler ancestral, 100 steps, 512 px, p ~ U(0.1, 0.9),
CFG ~ U(7.5, 15), self-attention logit sharing), scored by OpenAI CLIP ViT-L/14 in the sidecar,
kept when sim_image ≥ 0.75, sim_direction ≥ 0.2, sim_0, sim_1 ≥ 0.2, best 4 by direction; about
a quarter of the prompts keep nothing. Rerun the same command to resume after a crash.

Prompt-to-Prompt instead of attention sharing: ``mode=p2p``; ``config.p2p`` holds the options of
every prompt, and a prompts line may replace some of them with its own ``"p2p"`` object, e.g.
``{"input": …, "edit": …, "output": …, "p2p": {"edit": "refine", "cross_replace_steps": 0.6}}``
(a bad object skips the line, counted with its line number). Per-prompt options are data to the
compiled program: prompts with different options share batches.

Arguments (``configs/generate_sd15.py:key=value,…``): model, clip, candidates, steps, batch, res,
mode. With several devices, candidates are sharded over all of them: make batch a multiple of
the device count (otherwise only gcd(batch, devices) of them are used).
"""

from jip2p.p2p import generation_config
from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="", clip="", candidates=100, steps=100, batch=8, res=512,
                           mode="ip2p")
  c = generation_config.base_config()
  c.model = a["model"]
  c.clip.weights = a["clip"]
  c.steps = a["steps"]
  c.height = c.width = a["res"]
  c.candidates = a["candidates"]
  c.batch_size = a["batch"]
  c.mode = a["mode"]
  return c
