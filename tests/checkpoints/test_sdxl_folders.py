"""SDXL diffusers folders ↔ jip2p: text_encoder_2 / tokenizer_2 in and out, diffusers' SDXL
pipelines load what jip2p writes, the VAE's scale and force_upcast, and the named errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jip2p import checkpoints
from jip2p.errors import CheckpointError
from tests.reference import torch_sdxl_pipeline


@pytest.fixture(scope="module")
def sdxl_torch(tmp_path_factory):
  """(diffusers SDXL InstructPix2Pix pipeline, the folder it saved)."""
  pipe = torch_sdxl_pipeline(seed=3)
  folder = str(tmp_path_factory.mktemp("sdxl") / "pipe")
  pipe.save_pretrained(folder)
  return pipe, folder


def assert_same_weights(ours, torch_model, name):
  """A jip2p module's weights, exported, equal a diffusers / transformers module's."""
  exported = checkpoints.to_torch_state_dict(ours)
  reference = {k: v.numpy() for k, v in torch_model.state_dict().items()
               if not k.endswith("position_ids")}
  if name == "text_encoder":  # transformers 5 leaves text_model. out of CLIPTextModel's keys
    reference = {k if k.startswith("text_model.") else f"text_model.{k}": v
                 for k, v in reference.items()}
  assert exported.keys() == reference.keys(), name
  for key, value in reference.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=f"{name}:{key}")


def test_sdxl_folder_loads_and_exports_for_diffusers(sdxl_torch, tmp_path):
  import diffusers
  pipe, folder = sdxl_torch
  ours = checkpoints.load_pipeline(folder)
  assert ours.is_sdxl and ours.unet.config.addition_embed_type == "text_time"
  assert ours.vae.config.scaling_factor == 0.13025
  assert ours.tokenizer_2.pad_token == "!" and ours.tokenizer.pad_token == "<|endoftext|>"
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    assert_same_weights(getattr(ours, name), getattr(pipe, name), name)

  out = str(tmp_path / "exported")
  checkpoints.save_pipeline(ours, out)
  index = json.load(open(os.path.join(out, "model_index.json")))
  assert index["_class_name"] == "StableDiffusionXLInstructPix2PixPipeline"
  again = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_pretrained(out)
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    assert_same_weights(getattr(ours, name), getattr(again, name), name)
  assert again.vae.config.scaling_factor == 0.13025 and again.vae.config.force_upcast
  assert again.tokenizer_2.pad_token == "!"
  assert again.tokenizer_2("a cat").input_ids == pipe.tokenizer_2("a cat").input_ids
  assert type(again.scheduler).__name__ == "EulerDiscreteScheduler"


def test_sdxl_pipeline_settings_survive_the_round_trip(sdxl_torch, tmp_path):
  """model_index.json's force_zeros_for_empty_prompt and is_cosxl_edit (CosXL Edit) are kept:
  they change what diffusers' pipeline computes."""
  import diffusers
  _, folder = sdxl_torch
  cosxl = str(tmp_path / "cosxl")
  shutil.copytree(folder, cosxl)
  index_path = os.path.join(cosxl, "model_index.json")
  index = json.load(open(index_path))
  json.dump({**index, "force_zeros_for_empty_prompt": False, "is_cosxl_edit": True},
            open(index_path, "w"))
  ours = checkpoints.load_pipeline(cosxl)
  assert ours.sdxl_options == {"force_zeros_for_empty_prompt": False, "is_cosxl_edit": True}
  checkpoints.save_pipeline(ours, str(tmp_path / "out"))
  again = diffusers.StableDiffusionXLInstructPix2PixPipeline.from_pretrained(str(tmp_path / "out"))
  assert again.is_cosxl_edit is True  # an __init__ argument, read from model_index.json
  assert again.config.force_zeros_for_empty_prompt is False


def test_sdxl_text_to_image_folder_exports_for_diffusers(tmp_path):
  import diffusers
  folder = str(tmp_path / "t2i")
  torch_sdxl_pipeline(unet_in_channels=4, seed=4).save_pretrained(folder)
  ours = checkpoints.load_pipeline(folder)
  checkpoints.save_pipeline(ours, str(tmp_path / "out"))
  again = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "out"))
  assert again.unet.config.in_channels == 4
  assert_same_weights(ours.text_encoder_2, again.text_encoder_2, "text_encoder_2")


def test_random_sdxl_preset_round_trip(tmp_path):
  """A random tiny-sdxl folder written by JAX alone loads back with its second encoder."""
  folder = checkpoints.create_random_pipeline(str(tmp_path / "r"), "tiny-sdxl")
  pipe = checkpoints.load_pipeline(folder)
  assert pipe.is_sdxl and pipe.text_encoder_2.config.projection_dim == 40
  assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                  + pipe.text_encoder_2.config.hidden_size)


def _fp16_fix_style_vae(folder):
  """The SDXL folder's VAE saved alone with force_upcast false (as the fp16-fix VAE ships)."""
  shutil.copytree(folder, folder + "-vae-src")
  config_path = os.path.join(folder + "-vae-src", "vae", "config.json")
  config = json.load(open(config_path))
  json.dump({**config, "force_upcast": False}, open(config_path, "w"))
  return os.path.join(folder + "-vae-src", "vae")


def test_force_upcast_in_a_bfloat16_pipeline(sdxl_torch):
  """The folder's VAE says force_upcast: in a bfloat16 run it computes in float32 (the same
  latents as a float32 run); a VAE that says false computes in bfloat16; the UNet stays
  bfloat16 either way. Parameters are float32 throughout."""
  import jax
  from flax import nnx
  _, folder = sdxl_torch
  f32 = checkpoints.load_pipeline(folder)
  bf16 = checkpoints.load_pipeline(folder, dtype=jnp.bfloat16)
  assert bf16.vae.config.force_upcast and bf16.vae.dtype == jnp.float32
  assert bf16.unet.dtype == jnp.bfloat16
  assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16.vae, nnx.Param))} == {
      np.dtype(np.float32)}
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)), jnp.float32)
  np.testing.assert_array_equal(bf16.vae.encode(images).mean, f32.vae.encode(images).mean)
  fix = checkpoints.load_pipeline(folder, dtype=jnp.bfloat16, vae=_fp16_fix_style_vae(folder))
  assert not fix.vae.config.force_upcast and fix.vae.dtype == jnp.bfloat16
  assert not np.array_equal(fix.vae.encode(images).mean, f32.vae.encode(images).mean)


def test_sdxl_folder_errors(sdxl_torch, tmp_path):
  _, folder = sdxl_torch
  no_second = str(tmp_path / "no-te2")
  shutil.copytree(folder, no_second)
  shutil.rmtree(os.path.join(no_second, "text_encoder_2"))
  with pytest.raises(CheckpointError, match="its UNet takes SDXL's text_time conditioning but it "
                                            "has no text_encoder_2/"):
    checkpoints.load_pipeline(no_second)
  sd = checkpoints.create_random_pipeline(str(tmp_path / "sd"), "tiny")
  shutil.copytree(os.path.join(folder, "text_encoder_2"), os.path.join(sd, "text_encoder_2"))
  with pytest.raises(CheckpointError, match="has text_encoder_2/ but its UNet does not take"):
    checkpoints.load_pipeline(sd)
  with pytest.raises(CheckpointError, match="is not a VAE folder: .* describes a "
                                            "UNet2DConditionModel"):
    checkpoints.load_pipeline(folder, vae=os.path.join(folder, "unet"))


def test_sdxl_preset_has_sdxl_base_shapes():
  """The sdxl preset (what jip2p-convert reads an SDXL file with) is SDXL base 1.0's
  config.json shapes, as the parity tests write them."""
  from jip2p.models.clip_text import CLIPTextConfig
  from jip2p.models.unet import UNetConfig
  from tests.models.test_clip_text import SDXL_TEXT, SDXL_TEXT_2
  from tests.models.test_unet import SDXL
  configs = checkpoints.preset_configs("sdxl", unet_in_channels=8)
  assert UNetConfig.from_dict(configs["unet"]) == UNetConfig.from_dict(SDXL)
  shape = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
           "hidden_act", "projection_dim", "max_position_embeddings", "vocab_size")
  for name, real in (("text_encoder", SDXL_TEXT), ("text_encoder_2", SDXL_TEXT_2)):
    ours = CLIPTextConfig.from_dict(configs[name])
    assert {k: getattr(ours, k) for k in shape} == {k: real[k] for k in shape}, name
  assert configs["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]
  vae = configs["vae"]
  assert (vae["scaling_factor"], vae["force_upcast"], vae["block_out_channels"]) == (
      0.13025, True, [128, 256, 512, 512])
