"""The generation config schema, and the checks that turn a bad config into one clear error.

Every ``configs/generate_*.py`` starts from `base_config()` (the paper's settings) and changes
values, as training configs start from `jip2p.train.config.base_config`. `validate` rejects keys
the schema does not know and values of the wrong type (`jip2p.config_schema`), values out of
range, and a model folder that is not there; `from_config` gives the driver
(`jip2p.p2p.dataset`) its typed `GenerationConfig`.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from jip2p.config_schema import check_keys
from jip2p.errors import ConfigError
from jip2p.p2p import filter as filter_lib
from jip2p.p2p import sampling

COMPUTE_DTYPES = ("float32", "bfloat16")
IMAGE_FORMATS = ("jpeg", "png")


def base_config() -> ml_collections.ConfigDict:
  """All keys a generation config may have, with InstructPix2Pix's values (SD 1.5, 512 px)."""
  c = ml_collections.ConfigDict()
  c.model = ""  # a diffusers-format SD folder (text-to-image UNet)
  c.vae = ""  # a VAE folder (or a model folder's vae/) in the model's VAE's place
  c.compute_dtype = "float32"
  c.steps = 100  # Euler ancestral on the discrete grid
  c.height = c.width = 512
  c.candidates = 100  # per prompt
  c.batch_size = 8  # candidate pairs per batch (over all devices), across prompts
  c.seed = 0  # candidate seeds = f(seed, prompt line number)
  c.mode = "ip2p"  # "ip2p" (self-attention sharing) or "p2p" (Prompt-to-Prompt, c.p2p)

  # Prompt-to-Prompt's options (mode="p2p"), checked by `sampling.p2p_options`, not by type:
  # several fields take several forms. A prompt line's own "p2p" object replaces some of them.
  c.p2p = ml_collections.ConfigDict(type_safe=False)
  c.p2p.edit = "auto"  # "replace" (word swap), "refine", "none", or "auto": replace if the
  #                      captions have the same number of words, else refine
  c.p2p.cross_replace_steps = 0.8  # fraction f = (0, f), (start, end), or {word: window,
  #                                  "default_": window} over the edited caption's words
  c.p2p.self_replace_steps = 0.4  # fraction or (start, end)
  c.p2p.reweight = {}  # {word of the edited caption: attention scale} (the equalizer)
  c.p2p.blend_words = None  # LocalBlend: (words of caption 0, words of caption 1)
  c.p2p.blend_threshold = 0.3
  c.min_p, c.max_p = 0.1, 0.9  # p ~ U(min_p, max_p): the steps with shared self-attention
  c.min_cfg, c.max_cfg = 7.5, 15.0  # text guidance ~ U(min_cfg, max_cfg)

  c.filter = ml_collections.ConfigDict()
  c.filter.min_sim_image = 0.75  # the paper; the original code used 0.7
  c.filter.min_sim_direction = 0.2
  c.filter.min_sim_0 = 0.2
  c.filter.min_sim_1 = 0.2
  c.filter.top_k = 4

  c.clip = ml_collections.ConfigDict()
  c.clip.weights = ""  # local file: OpenAI's ViT-L-14.pt, safetensors or a state dict
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


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """The per-run choices of `jip2p.p2p.dataset.generate_dataset` (`from_config` builds them)."""

  candidates: int = 100
  batch_size: int = 8
  seed: int = 0
  mode: str = "ip2p"
  p2p: sampling.P2POptions = sampling.P2POptions()  # a prompt's own options take precedence
  min_p: float = 0.1
  max_p: float = 0.9
  min_cfg: float = 7.5
  max_cfg: float = 15.0
  filter: filter_lib.FilterConfig = filter_lib.FilterConfig()
  split: str = "train"
  image_format: str = "jpeg"
  jpeg_quality: int = 95

  def __post_init__(self):
    if self.candidates < 1 or self.batch_size < 1:
      raise ConfigError(f"candidates={self.candidates} and batch_size={self.batch_size} must be "
                        "positive")
    if self.mode not in sampling.MODES:
      raise ConfigError(f"mode={self.mode!r}: choose one of {sampling.MODES}")
    if self.image_format not in IMAGE_FORMATS:
      raise ConfigError(f"image_format={self.image_format!r}: choose one of {IMAGE_FORMATS}")


def from_config(config: ml_collections.ConfigDict) -> GenerationConfig:
  """The driver's settings of a generation config; raises `ConfigError` naming a bad value."""
  try:
    p2p = sampling.p2p_options(config.p2p.to_dict())
  except ConfigError as e:
    raise ConfigError(f"config.p2p: {e}") from e
  o = config.output
  return GenerationConfig(
      candidates=config.candidates, batch_size=config.batch_size, seed=config.seed,
      mode=config.mode, p2p=p2p, min_p=config.min_p, max_p=config.max_p,
      min_cfg=config.min_cfg, max_cfg=config.max_cfg,
      filter=filter_lib.FilterConfig(**config.filter.to_dict()), split=o.split,
      image_format=o.image_format, jpeg_quality=o.jpeg_quality)


def validate(config: ml_collections.ConfigDict, *, scoring: bool = True) -> None:
  """Checks before any work: keys, types, values, the model folder, and (``scoring``: the run
  scores candidates, unlike ``--show-attention``) that CLIP weights are named. Whether the
  weights file loads is the sidecar's to say (`jip2p.sidecar.ClipScorer.start`)."""
  check_keys(config, base_config(), free=("p2p",))
  if not config.model or not os.path.isdir(config.model):
    raise ConfigError(f"model folder not found: {config.model!r} (set config.model, e.g. "
                      "configs/generate_sd15.py:model=/models/sd15)")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.compute_dtype={config.compute_dtype!r}; choose one of "
                      f"{COMPUTE_DTYPES}")
  if min(config.steps, config.show_attention_steps, config.height, config.width) < 1:
    raise ConfigError(f"config.steps={config.steps}, show_attention_steps="
                      f"{config.show_attention_steps}, height={config.height} and width="
                      f"{config.width} must be positive")
  if scoring and not config.clip.weights:
    raise ConfigError("no CLIP weights: set config.clip.weights to a local file (e.g. OpenAI's "
                      "ViT-L-14.pt)")
  from_config(config)
