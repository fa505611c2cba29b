"""Text-to-image training (config.task = "text_to_image"): the world's captions as a source, the
step on the noisy latent alone, the config rules, and a base model that learns."""

from __future__ import annotations

import numpy as np
import pytest

from jip2p.data import synthetic
from jip2p.errors import ConfigError
from jip2p.tokenizer import CLIPTokenizer
from jip2p.train import config as config_lib
from jip2p.train import loop, models
from jip2p.train.input import CaptionSource
from tests.train.helpers import losses
from tests.train.test_config import load


def test_caption_source_draws_scenes_with_training_wordings():
  tokenizer = CLIPTokenizer.default()
  source = CaptionSource(num_examples=50, res=32, seed=3, global_batch=6, flip=False,
                         tokenizer=tokenizer)
  first = next(source)
  assert set(first) == {"edited", "input_ids"}
  assert first["edited"].shape == (6, 32, 32, 3) and first["input_ids"].shape == (6, 77)
  assert first["edited"].min() >= -1 and first["edited"].max() <= 1
  # A pure function of (seed, position): a source set back to 0 gives the same batch.
  again = CaptionSource(num_examples=50, res=32, seed=3, global_batch=6, flip=False,
                        tokenizer=tokenizer)
  np.testing.assert_array_equal(next(again)["input_ids"], first["input_ids"])
  again.set_position(0)
  np.testing.assert_array_equal(next(again)["edited"], first["edited"])
  # Each row is one of the first 50 scenes, captioned with a training wording of that scene.
  wordings = synthetic.templates("caption", "train")
  batches = [first, *(next(source) for _ in range(20))]
  used = set()
  for batch in batches:
    for image, ids in zip(batch["edited"], batch["input_ids"]):
      pixels = np.round((image + 1) * 127.5).astype(np.uint8)
      scene = next(d.scene for d in (synthetic.drawing_at(i, seed=3, size=32) for i in range(50))
                   if np.array_equal(d.image, pixels))
      [wording] = [t.id for t in wordings
                   if np.array_equal(tokenizer([synthetic.caption(scene, t.id)])[0], ids)]
      used.add(wording)
  assert used == {t.id for t in wordings}  # every training wording, no held-out one


def test_caption_source_splits_one_global_batch_over_processes():
  tokenizer = CLIPTokenizer.default()
  whole = next(CaptionSource(num_examples=9, res=32, seed=0, global_batch=4, flip=False,
                             tokenizer=tokenizer))
  parts = [next(CaptionSource(num_examples=9, res=32, seed=0, global_batch=4, flip=False,
                              tokenizer=tokenizer, process_index=i, process_count=2))
           for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p["edited"] for p in parts]), whole["edited"])


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.data, "source", "tfrecord"), "config.data.source='synthetic'"),
    (lambda c: setattr(c.data, "flip", True), "config.data.flip=False"),
    (lambda c: setattr(c.eval, "every_steps", 100), "config.eval.every_steps=0"),
    (lambda c: setattr(c, "task", "inpaint"), "config.task='inpaint'; choose one of"),
])
def test_text_to_image_config_rules_are_named(change, message):
  config = load("synthetic_t2i")
  config_lib.validate(config)
  change(config)
  config.data.path = "/data"
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    config_lib.validate(config)


def test_an_editor_channel_count_in_a_text_to_image_run_is_named():
  config = load("synthetic_t2i")
  config.model.unet_in_channels = 6
  with pytest.raises(ConfigError, match="set it to 3 for config.task='text_to_image'"):
    models.build_pipeline(config)


def test_the_base_model_learns_its_few_scenes(tmp_path):
  """4 fixed scenes, batch 8, 40 steps: the v-MSE falls far below its start; the export is a
  text-to-image model (3 input channels) that the drawing evaluation samples and scores."""
  config = load("synthetic_t2i", "steps=40,batch=8,scenes=4")
  config.log_every_steps = 1
  config.checkpoint.every_steps = 1000
  config.ema.decay = 0.9
  result = loop.train(config, str(tmp_path / "run"))
  loss = losses(str(tmp_path / "run"))
  start = np.mean([loss[s] for s in (1, 2, 3)])
  end = np.mean([loss[s] for s in range(36, 41)])
  assert result["step"] == 40 and end < 0.6 * start, (start, end)
  from jip2p import checkpoints
  from jip2p.eval import drawings
  pipeline = checkpoints.load_pipeline(str(tmp_path / "run" / "export" / "ema"))
  assert pipeline.unet.config.in_channels == 3
  summary, images = drawings.evaluate(pipeline, num=2, steps=3, batch=2, progress=False)
  assert summary["n"] == 2 and 0 <= summary["object_accuracy"] <= 1
  assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8


def test_the_world_clip_text_tower_is_the_frozen_text_encoder(tmp_path, monkeypatch):
  """The default: the shipped world CLIP's text tower (converted once, cached) and its open_clip
  tokenizer (padding "!", id 0) replace the preset's random encoder; a width the UNet cannot
  attend to is named."""
  from jip2p import checkpoints
  monkeypatch.setenv("JIP2P_MODEL_CACHE", str(tmp_path))
  config = load("synthetic_t2i")
  pipeline = models.build_pipeline(config)
  [converted] = list(tmp_path.iterdir())
  encoder, tokenizer = checkpoints.load_text_encoder(str(converted))
  ids = np.asarray(tokenizer(["a red circle in the top left, on a white background"]), np.int32)
  assert pipeline.tokenizer([""])[0][-1] == 0 and ids[0, -1] == 0
  np.testing.assert_array_equal(np.asarray(pipeline.text_encoder(ids)), np.asarray(encoder(ids)))
  config.model.text_encoder = ""
  random = models.build_pipeline(config)
  assert not np.allclose(np.asarray(random.text_encoder(ids)), np.asarray(encoder(ids)))
  config = load("synthetic_t2i", "init=random:tiny")
  config.model.unet_in_channels = 4
  with pytest.raises(ConfigError, match="is 64 wide, but the UNet's cross-attention expects 32"):
    models.build_pipeline(config)


def test_an_editor_starts_from_a_text_to_image_base(tmp_path):
  """configs/synthetic.py:init=BASE (the paper's recipe): the editor's UNet is the base's with
  conv_in grown 3 → 6 (the input image's channels zero), and the base's text encoder and tokenizer
  are the editor's."""
  from jip2p import checkpoints
  base_dir = str(tmp_path / "base")
  checkpoints.create_random_pipeline(base_dir, "world", unet_in_channels=3, seed=5)
  base = checkpoints.load_pipeline(base_dir)
  config = load("synthetic", f"init={base_dir},path=/data")
  config_lib.validate(config)
  editor = models.build_pipeline(config)
  assert editor.unet.config.in_channels == 6
  grown = np.asarray(editor.unet.conv_in.kernel[...])  # [kh, kw, in, out]
  np.testing.assert_array_equal(grown[:, :, :3], np.asarray(base.unet.conv_in.kernel[...]))
  assert not grown[:, :, 3:].any()
  ids = np.asarray(base.tokenizer(["make the circle blue"]), np.int32)
  np.testing.assert_array_equal(np.asarray(editor.tokenizer(["make the circle blue"])), ids)
  np.testing.assert_array_equal(np.asarray(editor.text_encoder(ids)),
                                np.asarray(base.text_encoder(ids)))
  # The base's other weights are the editor's: one deep one as a witness.
  np.testing.assert_array_equal(np.asarray(editor.unet.conv_out.kernel[...]),
                                np.asarray(base.unet.conv_out.kernel[...]))


def test_caption_use_compares_own_other_and_empty_captions():
  """`drawings.caption_use` feeds the UNet each scene's own caption, another's and none: a
  random world model (whose cross-attention reads the text) errs differently with each, and
  the same model with its cross-attention outputs zeroed, which cannot read text, exactly alike."""
  import jax
  from flax import nnx
  from jip2p import checkpoints
  from jip2p.eval import drawings
  pipeline = checkpoints.random_pipeline("world", unet_in_channels=3)
  reads = drawings.caption_use(pipeline, num=4, timesteps=(900,))["900"]
  assert reads["own"] != reads["other"] and reads["own"] != reads["empty"]
  params = nnx.state(pipeline.unet, nnx.Param)
  in_attn2_out = lambda path: "attn2" in str(path) and "to_out" in str(path)
  nnx.update(pipeline.unet, jax.tree_util.tree_map_with_path(
      lambda path, x: x * 0 if in_attn2_out(path) else x, params))
  deaf = drawings.caption_use(pipeline, num=4, timesteps=(900, 500))
  assert set(deaf) == {"900", "500"}
  for errors in deaf.values():
    assert errors["own"] == errors["other"] == errors["empty"] > 0
  with pytest.raises(ConfigError, match="timesteps"):
    drawings.caption_use(pipeline, num=4, timesteps=(1000,))
  with pytest.raises(ConfigError, match="num"):
    drawings.caption_use(pipeline, num=1)
