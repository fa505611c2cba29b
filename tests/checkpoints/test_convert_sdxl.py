"""jip2p-convert on SDXL single files (SGM layout): every tensor equal to the diffusers original,
diffusers' own single-file loader reads the same file the same way, --expand-conv-in 8 from a
text-to-image checkpoint, and the family mismatches named in one line.

The single file is written from a random diffusers tiny SDXL pipeline by the inverse renaming
written out here (diffusers ships only the forward one, which jip2p-convert runs): the UNet and VAE
as in the SD tests, CLIP ViT-L under ``conditioner.embedders.0.transformer.`` in transformers'
layout, OpenCLIP bigG under ``conditioner.embedders.1.model.`` in open_clip's (q/k/v fused into
``in_proj``, ``text_projection`` stored [width, projection]).
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jip2p import checkpoints
from tests.checkpoints.test_convert import run_convert, unet_to_ldm, vae_to_ldm
from tests.checkpoints.test_sdxl_folders import assert_same_weights
from tests.cli_errors import named_error
from tests.reference import torch_sdxl_pipeline

_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                    "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def open_clip_layout(text_model) -> dict:
  """A transformers CLIPTextModelWithProjection's weights in open_clip's text-tower layout."""
  sd = {k: v for k, v in text_model.state_dict().items() if not k.endswith("position_ids")}
  out = {"token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
         "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
         "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
         "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
         "text_projection": sd.pop("text_projection.weight").T.contiguous()}
  for i in range(text_model.config.num_hidden_layers):
    layer, block = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
    for leaf in ("weight", "bias"):
      out[block + f"attn.in_proj_{leaf}"] = torch.cat(
          [sd.pop(layer + f"self_attn.{p}_proj.{leaf}") for p in "qkv"])
      for ours, theirs in _OPEN_CLIP_LAYER.items():
        out[block + f"{theirs}.{leaf}"] = sd.pop(layer + f"{ours}.{leaf}")
  assert not sd, sorted(sd)  # every weight placed
  return out


def sgm_state(pipe) -> dict:
  """A diffusers SDXL pipeline's weights as an SGM-layout single file's state dict."""
  state = {}
  for key, value in pipe.unet.state_dict().items():
    state["model.diffusion_model." + unet_to_ldm(key, dict(pipe.unet.config))] = value
  for key, value in pipe.vae.state_dict().items():
    name, value = vae_to_ldm(key, value, dict(pipe.vae.config))
    state["first_stage_model." + name] = value
  for key, value in pipe.text_encoder.state_dict().items():  # transformers 5 drops 'text_model.'
    key = key if key.startswith("text_model.") else "text_model." + key
    state["conditioner.embedders.0.transformer." + key] = value
  for key, value in open_clip_layout(pipe.text_encoder_2).items():
    state["conditioner.embedders.1.model." + key] = value
  return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
  """(the diffusers SDXL InstructPix2Pix pipeline, its single file, a diffusers folder of it)."""
  root = tmp_path_factory.mktemp("sdxl-file")
  pipe = torch_sdxl_pipeline(seed=5)
  path = str(root / "sd_xl_ip2p.safetensors")
  save_file(sgm_state(pipe), path)
  pipe.save_pretrained(str(root / "diffusers"))
  return pipe, path, str(root / "diffusers")


def test_sdxl_single_file_converts_exactly(sdxl_file, tmp_path):
  import diffusers
  pipe, path, _ = sdxl_file
  result = run_convert(path, tmp_path / "out", "--preset", "tiny-sdxl")
  assert result.returncode == 0, result.stderr
  ours = checkpoints.load_pipeline(str(tmp_path / "out"))
  assert ours.is_sdxl and ours.unet.config.in_channels == 8
  assert ours.vae.config.scaling_factor == 0.13025 and ours.vae.config.force_upcast
  assert ours.tokenizer_2.pad_token == "!"
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    assert_same_weights(getattr(ours, name), getattr(pipe, name), name)
  again = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_pretrained(str(tmp_path / "out"))
  assert_same_weights(ours.text_encoder_2, again.text_encoder_2, "text_encoder_2")


def test_diffusers_single_file_loader_reads_the_file_alike(sdxl_file):
  """The file's layout is the one diffusers' own single-file loader reads (its model-type
  detection and every renaming), not merely the inverse of the renaming jip2p runs."""
  import diffusers
  pipe, path, folder = sdxl_file
  loaded = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_single_file(
      path, config=folder, local_files_only=True)
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
    for key, value in want.items():
      if not key.endswith("position_ids"):
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=f"{name}:{key}")


def test_sdxl_text_to_image_file_expands_conv_in(tmp_path):
  import diffusers
  pipe = torch_sdxl_pipeline(unet_in_channels=4, seed=6)
  path = str(tmp_path / "sd_xl_base.safetensors")
  save_file(sgm_state(pipe), path)
  result = run_convert(path, tmp_path / "ip2p", "--preset", "tiny-sdxl", "--expand-conv-in", "8")
  assert result.returncode == 0, result.stderr
  assert "UNet with 8 input channels" in result.stdout
  ours = checkpoints.load_pipeline(str(tmp_path / "ip2p"))
  kernel = checkpoints.to_torch_state_dict(ours.unet)["conv_in.weight"]
  np.testing.assert_array_equal(kernel[:, :4], pipe.unet.conv_in.weight.detach().numpy())
  assert kernel.shape[1] == 8 and not kernel[:, 4:].any()
  index = json.load(open(tmp_path / "ip2p" / "model_index.json"))
  assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
  loaded = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_pretrained(
      str(tmp_path / "ip2p"))
  assert loaded.unet.config.in_channels == 8


def test_family_mismatches_are_named(sdxl_file, tmp_path):
  _, path, _ = sdxl_file
  result = run_convert(path, tmp_path / "a", "--preset", "tiny")
  line = named_error(result.stderr, result.returncode, "jip2p-convert")
  assert "is an SDXL checkpoint" in line and "not an SDXL preset" in line
  from tests.checkpoints.test_convert import ldm_state
  sd_path = str(tmp_path / "sd15.safetensors")
  save_file({k: v.contiguous() for k, v in ldm_state()[0].items()}, sd_path)
  result = run_convert(sd_path, tmp_path / "b", "--preset", "tiny-sdxl")
  line = named_error(result.stderr, result.returncode, "jip2p-convert")
  assert "is SDXL's but the file is not an SDXL checkpoint" in line
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
