"""SDXL training: FSDP splits the SDXL train state, training's null text is its editor's, and the
micro-conditioning is each example's (a tiny-sdxl run from shards, resumed: test_tfrecord_runs.py;
from a latent cache: tests/data/test_latent_cache.py)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from jip2p import checkpoints, edit
from jip2p.diffusion import editing, schedules
from jip2p.train import models, sharding
from jip2p.train import config as config_lib
from jip2p.train import step as step_lib

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_fsdp_splits_every_large_tensor_of_the_sdxl_train_state():
  """Abstract shapes only (nothing allocated): parameters, EMA and the AdamW moments of SDXL's
  8-channel UNet, 41.1 GB in float32; with the default rules and min size every tensor of at
  least that size is split over 'fsdp' — the text_time add_embedding and the 2048-wide
  cross-attention projections included — so a device holds little more than 1/fsdp of it."""
  unet = checkpoints.build_component(checkpoints.preset_configs("sdxl", unet_in_channels=8)["unet"],
                                     abstract=True)
  params = nnx.state(unet, nnx.Param)
  state = jax.eval_shape(lambda p: step_lib.init_state(p, step_lib.make_optimizer(1e-4), 0),
                         params)
  total = sum(x.size * 4 for x in jax.tree.leaves((state.params, state.opt_state, state.ema)))
  assert 41.0e9 < total < 41.2e9
  min_size = config_lib.base_config().sharding.min_fsdp_size
  for fsdp in (8, 64):
    shardings = sharding.tree_shardings(state, AbstractMesh((1, fsdp), sharding.MESH_AXES),
                                        min_size=min_size)
    specs = {sharding.path_str(path): (leaf.shape, s.spec) for (path, leaf), s in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings))}
    whole = [p for p, (shape, spec) in specs.items()
             if np.prod(shape) >= min_size and "fsdp" not in spec]
    assert not whole, whole[:5]
    for path in ("params.add_embedding.linear_1.kernel",
                 "params.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.kernel",
                 "ema.add_embedding.linear_2.kernel", "opt_state.0.mu.conv_in.kernel"):
      assert "fsdp" in specs[path][1], path
    # What stays whole on every device (biases, norm scales, small tensors): under 0.1%.
    replicated = sum(np.prod(shape) * 4 for shape, spec in specs.values()
                     if len(shape) and "fsdp" not in spec)
    assert replicated < total / 1000


def _sdxl_folder(folder: str, force_zeros: bool | None) -> str:
  """A tiny-sdxl folder whose model_index.json says ``force_zeros_for_empty_prompt`` (or not)."""
  pipeline = checkpoints.random_pipeline("tiny-sdxl", seed=2)
  if force_zeros is not None:
    pipeline.sdxl_options = {"force_zeros_for_empty_prompt": force_zeros}
  checkpoints.save_pipeline(pipeline, folder)
  return folder


@pytest.mark.parametrize("force_zeros", [None, True, False])
def test_training_null_text_is_the_editors(force_zeros, tmp_path):
  """The null text a dropped example trains with is the one the Editor guides with for the same
  folder: zeros (states and pooled text) unless model_index.json says
  force_zeros_for_empty_prompt false, then both encoders' encoding of ""."""
  folder = _sdxl_folder(str(tmp_path / "model"), force_zeros)
  index = json.loads((tmp_path / "model" / "model_index.json").read_text())
  assert index.get("force_zeros_for_empty_prompt") == force_zeros
  pipeline = checkpoints.load_pipeline(folder)
  trained_states, trained_pooled = models.frozen_models(pipeline, DEVICE).state["null_text"]

  editor = edit.Editor(pipeline)
  assert editor.zero_null_text == (force_zeros is not False)
  texts = ["make it red", ""]
  _, _, (null_states, null_pooled, _) = editing.text_conditioning(
      pipeline.unet, pipeline.text_encoder, pipeline.tokenizer(texts), pipeline.text_encoder_2,
      pipeline.tokenizer_2(texts), np.zeros((1, 6), np.float32),
      zero_null_text=editor.zero_null_text)
  assert trained_states.shape == (1, 77, 80) and trained_pooled.shape == (1, 40)
  # Equal to float32 rounding: the editor encodes "" in a batch with the instruction.
  np.testing.assert_allclose(trained_states[0], null_states, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(trained_pooled[0], null_pooled, rtol=1e-5, atol=1e-5)
  assert np.any(trained_states) == (force_zeros is False)


def test_dropped_text_drops_states_and_pooled_text():
  b = 256
  rng = np.random.default_rng(0)
  text = (rng.standard_normal((b, 77, 8), np.float32), rng.standard_normal((b, 6), np.float32))
  null = (rng.standard_normal((1, 77, 8), np.float32), rng.standard_normal((1, 6), np.float32))
  latents = rng.standard_normal((b, 2, 2, 4), np.float32)
  key = jax.random.key(3)
  (states, pooled), _ = step_lib.conditioning_dropout(key, text, null, latents, 0.05)
  dropped, _ = map(np.asarray, step_lib.dropout_masks(key, b, 0.05))
  assert 0 < dropped.sum() < b
  for got, given, empty in ((states, text[0], null[0]), (pooled, text[1], null[1])):
    got = np.asarray(got)
    np.testing.assert_array_equal(got[dropped], np.broadcast_to(empty, got[dropped].shape))
    np.testing.assert_array_equal(got[~dropped], given[~dropped])


def test_micro_conditioning_is_each_examples_and_reaches_the_unet():
  """time_ids row b = (original size, crop corner) of example b and the trained crop's size, in
  the order the editor builds them (`edit.time_ids`); other ids change the loss."""
  original = np.asarray([[600, 400], [32, 48]], np.int32)
  crop = np.asarray([[3, 5], [0, 7]], np.int32)
  got = step_lib.micro_conditioning({"original_size": original, "crop_top_left": crop}, (32, 32))
  want = [edit.time_ids(32, 32, tuple(o), tuple(c)) for o, c in zip(original, crop)]
  np.testing.assert_array_equal(got, np.stack(want))
  assert step_lib.micro_conditioning({"input_ids": np.zeros((2, 77))}, (32, 32)) is None

  pipeline = checkpoints.random_pipeline("tiny-sdxl")
  unet_def, params = nnx.split(pipeline.unet, nnx.Param)
  frozen = models.frozen_models(pipeline, DEVICE)
  loss_fn = jax.jit(step_lib.make_loss_fn(
      unet_def, frozen.vae_def, frozen.text_def,
      alphas_cumprod=schedules.from_scheduler_config(pipeline.scheduler_config).alphas_cumprod(),
      scaling_factor=pipeline.vae.config.scaling_factor, dropout=0.0))
  images = np.random.default_rng(1).uniform(-1, 1, (2, 2, 32, 32, 3)).astype(np.float32)
  batch = {"input": images[0], "edited": images[1],
           "input_ids": pipeline.text_tokenizer()(["make it red", "add a hat"]),
           "original_size": original, "crop_top_left": crop}
  key = jax.random.key(0)
  loss = float(loss_fn(params, frozen.state, batch, key))
  other = float(loss_fn(params, frozen.state, {**batch, "crop_top_left": crop + 100}, key))
  assert np.isfinite(loss) and abs(loss - other) > 1e-6
