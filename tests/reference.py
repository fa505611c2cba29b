"""PyTorch reference models for parity tests (torch side only: never import from a tf test).

Builds random-weight diffusers / transformers models at jip2p's preset shapes and saves them as an
ordinary diffusers pipeline folder, so that tests go through the real checkpoint path.
"""

from __future__ import annotations

import os

import torch

from jip2p.checkpoints import preset_configs
from jip2p.tokenizer import CLIPTokenizer


def _kwargs(config: dict) -> dict:
  return {k: v for k, v in config.items()
          if not k.startswith("_") and k not in ("architectures", "model_type")}


def torch_components(preset: str = "tiny", *, unet_in_channels: int = 8, seed: int = 0):
  """(unet, vae, text_encoder) as random diffusers/transformers modules, in eval mode."""
  import diffusers
  import transformers
  configs = preset_configs(preset, unet_in_channels=unet_in_channels)
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**_kwargs(configs["unet"]))
  vae = diffusers.AutoencoderKL(**_kwargs(configs["vae"]))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(configs["text_encoder"])))
  for m in (unet, vae, text):
    m.eval()
  return unet, vae, text


def torch_pipeline(preset: str = "tiny", *, unet_in_channels: int = 8, seed: int = 0):
  """A random diffusers InstructPix2Pix (8 channels) or text-to-image pipeline."""
  import diffusers
  import transformers
  unet, vae, text = torch_components(preset, unet_in_channels=unet_in_channels, seed=seed)
  tok_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"jip2p-tokenizer-{os.getpid()}")
  CLIPTokenizer.default().write_folder(tok_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(
      preset_configs(preset)["scheduler"])
  cls = (diffusers.StableDiffusionInstructPix2PixPipeline if unet_in_channels == 8
         else diffusers.StableDiffusionPipeline)
  return cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
             safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_torch_pipeline(folder: str, preset: str = "tiny", *, unet_in_channels: int = 8,
                        seed: int = 0) -> str:
  torch_pipeline(preset, unet_in_channels=unet_in_channels, seed=seed).save_pretrained(folder)
  return folder


def torch_sdxl_pipeline(preset: str = "tiny-sdxl", *, unet_in_channels: int = 8, seed: int = 0):
  """A random diffusers SDXL InstructPix2Pix (8 channels) or text-to-image pipeline at a preset's
  shapes: CLIP ViT-L's tokenizer padded with <|endoftext|>, tokenizer_2 with "!" (bigG's)."""
  import diffusers
  import transformers
  configs = preset_configs(preset, unet_in_channels=unet_in_channels)
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**_kwargs(configs["unet"]))
  vae = diffusers.AutoencoderKL(**_kwargs(configs["vae"]))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(configs["text_encoder"])))
  text_2 = transformers.CLIPTextModelWithProjection(
      transformers.CLIPTextConfig(**_kwargs(configs["text_encoder_2"])))
  tok_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"jip2p-tokenizers-{os.getpid()}")
  CLIPTokenizer.default().write_folder(os.path.join(tok_dir, "tokenizer"))
  CLIPTokenizer.open_clip().write_folder(os.path.join(tok_dir, "tokenizer_2"))
  tokenizers = [transformers.CLIPTokenizer.from_pretrained(os.path.join(tok_dir, name))
                for name in ("tokenizer", "tokenizer_2")]
  scheduler = diffusers.EulerDiscreteScheduler.from_config(configs["scheduler"])
  cls = (diffusers.StableDiffusionXLInstructPix2PixPipeline if unet_in_channels == 8
         else diffusers.StableDiffusionXLPipeline)
  return cls(vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
             tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet.eval(),
             scheduler=scheduler, add_watermarker=False)


def assert_pairwise_different(images, labels, margin: float = 4 / 255) -> None:
  """Each two of ``images`` (float arrays in [0, 1]) differ somewhere by more than ``margin``:
  a parity check over several settings is then about settings that matter."""
  for a in range(len(images)):
    for b in range(a):
      assert abs(images[a] - images[b]).max() > margin, (labels[a], labels[b])
