"""diffusers folders ↔ jip2p: round trips, conv_in expansion, orbax, and every named error."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jip2p import checkpoints
from jip2p.errors import CheckpointError, ConfigError
from tests.reference import save_torch_pipeline

COMPONENTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
              "text_encoder": "model"}


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
  return save_torch_pipeline(str(tmp_path_factory.mktemp("torch") / "pipe"), "tiny")


@pytest.fixture(scope="module")
def pipeline(torch_folder):
  return checkpoints.load_pipeline(torch_folder)


def test_round_trip_is_bit_identical(torch_folder, pipeline, tmp_path):
  out = str(tmp_path / "exported")
  checkpoints.save_pipeline(pipeline, out)
  for name, stem in COMPONENTS.items():
    original = load_file(os.path.join(torch_folder, name, f"{stem}.safetensors"))
    exported = load_file(os.path.join(out, name, f"{stem}.safetensors"))
    original = {k: v for k, v in original.items() if not k.endswith("position_ids")}
    if name == "text_encoder":  # transformers 5 drops the prefix jip2p (like SD) writes
      original = {f"text_model.{k}": v for k, v in original.items()}
    assert original.keys() == exported.keys(), name
    for key, value in original.items():
      np.testing.assert_array_equal(exported[key], value, err_msg=f"{name}:{key}")
  for name in ("unet", "vae"):
    a = json.load(open(os.path.join(torch_folder, name, "config.json")))
    b = json.load(open(os.path.join(out, name, "config.json")))
    for key in ("block_out_channels", "in_channels", "layers_per_block"):
      assert list(np.atleast_1d(a[key])) == list(np.atleast_1d(b[key])), (name, key)


def test_exported_model_runs_in_diffusers(pipeline, tmp_path):
  import diffusers
  from PIL import Image
  out = str(tmp_path / "exported")
  checkpoints.save_pipeline(pipeline, out)
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(out)
  image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
  result = pipe("make it red", image=image, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()


def test_expand_conv_in_rule(tmp_path):
  folder = save_torch_pipeline(str(tmp_path / "t2i"), "tiny", unet_in_channels=4)
  unet4 = checkpoints.load_component(os.path.join(folder, "unet"))
  unet8 = checkpoints.expand_conv_in(unet4, 8)
  before = checkpoints.to_torch_state_dict(unet4)
  after = checkpoints.to_torch_state_dict(unet8)
  assert unet8.config.in_channels == 8
  np.testing.assert_array_equal(after["conv_in.weight"][:, :4], before["conv_in.weight"])
  assert not after["conv_in.weight"][:, 4:].any()
  np.testing.assert_array_equal(after["conv_in.bias"], before["conv_in.bias"])
  for key in before:
    if key != "conv_in.weight":
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  # Zero new channels: the expanded model ignores the image latents entirely.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, 4)), jnp.float32)
  ctx = jnp.ones((1, 77, 32))
  t = jnp.array([500])
  np.testing.assert_allclose(unet8(jnp.concatenate([x, 5 * x], -1), t, ctx), unet4(x, t, ctx),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ConfigError, match="already has 8"):
    checkpoints.expand_conv_in(unet8, 4)


def _copy(torch_folder, tmp_path):
  folder = str(tmp_path / "copy")
  shutil.copytree(torch_folder, folder)
  return folder


def test_error_missing_folder(tmp_path):
  with pytest.raises(CheckpointError, match="missing model folder"):
    checkpoints.load_pipeline(str(tmp_path / "nope"))


def test_error_missing_file(torch_folder, tmp_path):
  folder = _copy(torch_folder, tmp_path)
  os.remove(os.path.join(folder, "model_index.json"))
  with pytest.raises(CheckpointError, match="missing file: .*model_index.json"):
    checkpoints.load_pipeline(folder)
  folder2 = _copy(torch_folder, tmp_path / "b")
  os.remove(os.path.join(folder2, "vae", "diffusion_pytorch_model.safetensors"))
  with pytest.raises(CheckpointError, match="missing weights: .*vae"):
    checkpoints.load_pipeline(folder2)


def test_error_wrong_architecture(torch_folder, tmp_path):
  folder = _copy(torch_folder, tmp_path)
  path = os.path.join(folder, "unet", "config.json")
  config = json.load(open(path))
  config["_class_name"] = "UNet2DModel"
  json.dump(config, open(path, "w"))
  with pytest.raises(CheckpointError, match="unsupported model class 'UNet2DModel'"):
    checkpoints.load_pipeline(folder)


def test_error_shape_mismatch(torch_folder, tmp_path):
  folder = _copy(torch_folder, tmp_path)
  path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
  weights = load_file(path)
  weights["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
  save_file(weights, path, metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"'conv_out.weight' has shape \(4, 32, 1, 1\) but the "
                                            r"model .* expects \(4, 32, 3, 3\)"):
    checkpoints.load_component(os.path.join(folder, "unet"))


def test_error_missing_and_unexpected_weights(torch_folder, tmp_path):
  folder = _copy(torch_folder, tmp_path)
  path = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
  weights = load_file(path)
  weights["decoder.extra.weight"] = np.zeros(3, np.float32)
  del weights["decoder.conv_out.bias"]
  save_file(weights, path, metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"1 missing weight\(s\): decoder.conv_out.bias; "
                                            r"1 unexpected weight\(s\): decoder.extra.weight"):
    checkpoints.load_component(os.path.join(folder, "vae"))


def test_error_unknown_config_key(torch_folder, tmp_path):
  folder = _copy(torch_folder, tmp_path)
  path = os.path.join(folder, "unet", "config.json")
  config = json.load(open(path))
  config["frobnication_level"] = 3
  json.dump(config, open(path, "w"))
  with pytest.raises(ConfigError, match="frobnication_level"):
    checkpoints.load_component(os.path.join(folder, "unet"))


def test_save_refuses_to_overwrite(pipeline, tmp_path):
  out = str(tmp_path / "exported")
  checkpoints.save_pipeline(pipeline, out)
  with pytest.raises(CheckpointError, match="exists"):
    checkpoints.save_pipeline(pipeline, out)
  checkpoints.save_pipeline(pipeline, out, overwrite=True)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_float16_folder_is_half_the_size_and_loads_back(pipeline, tmp_path):
  full, half = str(tmp_path / "fp32"), str(tmp_path / "fp16")
  checkpoints.save_pipeline(pipeline, full)
  checkpoints.save_pipeline(pipeline, half, dtype="float16")
  for name, stem in COMPONENTS.items():
    a = load_file(os.path.join(full, name, f"{stem}.safetensors"))
    b = load_file(os.path.join(half, name, f"{stem}.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
      assert b[key].dtype == np.float16, (name, key)
      np.testing.assert_array_equal(b[key], a[key].astype(np.float16), err_msg=f"{name}:{key}")
    size = lambda folder: os.path.getsize(os.path.join(folder, name, f"{stem}.safetensors"))
    assert size(half) < 0.55 * size(full), name
  loaded = checkpoints.load_pipeline(half)
  weights = checkpoints.to_torch_state_dict(loaded.unet)
  for key, value in checkpoints.to_torch_state_dict(pipeline.unet).items():
    assert weights[key].dtype == np.float32
    np.testing.assert_array_equal(weights[key], value.astype(np.float16).astype(np.float32))
  import diffusers
  from PIL import Image
  # Without torch_dtype, transformers 5 keeps the text encoder in float16 while diffusers widens
  # the UNet and VAE to float32, and the pipeline fails on a CPU: users name the dtype they run.
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(
      half, torch_dtype=torch.float32)
  image = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))
  result = pipe("make it red", image=image, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
  assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()


def test_float16_overflow_and_unknown_dtype_are_named(pipeline, tmp_path):
  with pytest.raises(ConfigError, match="dtype='bfloat16'"):
    checkpoints.save_pipeline(pipeline, str(tmp_path / "bf16"), dtype="bfloat16")
  checkpoints.save_pipeline(pipeline, str(tmp_path / "a"))
  big = checkpoints.load_pipeline(str(tmp_path / "a"))  # a copy: the fixture stays as it is
  kernel = big.unet.conv_in.kernel
  kernel.set_value(kernel.get_value().at[0, 0, 0, 0].set(1e5))
  with pytest.raises(CheckpointError, match=re.escape(
      "conv_in.weight has values up to 1e+05, beyond float16's range")):
    checkpoints.save_pipeline(big, str(tmp_path / "b"), dtype="float16")
  assert sorted(os.listdir(tmp_path)) == ["a"]  # nothing half-written


def test_saved_folder_has_the_default_modes(pipeline, tmp_path):
  """Not mkdtemp's owner-only 0700: teammates on a shared file system can read the export."""
  out = tmp_path / "exported"
  checkpoints.save_pipeline(pipeline, str(out))
  plain_dir, plain_file = tmp_path / "plain", tmp_path / "plain.txt"
  plain_dir.mkdir()
  plain_file.write_text("")
  mode = lambda p: p.stat().st_mode & 0o777
  assert mode(out) == mode(out / "unet") == mode(plain_dir)
  for path in out.rglob("*"):
    if path.is_file():
      assert mode(path) == mode(plain_file), path


def _sdxl_style_vae(folder, latent_channels=4):
  """A random diffusers VAE with SDXL's latent scale, saved as a component folder the way the
  fp16-fix VAE ships (force_upcast false)."""
  import diffusers
  torch.manual_seed(7)
  vae = diffusers.AutoencoderKL(
      block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
      up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=latent_channels,
      norm_num_groups=32, sample_size=64, scaling_factor=0.13025, force_upcast=False)
  vae.save_pretrained(folder)
  return {k: v.numpy() for k, v in vae.state_dict().items()}


def test_separate_vae_folder_replaces_the_pipelines(torch_folder, tmp_path):
  weights = _sdxl_style_vae(tmp_path / "vae-fix")
  pipe = checkpoints.load_pipeline(torch_folder, vae=str(tmp_path / "vae-fix"))
  assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast is False
  exported = checkpoints.to_torch_state_dict(pipe.vae)
  assert exported.keys() == weights.keys()
  for key, value in weights.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  # The rest is the folder's own; a model folder holding vae/ is accepted as the VAE too.
  original = checkpoints.load_pipeline(torch_folder)
  np.testing.assert_array_equal(pipe.unet.conv_in.kernel.get_value(),
                                original.unet.conv_in.kernel.get_value())
  again = checkpoints.load_pipeline(torch_folder, vae=torch_folder)
  np.testing.assert_array_equal(again.vae.decoder.conv_out.kernel.get_value(),
                                original.vae.decoder.conv_out.kernel.get_value())


def test_separate_vae_folder_errors(torch_folder, tmp_path):
  _sdxl_style_vae(tmp_path / "vae16", latent_channels=16)
  with pytest.raises(CheckpointError, match="has 16 latent channels; the UNet of .* takes 8"):
    checkpoints.load_pipeline(torch_folder, vae=str(tmp_path / "vae16"))
  with pytest.raises(CheckpointError, match="missing VAE folder"):
    checkpoints.load_pipeline(torch_folder, vae=str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="neither config.json nor vae/"):
    checkpoints.load_pipeline(torch_folder, vae=str(tmp_path / "empty"))
