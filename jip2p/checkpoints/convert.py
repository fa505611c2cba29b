"""Single-file checkpoints in the original CompVis / LDM layout → diffusers-format folders.

Covers ``v1-5-pruned-emaonly.ckpt``-style SD 1.x files, SD 2.x (OpenCLIP text encoder) files and
the released ``instruct-pix2pix-00-22000.ckpt`` (8 input channels, EMA and raw weights).
The key renaming is diffusers' own (``diffusers.loaders.single_file_utils``); the configurations
come from jip2p's presets with the input channels read off the weights, so nothing is fetched
from a hub. This needs torch, so `convert_single_file` runs `convert_file` in a separate process,
the ``jip2p-convert`` console script (`jip2p.cli.convert`).

Pickle files (``.ckpt``/``.pt``/``.bin``) are opened with ``torch.load(weights_only=True)``: a file
that holds anything but tensors and plain containers is refused, never executed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

from jip2p.checkpoints import conv_in
from jip2p.checkpoints.folders import Pipeline, build_component, save_pipeline
from jip2p.checkpoints.mapping import load_torch_state_dict
from jip2p.checkpoints.presets import preset_configs
from jip2p.errors import CheckpointError
from jip2p.models import clip_text
from jip2p.tokenizer import CLIPTokenizer

_UNET_PREFIX = "model.diffusion_model."
_OPEN_CLIP_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
_CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def convert_single_file(src: str, dst: str, *, preset: str | None = None, extract_ema: bool = True,
                        expand_conv_in: int | None = None, overwrite: bool = False,
                        dtype: str = "float32") -> str:
  """Converts ``src`` to a diffusers pipeline folder ``dst`` (weights as ``dtype``, one of
  `SAVE_DTYPES`) in a child process; returns ``dst``.

  Raises `CheckpointError` with the child's message when the conversion fails.
  """
  cmd = [sys.executable, "-m", "jip2p.cli.convert", src, dst]
  cmd += ["--preset", preset] if preset else []
  cmd += [] if extract_ema else ["--no-ema"]
  cmd += ["--expand-conv-in", str(expand_conv_in)] if expand_conv_in else []
  cmd += ["--overwrite"] if overwrite else []
  cmd += ["--dtype", dtype]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
    raise CheckpointError(lines[-1] if lines else f"conversion of {src} failed")
  return dst


def read_single_file(path: str) -> dict:
  """The flat tensor dict of a single-file checkpoint (``state_dict`` unwrapped)."""
  import torch
  from safetensors.torch import load_file
  if not os.path.isfile(path):
    raise CheckpointError(f"missing checkpoint file: {path}")
  if path.endswith(".safetensors"):
    state = load_file(path)
  else:
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise CheckpointError(
          f"{path}: refusing to unpickle it (only tensors and plain containers are loaded, "
          f"never code): {str(e).splitlines()[0]}") from None
  state = state.get("state_dict", state)
  if not any(k.startswith(_UNET_PREFIX) for k in state):
    raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint in the original layout "
                          f"(no '{_UNET_PREFIX}*' weights)")
  return state


def _torch_to_numpy(state: dict) -> dict:
  import torch
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()
          if isinstance(v, torch.Tensor)}


def detect_preset(state: dict) -> str:
  """sd15 or sd21, by the text encoder the file carries."""
  if _OPEN_CLIP_KEY in state:
    return "sd21"
  if _CLIP_KEY in state:
    return "sd15"
  raise CheckpointError("unrecognised text encoder: neither the CLIP ViT-L/14 (SD 1.x) nor the "
                        "OpenCLIP ViT-H (SD 2.x) weights are present")


def convert_state(state: dict, *, preset: str | None = None, extract_ema: bool = True):
  """A single-file state dict → jip2p `Pipeline`.

  ``preset`` names the architecture (see `jip2p.checkpoints.PRESETS`); by default SD 1.x or 2.x is
  detected from the text encoder. The UNet's input channels are read off the weights.
  """
  from diffusers.loaders import single_file_utils as sfu  # torch: this process only

  preset = preset or detect_preset(state)
  in_channels = int(state[_UNET_PREFIX + "input_blocks.0.0.weight"].shape[1])
  configs = preset_configs(preset, unet_in_channels=in_channels)
  unet_sd = sfu.convert_ldm_unet_checkpoint(state, configs["unet"], extract_ema=extract_ema)
  vae_sd = sfu.convert_ldm_vae_checkpoint(state, configs["vae"])
  if _OPEN_CLIP_KEY in state:
    # diffusers reads only text_model.config.hidden_size from its model argument.
    hidden = configs["text_encoder"]["hidden_size"]
    text_sd = sfu.convert_open_clip_checkpoint(
        types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=hidden)), state)
  else:
    text_sd = clip_text.canonical_state_dict(sfu.convert_ldm_clip_checkpoint(state))
  modules = {}
  for name, sd in (("unet", unet_sd), ("vae", vae_sd), ("text_encoder", text_sd)):
    modules[name] = build_component(configs[name], abstract=True, where=f"{preset}/{name}")
    load_torch_state_dict(modules[name], _torch_to_numpy(sd), source=f"converted {name}")
  tokenizer = CLIPTokenizer.default()
  if _OPEN_CLIP_KEY in state:  # SD 2.x pads with "!" (id 0)
    tokenizer = CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad_token="!")
  return Pipeline(unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
                  tokenizer=tokenizer, scheduler_config=configs["scheduler"])


def convert_file(src: str, dst: str, *, preset: str | None = None, extract_ema: bool = True,
                 expand_conv_in: int | None = None, overwrite: bool = False,
                 dtype: str = "float32") -> Pipeline:
  """`convert_single_file`'s work, in this process (which needs torch); returns the pipeline
  written to ``dst``."""
  if os.path.exists(dst) and not overwrite:
    raise CheckpointError(f"{dst} exists; pass --overwrite to replace it")
  pipeline = convert_state(read_single_file(src), preset=preset, extract_ema=extract_ema)
  if expand_conv_in and expand_conv_in != pipeline.unet.config.in_channels:
    pipeline.unet = conv_in.expand_conv_in(pipeline.unet, expand_conv_in)
  save_pipeline(pipeline, dst, overwrite=overwrite, dtype=dtype)
  return pipeline
