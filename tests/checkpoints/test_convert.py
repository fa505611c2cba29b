"""jip2p-convert: original-layout single files → diffusers folders, EMA choice, safe unpickling.

The tests write single files in the CompVis/LDM layout from a random diffusers pipeline (the
inverse renaming is written out here, independently of diffusers' converter), convert them with
the real console-script process, and compare every tensor with the diffusers original.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from jip2p import checkpoints
from jip2p.errors import CheckpointError
from tests.reference import torch_components

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        # SDXL's text_time added embedding is the SGM UNet's label_emb.
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_ldm(key: str, config: dict) -> str:
  """A diffusers UNet key → its name in the original LDM UNet."""
  per_level = config["layers_per_block"] + 1
  p = key.split(".")
  head, leaf = ".".join(p[:-1]), p[-1]
  if head in _TOP:
    return f"{_TOP[head]}.{leaf}"
  if p[0] == "mid_block":
    index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
    rest = ".".join(p[3:])
    if p[1] == "resnets":
      rest = _RESNET.get(p[3], p[3]) + "." + ".".join(p[4:])
    return f"middle_block.{index}.{rest}"
  level, kind, j = int(p[1]), p[2], int(p[3])
  rest = ".".join(p[4:])
  if kind == "resnets":
    rest = _RESNET[p[4]] + "." + ".".join(p[5:])
  if p[0] == "down_blocks":
    if kind == "downsamplers":
      return f"input_blocks.{(level + 1) * per_level}.0.op.{p[-1]}"
    return f"input_blocks.{1 + level * per_level + j}.{0 if kind == 'resnets' else 1}.{rest}"
  if kind == "upsamplers":
    has_attn = config["up_block_types"][level].startswith("CrossAttn")
    return f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attn else 1}.conv.{p[-1]}"
  return f"output_blocks.{level * per_level + j}.{0 if kind == 'resnets' else 1}.{rest}"


def vae_to_ldm(key: str, value: torch.Tensor, config: dict) -> tuple[str, torch.Tensor]:
  """A diffusers VAE key (and value: mid attention is 1×1 conv there) → the LDM name."""
  p = key.split(".")
  n = len(config["block_out_channels"])
  if p[0] in ("quant_conv", "post_quant_conv"):
    return key, value
  side, rest = p[0], p[1:]
  if rest[0] == "conv_norm_out":
    return f"{side}.norm_out.{rest[-1]}", value
  if rest[0] in ("conv_in", "conv_out"):
    return key, value
  if rest[0] == "mid_block":
    if rest[1] == "resnets":
      return f"{side}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace(
          "conv_shortcut", "nin_shortcut"), value
    name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
    if value.ndim == 2:
      value = value[:, :, None, None]
    return f"{side}.mid.attn_1.{name}.{rest[-1]}", value
  level = int(rest[1])
  if side == "decoder":
    level = n - 1 - level
  block = "down" if side == "encoder" else "up"
  if rest[2] in ("downsamplers", "upsamplers"):
    sampler = "downsample" if side == "encoder" else "upsample"
    return f"{side}.{block}.{level}.{sampler}.conv.{rest[-1]}", value
  tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
  return f"{side}.{block}.{level}.block.{rest[3]}.{tail}", value


def ldm_state(preset="tiny", *, unet_in_channels=8, seed=0):
  """(single-file state dict, the diffusers state dicts it came from)."""
  unet, vae, text = torch_components(preset, unet_in_channels=unet_in_channels, seed=seed)
  state = {}
  for key, value in unet.state_dict().items():
    state["model.diffusion_model." + unet_to_ldm(key, dict(unet.config))] = value
  for key, value in vae.state_dict().items():
    name, value = vae_to_ldm(key, value, dict(vae.config))
    state["first_stage_model." + name] = value
  for key, value in text.state_dict().items():  # transformers 5 drops 'text_model.'
    key = key if key.startswith("text_model.") else "text_model." + key
    state["cond_stage_model.transformer." + key] = value
  return state, {"unet": unet.state_dict(), "vae": vae.state_dict(),
                 "text_encoder": text.state_dict()}


def run_convert(*args):
  return subprocess.run([sys.executable, "-m", "jip2p.cli.convert", *map(str, args)],
                        capture_output=True, text=True)


def _assert_component_equal(folder, name, reference):
  stem = "model" if name == "text_encoder" else "diffusion_pytorch_model"
  got = load_file(os.path.join(folder, name, f"{stem}.safetensors"))
  ref = {k: v.numpy() for k, v in reference.items() if not k.endswith("position_ids")}
  if name == "text_encoder":
    ref = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in ref.items()}
  assert got.keys() == ref.keys(), name
  for key in ref:
    np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}:{key}")


def test_ckpt_with_ema_converts_exactly(tmp_path):
  state, ref = ldm_state()
  raw = {k: v for k, v in state.items()}
  # EMA copies under 'model_ema.<key without dots>', as the original trainer writes them.
  ema = {}
  for key, value in state.items():
    if key.startswith("model.diffusion_model."):
      ema["model_ema." + key[len("model."):].replace(".", "")] = value + 1.0
  path = tmp_path / "ip2p.ckpt"
  torch.save({"state_dict": {**raw, **ema}, "global_step": 22000}, path)

  result = run_convert(path, tmp_path / "ema", "--preset", "tiny")
  assert result.returncode == 0, result.stderr
  pipe = checkpoints.load_pipeline(str(tmp_path / "ema"))
  assert pipe.unet.config.in_channels == 8
  _assert_component_equal(tmp_path / "ema", "unet", {k: v + 1.0 for k, v in ref["unet"].items()})
  _assert_component_equal(tmp_path / "ema", "vae", ref["vae"])
  _assert_component_equal(tmp_path / "ema", "text_encoder", ref["text_encoder"])

  result = run_convert(path, tmp_path / "raw", "--preset", "tiny", "--no-ema")
  assert result.returncode == 0, result.stderr
  _assert_component_equal(tmp_path / "raw", "unet", ref["unet"])


def test_safetensors_single_file_and_expand_conv_in(tmp_path):
  state, ref = ldm_state(unet_in_channels=4)
  path = tmp_path / "sd.safetensors"
  save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  out = checkpoints.convert_single_file(str(path), str(tmp_path / "out"), preset="tiny",
                                       expand_conv_in=8, dtype="float16")
  stored = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
  assert {v.dtype for v in stored.values()} == {np.dtype(np.float16)}
  unet = checkpoints.load_component(os.path.join(out, "unet"))
  weights = checkpoints.to_torch_state_dict(unet)
  np.testing.assert_array_equal(weights["conv_in.weight"][:, :4],
                                ref["unet"]["conv_in.weight"].half().float())
  assert not weights["conv_in.weight"][:, 4:].any()


def test_refuses_code_in_pickle(tmp_path):
  state, _ = ldm_state()
  path = tmp_path / "evil.ckpt"
  torch.save({"state_dict": state, "callback": _Payload()}, path)
  result = run_convert(path, tmp_path / "out", "--preset", "tiny")
  assert result.returncode == 2
  assert "refusing to unpickle" in result.stderr
  assert not (tmp_path / "out").exists()
  with pytest.raises(CheckpointError, match="refusing to unpickle"):
    checkpoints.convert_single_file(str(path), str(tmp_path / "out2"), preset="tiny")


class _Payload:
  """Any non-weight object: unpickling it must be refused, not attempted."""
