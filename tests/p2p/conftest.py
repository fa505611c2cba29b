"""One tiny random Stable Diffusion folder for the pair-generation tests, written by diffusers and
read by jip2p (torch side: torch is imported inside the fixture only).

Its UNet has SD 1.5's shape of attention at a tiny width: attention at two levels (16×16 and
8×8 queries at 32 px), the mid block at 4×4, so that "the coarsest down/up level" (8×8) is a real
choice, as 16×16 is for SD 1.5 at 512 px. At PyTorch's default initialisation attention is nearly
uniform, and sharing it changes an image by about 3/255; the attention projections are scaled up
(q and k ×3, out ×2) so that attention control visibly changes the images.

And one tiny random SDXL text-to-image folder (tiny-sdxl's encoders, VAE and widths) with SDXL's
layout of attention: none in the first block, then per block more transformer layers (1, 2, 3)
and heads (1, 2, 4); at 32 px 8×8 and 4×4 queries, the mid block at 4×4 beside the coarsest
down/up level, as SDXL's at 1024 px is at 32×32.
"""

import os

import pytest

UNET = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "sample_size": 16,
}
UNET_SDXL = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": [1, 2, 4],
    "transformer_layers_per_block": [1, 2, 3],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "sample_size": 16,
}


def _kwargs(config: dict) -> dict:
  return {k: v for k, v in config.items()
          if not k.startswith("_") and k not in ("architectures", "model_type")}


def _sharpened(unet):
  """The UNet with its attention projections scaled up (module docstring)."""
  import torch
  with torch.no_grad():
    for name, module in unet.named_modules():
      if name.endswith(("attn1", "attn2")):
        module.to_q.weight.mul_(3.0)
        module.to_k.weight.mul_(3.0)
        module.to_out[0].weight.mul_(2.0)
  return unet


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
  """(folder, diffusers StableDiffusionPipeline) of random weights, float32, eval mode."""
  import diffusers
  import torch
  import transformers

  from jip2p.checkpoints import preset_configs
  from jip2p.tokenizer import CLIPTokenizer

  configs = preset_configs("tiny", unet_in_channels=4)
  torch.manual_seed(0)
  unet = _sharpened(diffusers.UNet2DConditionModel(**{**_kwargs(configs["unet"]), **UNET}).eval())
  vae = diffusers.AutoencoderKL(**_kwargs(configs["vae"])).eval()
  text = transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**_kwargs(configs["text_encoder"]))).eval()
  root = tmp_path_factory.mktemp("p2p")
  CLIPTokenizer.default().write_folder(os.fspath(root / "tokenizer"))
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, unet=unet,
      tokenizer=transformers.CLIPTokenizer.from_pretrained(os.fspath(root / "tokenizer")),
      scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config(configs["scheduler"]),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  folder = os.fspath(root / "sd")
  pipe.save_pretrained(folder)
  return folder, pipe


@pytest.fixture(scope="session")
def pipeline(sd_folder):
  from jip2p.checkpoints import load_pipeline
  return load_pipeline(sd_folder[0])


STEPS = 6


@pytest.fixture(scope="session")
def generator(pipeline):
  """One PairGenerator (6 steps, 32 px) for all modules, so that equal batch shapes compile once."""
  from jip2p.p2p import sampling
  return sampling.PairGenerator(pipeline, steps=STEPS, height=32, width=32)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
  """(folder, diffusers StableDiffusionXLPipeline) of random weights, float32, eval mode."""
  import diffusers
  import torch

  from jip2p.checkpoints import preset_configs
  from tests.reference import torch_sdxl_pipeline

  pipe = torch_sdxl_pipeline("tiny-sdxl", unet_in_channels=4, seed=1)
  torch.manual_seed(2)
  unet_config = {**_kwargs(preset_configs("tiny-sdxl", unet_in_channels=4)["unet"]), **UNET_SDXL}
  unet = _sharpened(diffusers.UNet2DConditionModel(**unet_config).eval())
  pipe = diffusers.StableDiffusionXLPipeline(**{**pipe.components, "unet": unet},
                                              add_watermarker=False)
  pipe.set_progress_bar_config(disable=True)
  folder = os.fspath(tmp_path_factory.mktemp("p2p_sdxl") / "sdxl")
  pipe.save_pretrained(folder)
  return folder, pipe


@pytest.fixture(scope="session")
def sdxl_generator(sdxl_folder):
  """A PairGenerator (6 steps, 32 px) of the SDXL folder."""
  from jip2p.checkpoints import load_pipeline
  from jip2p.p2p import sampling
  return sampling.PairGenerator(load_pipeline(sdxl_folder[0]), steps=STEPS, height=32, width=32)
