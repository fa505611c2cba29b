"""The exact pixel codec: a lossless stand-in for the VAE, saved and loaded like one."""

import json

import jax
import numpy as np
import pytest

from jip2p import checkpoints
from jip2p.edit import Editor
from jip2p.errors import ConfigError, InputError
from jip2p.models.pixel_codec import PixelCodec, PixelCodecConfig


def test_round_trip_is_exact_and_patches_fold_into_channels():
  codec = PixelCodec(PixelCodecConfig(patch_size=4))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  posterior = codec.encode(x)
  z = np.asarray(posterior.mean)
  assert z.shape == (2, 4, 6, 48)
  # Latent pixel (1, 2) holds image rows 4..7, columns 8..11, channels ordered (row, column, colour).
  np.testing.assert_array_equal(z[1, 1, 2].reshape(4, 4, 3), x[1, 4:8, 8:12])
  np.testing.assert_array_equal(np.asarray(posterior.sample(jax.random.key(0))), z)
  np.testing.assert_array_equal(np.asarray(codec.decode(z)), x)


@pytest.mark.parametrize("make, match", [
    (lambda c: c.encode(np.zeros((1, 10, 16, 3), np.float32)), "multiples of 4"),
    (lambda c: c.encode(np.zeros((1, 16, 16, 4), np.float32)), r"\[B, H, W, 3\]"),
    (lambda c: c.decode(np.zeros((1, 4, 4, 12), np.float32)), r"\[B, h, w, 48\]"),
])
def test_bad_shapes_are_named(make, match):
  with pytest.raises(InputError, match=match):
    make(PixelCodec(PixelCodecConfig(patch_size=4)))


def test_bad_config_is_named():
  with pytest.raises(ConfigError, match="patch_size=0"):
    PixelCodecConfig(patch_size=0)
  with pytest.raises(ConfigError, match="unknown key"):
    PixelCodecConfig.from_dict({"_class_name": "PixelCodec", "patch": 4})


def test_world_pipeline_saves_loads_and_edits(tmp_path):
  folder = str(tmp_path / "world")
  checkpoints.create_random_pipeline(folder, "world", unet_in_channels=6)
  with open(f"{folder}/vae/config.json") as f:
    assert json.load(f)["_class_name"] == "PixelCodec"
  pipeline = checkpoints.load_pipeline(folder)
  assert isinstance(pipeline.vae, PixelCodec) and pipeline.vae.config.patch_size == 1
  editor = Editor(pipeline)
  # Trained at 32 px: sizes round to its own step (1 px codec × 3 UNet levels), not to 64.
  assert editor.size_multiple == 4
  image = np.random.default_rng(1).integers(0, 256, (40, 32, 3), np.uint8)
  out = editor([image], ["make the circle red"], steps=2, resolution=32, seed=0,
               output_type="np")
  assert np.asarray(out[0]).shape == (32, 28, 3)  # 40×32 → long side 32, short side 25.6 → 28
