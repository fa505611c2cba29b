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

import ml_collections

from jip2p.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, model="", clip="", candidates=100, steps=100, batch=8, res=512,
                           mode="ip2p")
  c = ml_collections.ConfigDict()
  c.model = a["model"]  # a diffusers-format SD folder (text-to-image UNet)
  c.compute_dtype = "float32"
  c.steps = a["steps"]
  c.height = c.width = a["res"]
  c.candidates = a["candidates"]  # per prompt
  c.batch_size = a["batch"]  # candidate pairs per batch (over all devices), across prompts
  c.seed = 0  # candidate seeds = f(seed, prompt line number)
  c.mode = a["mode"]  # "ip2p" (self-attention sharing) or "p2p" (Prompt-to-Prompt, c.p2p)

  # Prompt-to-Prompt's options (mode="p2p"); not type-safe: several fields take several forms.
  c.p2p = ml_collections.ConfigDict(type_safe=False)
  c.p2p.edit = "auto"  # "replace" (word swap), "refine", "none", or "auto": replace if the
  #                      captions have the same number of words, else refine
  c.p2p.cross_replace_steps = 0.8  # fraction f = (0, f), (start, end), or {word: window,
  #                                  "default_": window} over the edited caption's words
  c.p2p.self_replace_steps = 0.4  # fraction or (start, end)
  c.p2p.reweight = {}  # {word of the edited caption: attention scale} (the equalizer)
  c.p2p.blend_words = None  # LocalBlend: (words of caption 0, words of caption 1)
  c.p2p.blend_threshold = 0.3
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
