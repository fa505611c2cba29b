"""Model configurations jip2p knows by name, and random pipeline folders built from them.

No weights can be downloaded here, so tests, benchmarks and smoke runs start from random models at
the real Stable Diffusion 1.5 shapes (``sd15``) or at a tiny size (``tiny``), written as ordinary
diffusers-format folders by JAX alone. ``sdxl`` (SDXL base 1.0's shapes) and ``tiny-sdxl`` have
a second text encoder (``text_encoder_2``: OpenCLIP bigG's layout, with its projection).
"""

from __future__ import annotations

import copy

import jax.numpy as jnp

from jip2p.checkpoints.folders import Pipeline, build_component, save_pipeline
from jip2p.errors import ConfigError
from jip2p.tokenizer import CLIPTokenizer

# The scheduler InstructPix2Pix edits with: Euler ancestral, scaled_linear (docs/design.md §1).
SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "linspace",
}

_SD15_TEXT = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

_SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# SDXL base 1.0: the UNet attends to both text encoders' states (768 + 1280) and adds the
# text_time embedding of bigG's projected pooled text (1280) and 6 time ids × 256 sinusoids.
_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
_SDXL_VAE = {**_SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
_SDXL_TEXT = {**_SD15_TEXT, "pad_token_id": 1}
_SDXL_TEXT_2 = {**_SDXL_TEXT, "architectures": ["CLIPTextModelWithProjection"],
                "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}
# SDXL's scheduler: Euler, "leading" timesteps.
_SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}

PRESETS = {
    "sd15": {"unet": _SD15_UNET, "vae": _SD15_VAE, "text_encoder": _SD15_TEXT},
    "sdxl": {"scheduler": _SDXL_SCHEDULER, "unet": _SDXL_UNET, "vae": _SDXL_VAE,
             "text_encoder": _SDXL_TEXT, "text_encoder_2": _SDXL_TEXT_2},
    # SD 2.x base (512 px, epsilon prediction): OpenCLIP ViT-H text encoder cut to 23 layers.
    "sd21": {
        "unet": {**_SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                 "use_linear_projection": True},
        "vae": _SD15_VAE,
        "text_encoder": {**_SD15_TEXT, "hidden_size": 1024, "intermediate_size": 4096,
                         "num_attention_heads": 16, "num_hidden_layers": 23,
                         "hidden_act": "gelu", "projection_dim": 512},
    },
    "tiny": {
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "attention_head_dim": 8, "block_out_channels": [32, 64],
            "cross_attention_dim": 32,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": 32, "flip_sin_to_cos": True, "freq_shift": 0,
        },
        "vae": {
            "_class_name": "AutoencoderKL",
            "block_out_channels": [32, 64], "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32,
            "sample_size": 64, "scaling_factor": 0.18215,
        },
        "text_encoder": {**_SD15_TEXT, "hidden_size": 32, "intermediate_size": 37,
                         "num_attention_heads": 4, "num_hidden_layers": 2,
                         "projection_dim": 32},
    },
    # SDXL's layout at tiny widths: text states 32 + 48 wide, pooled text 40 + 6 time ids × 8.
    # The two encoders differ in width, as SDXL's do (single-file loaders tell them apart so).
    "tiny-sdxl": {
        "scheduler": _SDXL_SCHEDULER,
        "unet": {**_SDXL_UNET, "addition_time_embed_dim": 8, "attention_head_dim": [2, 4],
                 "block_out_channels": [32, 64], "cross_attention_dim": 80,
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                 "projection_class_embeddings_input_dim": 88, "sample_size": 32,
                 "transformer_layers_per_block": [1, 2]},
        "vae": {**_SDXL_VAE, "block_out_channels": [32, 64],
                "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                "sample_size": 64},
        "text_encoder": {**_SDXL_TEXT, "hidden_size": 32, "intermediate_size": 37,
                         "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 32},
        "text_encoder_2": {**_SDXL_TEXT_2, "hidden_size": 48, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_hidden_layers": 3,
                           "projection_dim": 40},
    },
    # The procedural edit world (jip2p.data.synthetic, 32 px): the exact pixel codec in the VAE's
    # place (patch 1: latents are the 32×32×3 pixels) and a small 3-level UNet and text encoder.
    # v-prediction: a small model's ε error at the first sampling steps is amplified by σ ≈ 14.6
    # into its x0 estimate, and samples never recover from that start; v's is not.
    "world": {
        "scheduler": {"prediction_type": "v_prediction"},
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "attention_head_dim": 8, "block_out_channels": [32, 64, 64],
            "cross_attention_dim": 64,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
            "norm_num_groups": 32, "sample_size": 32, "flip_sin_to_cos": True, "freq_shift": 0,
        },
        "vae": {"_class_name": "PixelCodec", "in_channels": 3, "patch_size": 1,
                "scaling_factor": 1.0, "sample_size": 32},
        "text_encoder": {**_SD15_TEXT, "hidden_size": 64, "intermediate_size": 128,
                         "num_attention_heads": 4, "num_hidden_layers": 2,
                         "projection_dim": 64},
    },
}


# Random-initialisation choices beyond a preset's configs: per component, `random_init`'s
# embedding standard deviations. The world's text encoder stays random and frozen (no pretrained
# one exists for it), so its features are all the UNet can read. At transformers' 0.02 its token
# and position embeddings are equally small, every feature depends on where the words sit, and a
# UNet trained on the training wordings did not read the held-out ones: on the background family
# after 800 steps the requested colour appeared in 12-16% of held-out edits (44-66% with training
# wordings). Token embeddings at 1.0 (PyTorch's nn.Embedding default) dominate the positions;
# the same run then shows the requested colour in 97-100% of held-out edits (bench/RESULTS.md).
RANDOM_INIT = {"world": {"text_encoder": {"token_embedding": 1.0}}}


def preset_configs(preset: str, *, unet_in_channels: int = 4) -> dict[str, dict]:
  """Deep copies of a preset's component configs, the UNet set to ``unet_in_channels``."""
  if preset not in PRESETS:
    raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
  configs = copy.deepcopy(PRESETS[preset])
  configs["unet"]["in_channels"] = unet_in_channels
  configs["scheduler"] = {**SCHEDULER, **configs.get("scheduler", {})}
  return configs


def random_pipeline(preset: str = "tiny", *, unet_in_channels: int = 8, seed: int = 0,
                    dtype=jnp.float32) -> Pipeline:
  """A randomly initialised `Pipeline` (`random_init`, with the preset's `RANDOM_INIT`) at a
  preset's shapes."""
  configs = preset_configs(preset, unet_in_channels=unet_in_channels)
  init = RANDOM_INIT.get(preset, {})
  make = lambda name, i: build_component(configs[name], dtype=dtype, seed=seed + i,
                                         where=f"preset {preset}/{name}",
                                         embedding_std=init.get(name))
  sdxl = ({"text_encoder_2": make("text_encoder_2", 3), "tokenizer_2": CLIPTokenizer.open_clip()}
          if "text_encoder_2" in configs else {})
  return Pipeline(unet=make("unet", 0), vae=make("vae", 1), text_encoder=make("text_encoder", 2),
                  tokenizer=CLIPTokenizer.default(), scheduler_config=configs["scheduler"], **sdxl)


def create_random_pipeline(folder: str, preset: str = "tiny", *, unet_in_channels: int = 8,
                           seed: int = 0, overwrite: bool = False) -> str:
  """Writes a random diffusers-format pipeline folder; returns its path."""
  save_pipeline(random_pipeline(preset, unet_in_channels=unet_in_channels, seed=seed), folder,
                overwrite=overwrite)
  return folder
