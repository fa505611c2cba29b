"""Single-file checkpoints in the original CompVis / LDM layout → diffusers-format folders.

Covers ``v1-5-pruned-emaonly.ckpt``-style SD 1.x files, SD 2.x (OpenCLIP text encoder) files and
the released ``instruct-pix2pix-00-22000.ckpt`` (8 input channels, EMA and raw weights).
The key renaming is diffusers' own (``diffusers.loaders.single_file_utils``); the configurations
come from jip2p's presets with the input channels read off the weights, so nothing is fetched
from a hub. This needs torch, so `convert_single_file` runs `convert_file` in a separate process,
the ``jip2p-convert`` console script (`jip2p.cli.convert`).

Pickle files (``.ckpt``/``.pt``/``.pth``/``.bin``) are opened with
``torch.load(weights_only=True)``: a file that holds anything but tensors and plain containers is
refused, never executed. Every problem with the file or the output folder is a one-line
`CheckpointError`; the paths are checked before the file is read, and the folder is written under
a temporary name, so an interrupted conversion leaves no ``dst`` behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import warnings

from jip2p.checkpoints import conv_in
from jip2p.checkpoints.folders import (Pipeline, build_component, check_output_folder,
                                      save_pipeline)
from jip2p.checkpoints.mapping import load_torch_state_dict
from jip2p.checkpoints.presets import preset_configs
from jip2p.errors import CheckpointError
from jip2p.models import clip_text
from jip2p.tokenizer import CLIPTokenizer

_UNET_PREFIX = "model.diffusion_model."
_OPEN_CLIP_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
_CLIP_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_COMPONENT_PREFIXES = {"UNet": _UNET_PREFIX, "VAE": "first_stage_model.",
                       "text encoder": "cond_stage_model."}
_CHILD_ERROR = "jip2p-convert: error: "  # how `jip2p.cli.run` prints a named error
# .safetensors, or a torch.save pickle under the names the released checkpoints use.
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def convert_single_file(src: str, dst: str, *, preset: str | None = None, extract_ema: bool = True,
                        expand_conv_in: int | None = None, overwrite: bool = False,
                        dtype: str = "float32") -> str:
  """Converts ``src`` to a diffusers pipeline folder ``dst`` (weights as ``dtype``, one of
  `SAVE_DTYPES`) in a child process; returns ``dst``.

  Raises `CheckpointError` (the paths are checked here first, then the child's one-line message
  comes back), or RuntimeError with the child's last output when it failed for another reason.
  """
  check_paths(src, dst, overwrite=overwrite)
  cmd = [sys.executable, "-m", "jip2p.cli.convert", src, dst]
  cmd += ["--preset", preset] if preset else []
  cmd += [] if extract_ema else ["--no-ema"]
  cmd += ["--expand-conv-in", str(expand_conv_in)] if expand_conv_in else []
  cmd += ["--overwrite"] if overwrite else []
  cmd += ["--dtype", dtype]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode == 0:
    return dst
  named = [line[len(_CHILD_ERROR):] for line in result.stderr.splitlines()
           if line.startswith(_CHILD_ERROR)]
  if result.returncode == 2 and named:
    raise CheckpointError(named[-1])
  raise RuntimeError(f"converting {src} failed (exit status {result.returncode}):\n"
                     f"{result.stderr[-4000:]}")


def check_paths(src: str, dst: str, *, overwrite: bool = False) -> None:
  """Named errors for a source that cannot be a single-file checkpoint or a ``dst`` that cannot
  be written, before the file is read (a torch-free check: the parent runs it too)."""
  if not os.path.exists(src):
    raise CheckpointError(f"{src} does not exist")
  if os.path.isdir(src):
    raise CheckpointError(f"{src} is a folder; give one single-file checkpoint (a diffusers "
                          "folder needs no conversion)")
  if not src.lower().endswith(SUFFIXES):
    raise CheckpointError(f"{src}: not a single-file checkpoint; expected one of "
                          f"{', '.join(SUFFIXES)}")
  if os.path.getsize(src) == 0:
    raise CheckpointError(f"{src} is empty (0 bytes)")
  check_output_folder(dst, overwrite=overwrite)


def read_single_file(path: str) -> dict:
  """The flat tensor dict of a single-file checkpoint (``state_dict`` unwrapped); entries that
  are not named tensors (a step counter, ...) are dropped."""
  import torch
  if path.lower().endswith(".safetensors"):
    state = _read_safetensors(path)
  else:
    with warnings.catch_warnings():  # torch's pickle-protocol notice; a refusal is named below
      warnings.simplefilter("ignore", UserWarning)
      try:
        state = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:  # noqa: BLE001 - torch.load's errors on arbitrary bytes are unbounded
        raise _pickle_error(path, e) from None
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of named weights")
  state = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
  for component, prefix in _COMPONENT_PREFIXES.items():
    if not any(k.startswith(prefix) for k in state):
      raise CheckpointError(f"{path} is not a complete Stable Diffusion checkpoint in the original "
                            f"layout: it has no {component} weights ('{prefix}*')")
  return state


def _read_safetensors(path: str) -> dict:
  from safetensors import SafetensorError
  from safetensors.torch import load_file
  try:
    return load_file(path)
  except SafetensorError as e:
    raise CheckpointError(f"{path} is not a readable .safetensors file (corrupt, truncated or "
                          f"another format): {str(e).strip().splitlines()[0]}") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _pickle_error(path: str, error: Exception) -> CheckpointError:
  """The one-line reason torch.load(weights_only=True) failed, never suggesting to unpickle code."""
  unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
  if unsafe:
    return CheckpointError(f"{path}: refusing to unpickle it: it holds {unsafe.group(1)}, which "
                           "unpickling would run code to build (only tensors and plain "
                           "containers are loaded)")
  return CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or not "
                         f"written by torch.save; {type(error).__name__} while loading weights "
                         "only)")


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
  try:  # a weight the renaming needs is missing; one the model needs is named further down
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
  except KeyError as e:
    raise CheckpointError(f"incomplete checkpoint: the weight {e.args[0]!r} is missing") from None
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
  check_paths(src, dst, overwrite=overwrite)
  pipeline = convert_state(read_single_file(src), preset=preset, extract_ema=extract_ema)
  if expand_conv_in and expand_conv_in != pipeline.unet.config.in_channels:
    pipeline.unet = conv_in.expand_conv_in(pipeline.unet, expand_conv_in)
  save_pipeline(pipeline, dst, overwrite=overwrite, dtype=dtype)
  return pipeline
