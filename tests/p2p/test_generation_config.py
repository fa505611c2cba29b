"""Generation configs load and validate; bad ones fail at start with a message naming the problem.

No model is loaded: validation needs only the model folder to exist.
"""

from __future__ import annotations

import pathlib

import ml_collections
import pytest

from jip2p.errors import ConfigError
from jip2p.p2p import filter as filter_lib
from jip2p.p2p import generation_config, sampling
from jip2p.train import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def model(tmp_path):
  (tmp_path / "sd").mkdir()
  return str(tmp_path / "sd")


def test_sd15_config_is_the_papers_generation(model):
  c = config_lib.load(f"{CONFIGS}/generate_sd15.py:model={model},clip=/models/ViT-L-14.pt")
  generation_config.validate(c)
  assert (c.steps, c.height, c.width, c.candidates) == (100, 512, 512, 100)
  options = generation_config.from_config(c)
  assert (options.min_p, options.max_p, options.min_cfg, options.max_cfg) == (0.1, 0.9, 7.5, 15)
  assert options.filter == filter_lib.FilterConfig(min_sim_image=0.75, min_sim_direction=0.2,
                                                   min_sim_0=0.2, min_sim_1=0.2, top_k=4)
  assert options.p2p == sampling.P2POptions(edit="auto", cross_replace_steps=(0.0, 0.8),
                                            self_replace_steps=(0.0, 0.4))


def test_tiny_config_changes_only_what_it_says(model):
  c = config_lib.load(f"{CONFIGS}/generate_tiny.py:model={model},clip=c.pt,steps=2,top_k=1")
  generation_config.validate(c)
  base = generation_config.base_config()
  assert (c.steps, c.show_attention_steps, c.height, c.filter.top_k) == (2, 2, 32, 1)
  assert c.filter.min_sim_image == -1.0 and c.output.image_format == "png"
  assert (c.seed, c.compute_dtype, c.clip.model) == (base.seed, base.compute_dtype, base.clip.model)


def _config(folder, changes=()):
  c = generation_config.base_config()
  c.model, c.clip.weights = folder, "/models/ViT-L-14.pt"
  for key, value in dict(changes).items():
    group, _, name = key.rpartition(".")
    setattr(c[group] if group else c, name, value)
  return c


@pytest.mark.parametrize("changes, message", [
    ({"model": "/no/such/folder"}, "model folder not found: '/no/such/folder'"),
    ({"clip.weights": ""}, "no CLIP weights: set config.clip.weights"),
    ({"compute_dtype": "float64"}, "config.compute_dtype='float64'; choose one of"),
    ({"steps": 0}, "config.steps=0, show_attention_steps=50, height=512 and width=512 must be"),
    ({"mode": "sdedit"}, "mode='sdedit': choose one of"),
    ({"candidates": 0}, "candidates=0 and batch_size=8 must be positive"),
    ({"output.image_format": "webp"}, "image_format='webp': choose one of"),
    ({"filter.top_k": 0}, "filter top_k must be a positive integer"),
    ({"p2p.edit": "swap"}, "config.p2p: unknown Prompt-to-Prompt edit 'swap'"),
    ({"p2p.cross_replace_steps": (0.5, 2.0)}, "config.p2p: cross_replace_steps=.0.5, 2.0. must"),
])
def test_bad_values_are_named(model, changes, message):
  with pytest.raises(ConfigError, match=message):
    generation_config.validate(_config(model, changes))


def test_values_of_another_type_are_named(model, tmp_path):
  c = ml_collections.ConfigDict(_config(model).to_dict(), type_safe=False)
  c.seed = "0"  # a config built without the base config's types
  with pytest.raises(ConfigError, match="config.seed='0' must be of type int"):
    generation_config.validate(c)
  path = tmp_path / "bad.py"  # one built from it: the assignment itself fails, and says where
  path.write_text("from jip2p.p2p import generation_config\n\n\ndef get_config(arg=None):\n"
                  "  c = generation_config.base_config()\n  c.steps = 'many'\n  return c\n")
  with pytest.raises(ConfigError, match=f"{path}: .*'steps'"):
    config_lib.load(str(path))


def test_unknown_and_missing_keys_are_named(model):
  c = _config(model)
  c.filter.min_sim_img = 0.7  # a typo must not be silently ignored
  with pytest.raises(ConfigError, match="unknown config key.s.: filter.min_sim_img"):
    generation_config.validate(c)
  c = _config(model)
  c.p2p.blend = 0.3  # the free-form group's keys are checked by its own parser
  with pytest.raises(ConfigError, match="config.p2p: unknown p2p option 'blend'"):
    generation_config.validate(c)
  c = _config(model)
  del c.output["split"]
  with pytest.raises(ConfigError, match="config is missing key output.split"):
    generation_config.validate(c)


def test_free_group_takes_several_forms_and_show_attention_needs_no_clip(model):
  c = _config(model, {"p2p.cross_replace_steps": {"dog": [0.1, 0.5], "default_": 0.8},
                       "p2p.blend_words": (["cat"], ["dog"]), "clip.weights": ""})
  generation_config.validate(c, scoring=False)
  options = generation_config.from_config(c)
  assert options.p2p.cross_replace_steps == {"dog": (0.1, 0.5), "default_": (0.0, 0.8)}
  assert options.p2p.blend_words == (("cat",), ("dog",))


def test_config_vae_and_sdxl_folder(tmp_path):
  """config.vae puts a VAE folder in the model's VAE's place; an SDXL folder loads with its second
  text encoder and tokenizer."""
  import numpy as np

  from jip2p import checkpoints
  from jip2p.cli import generate
  model = checkpoints.create_random_pipeline(str(tmp_path / "sd"), "tiny", unet_in_channels=4)
  other = checkpoints.create_random_pipeline(str(tmp_path / "other"), "tiny", seed=9,
                                             unet_in_channels=4)
  config = generation_config.base_config()
  config.model, config.vae = model, other
  kernel = lambda p: np.asarray(p.vae.decoder.conv_out.kernel.get_value())
  np.testing.assert_array_equal(kernel(generate._load_pipeline(config)),
                                kernel(checkpoints.load_pipeline(other)))
  config.model = checkpoints.create_random_pipeline(str(tmp_path / "xl"), "tiny-sdxl",
                                                    unet_in_channels=4)
  config.vae = ""
  sdxl = generate._load_pipeline(config)
  assert sdxl.is_sdxl and sdxl.tokenizer_2 is not None
