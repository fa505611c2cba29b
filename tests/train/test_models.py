"""The run's models (`jip2p.train.models.build_pipeline`): config.model.vae in the initial model's
VAE's place, and an SDXL text-to-image folder made an SDXL InstructPix2Pix model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jip2p import checkpoints
from jip2p.errors import CheckpointError
from jip2p.train import config as config_lib
from jip2p.train import models
from tests.train.test_config import load


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """(an SD-shaped tiny model folder, another tiny model folder whose vae/ is the VAE to use)."""
  root = tmp_path_factory.mktemp("models")
  model = checkpoints.create_random_pipeline(str(root / "model"), "tiny", seed=1)
  other = checkpoints.create_random_pipeline(str(root / "other"), "tiny", seed=7)
  return model, other


def _vae_kernel(vae):
  return np.asarray(vae.decoder.conv_out.kernel.get_value())


@pytest.mark.parametrize("init", ["folder", "random:tiny"])
def test_config_model_vae_replaces_the_initial_vae(folders, init):
  model, other = folders
  config = load("tiny", f"init={model if init == 'folder' else init}")
  config.model.vae = other + "/vae"
  config.model.compute_dtype = "bfloat16"
  config_lib.validate(config)
  pipeline = models.build_pipeline(config)
  vae = checkpoints.load_pipeline(other).vae
  np.testing.assert_array_equal(_vae_kernel(pipeline.vae), _vae_kernel(vae))
  # force_upcast (the tiny preset's VAE says it, as diffusers' default): float32 in a bf16 run.
  assert pipeline.vae.dtype == jnp.float32 and pipeline.unet.dtype == jnp.bfloat16
  config.model.vae = ""
  assert not np.array_equal(_vae_kernel(models.build_pipeline(config).vae), _vae_kernel(vae))


def test_config_model_vae_not_a_vae(folders):
  model, _ = folders
  config = load("tiny", f"init={model}")
  config.model.vae = model + "/unet"
  with pytest.raises(CheckpointError, match="is not a VAE folder: .* UNet2DConditionModel"):
    models.build_pipeline(config)


def test_sdxl_init_grows_conv_in_and_keeps_both_encoders(tmp_path):
  """A 4-channel SDXL folder (jip2p-convert of SDXL base): conv_in grows to 8, the run's text
  model is both encoders as one (ids [B, 2, 77] → states 32 + 48 wide, pooled 40)."""
  from jip2p.models import clip_text
  folder = checkpoints.create_random_pipeline(str(tmp_path / "sdxl"), "tiny-sdxl",
                                              unet_in_channels=4)
  pipeline = models.build_pipeline(load("tiny", f"init={folder}"))
  assert pipeline.is_sdxl and pipeline.unet.config.in_channels == 8
  text = pipeline.text_model()
  assert isinstance(text, clip_text.SDXLTextEncoders)
  ids = pipeline.text_tokenizer()(["make it red"])
  assert ids.shape == (1, 2, 77)
  states, pooled = text(ids)
  assert states.shape == (1, 77, 80) and pooled.shape == (1, 40)
