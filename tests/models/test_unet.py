"""Parity of jip2p's Flax UNet with diffusers' UNet2DConditionModel on random weights (torch side).

SLOW: ``test_sd15_shapes_parity`` runs the real 860M-parameter SD 1.5 shapes, torch then JAX (the
torch model is dropped before the JAX forward): about 1-3 minutes on 2 busy CPU cores; the file's
other tests with it peaked at 8 GB resident (2026-12-08). ``test_sdxl_shapes_parity`` runs SDXL's
2.6 B parameters the same way in a child process (this file as a script; its peak RSS and time
are in README.md). The rest of the file takes 1-2 minutes, mostly XLA compiles.
"""

import functools
import gc
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jip2p.checkpoints import (load_component, load_torch_state_dict, save_component,
                               to_torch_state_dict)
from jip2p.errors import ConfigError, InputError
from jip2p.models.layers import abstract_module
from jip2p.models.unet import UNet2DCondition, UNetConfig, timestep_embedding

ROOT = pathlib.Path(__file__).resolve().parents[2]

SD1_TINY = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
    "block_out_channels": [32, 64], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 32, "norm_num_groups": 32, "in_channels": 8, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "sample_size": 16,
}
SD2_TINY = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": [2, 4],
    "cross_attention_dim": 48, "norm_num_groups": 16, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True, "upcast_attention": True, "flip_sin_to_cos": True,
    "freq_shift": 0, "act_fn": "silu", "only_cross_attention": False,
    "dual_cross_attention": False, "time_embedding_type": "positional",
}
# The rarely changed knobs, all away from their defaults at once.
KNOBS_TINY = {
    "block_out_channels": [32, 32, 64], "layers_per_block": [1, 2, 1],
    "transformer_layers_per_block": [2, 1, 2], "attention_head_dim": 4, "cross_attention_dim": 24,
    "norm_num_groups": 8, "norm_eps": 1e-6, "in_channels": 5, "out_channels": 3,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
    "mid_block_scale_factor": 1.5, "center_input_sample": True, "time_embedding_dim": 96,
    "conv_in_kernel": 5, "conv_out_kernel": 1,
}
# The block structure of SD 1.5 (16 transformer blocks) at a tiny width.
SD15_LAYOUT_TINY = {
    "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "attention_head_dim": 2,
    "cross_attention_dim": 16, "norm_num_groups": 16, "in_channels": 8,
}
# SDXL's block structure at a tiny width: no attention in the first block, per-block depths and
# heads, linear projections, and the text_time added embedding (a 32-wide pooled text + 6 time
# ids of 8 sinusoids each = 80). Keys as SDXL's config.json writes them (upcast_attention null).
SDXL_TINY = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 8, "attention_head_dim": [1, 2, 4],
    "block_out_channels": [16, 32, 64], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 48, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 8,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 8,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 80,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 16, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 3],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}
# SDXL base 1.0's unet/config.json shapes with InstructPix2Pix's 8 input channels (2.6 B).
SDXL = {**SDXL_TINY, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
        "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10]}
SD15 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 8,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}


def _kwargs(config):
  return {k: v for k, v in config.items() if not k.startswith("_")}


def _torch_unet(config, seed=0):
  torch.manual_seed(seed)
  return diffusers.UNet2DConditionModel(**_kwargs(config)).eval()


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _jax_unet(config, state_dict, **kwargs):
  """A jip2p UNet holding ``state_dict``'s weights (built abstract: nothing initialised twice)."""
  parsed = UNetConfig.from_dict(config)
  model = abstract_module(lambda rngs: UNet2DCondition(parsed, rngs=rngs, **kwargs))
  load_torch_state_dict(model, state_dict)
  return model


def _inputs(config, batch, hw, tokens, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, config["in_channels"], hw, hw)).astype(np.float32)
  context = rng.standard_normal((batch, tokens, config["cross_attention_dim"])).astype(np.float32)
  return sample, context


def _added(batch, pooled, seed=0):
  """SDXL's added conditions: pooled text [B, pooled] and micro-conditioning time ids [B, 6]
  (original size, crop top-left, target size; the crops differ per example)."""
  rng = np.random.default_rng(seed)
  text_embeds = rng.standard_normal((batch, pooled)).astype(np.float32)
  time_ids = np.array([[1024, 768, 16 * i, 8 * i, 1024, 1024] for i in range(batch)], np.float32)
  return {"text_embeds": text_embeds, "time_ids": time_ids}


def _torch_out(model, sample, t, context, added=None):
  kwargs = {}
  if added is not None:
    kwargs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in added.items()}
  with torch.no_grad():
    return model(torch.from_numpy(sample), torch.as_tensor(t),
                 torch.from_numpy(context), **kwargs).sample.numpy()


# One jitted forward for all tests: a compile is cached per model structure and input shapes.
# Over the split state, not `nnx.jit` of the module: that returns the module's state as outputs,
# a second copy of the weights (10 GB more for SDXL's).
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, sample, t, context, added):
  return nnx.merge(graphdef, state)(sample, t, context, **added)


def _jax_out(model, sample, t, context, added=None):
  added = {k: jnp.asarray(v) for k, v in (added or {}).items()}
  out = _forward(*nnx.split(model), jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t),
                 jnp.asarray(context), added)
  assert out.dtype == jnp.float32
  return np.asarray(out).transpose(0, 3, 1, 2)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def sd1_pair():
  torch_model = _torch_unet(SD1_TINY)
  return torch_model, _jax_unet(SD1_TINY, _state_dict(torch_model))


@pytest.mark.parametrize("timesteps", [np.array([0, 999]), np.array([10.5, 500.25], np.float32)],
                         ids=["int", "float"])
def test_sd1_tiny_parity(sd1_pair, timesteps):
  torch_model, model = sd1_pair
  sample, context = _inputs(SD1_TINY, 2, 16, 7)
  ref = _torch_out(torch_model, sample, timesteps, context)
  assert _rel(_jax_out(model, sample, timesteps, context), ref) <= 1e-4


@pytest.mark.parametrize("config, timesteps", [(SD2_TINY, 321.0), (KNOBS_TINY, np.array([3, 777]))],
                         ids=["sd2-scalar-t", "knobs"])
def test_tiny_parity(config, timesteps):
  torch_model = _torch_unet(config, seed=1)
  model = _jax_unet(config, _state_dict(torch_model))
  sample, context = _inputs(config, 2, 16, 5, seed=1)
  ref = _torch_out(torch_model, sample, timesteps, context)
  assert _rel(_jax_out(model, sample, timesteps, context), ref) <= 1e-4


def test_sd15_shapes_parity():
  """Real SD 1.5 shapes (8 input channels), 64×64 latents, 77×768 text, batch 1."""
  start = time.perf_counter()
  torch_model = _torch_unet(SD15)
  sample, context = _inputs(SD15, 1, 64, 77)
  t = np.array([500])
  ref = _torch_out(torch_model, sample, t, context)
  state = _state_dict(torch_model)
  model = _jax_unet(SD15, state)
  del torch_model, state
  gc.collect()
  out = _jax_out(model, sample, jnp.asarray(t), context)
  assert _rel(out, ref) <= 1e-4
  print(f"SD 1.5-shape UNet parity took {time.perf_counter() - start:.1f} s")


class _Draining(dict):
  """A state dict that lets go of each array once it is read: the torch model's storage is freed
  tensor by tensor while the JAX copy fills, so one copy of the weights is alive, not two."""

  def __getitem__(self, key):
    return self.pop(key)


@pytest.fixture(scope="module")
def sdxl_pair():
  torch_model = _torch_unet(SDXL_TINY, seed=2)
  return torch_model, _jax_unet(SDXL_TINY, _state_dict(torch_model))


@pytest.mark.parametrize("timesteps", [np.array([1, 999]), np.array([10.5, 500.25], np.float32)],
                         ids=["int", "float"])
def test_sdxl_tiny_parity(sdxl_pair, timesteps):
  torch_model, model = sdxl_pair
  sample, context = _inputs(SDXL_TINY, 2, 16, 7, seed=2)
  added = _added(2, 32, seed=2)
  ref = _torch_out(torch_model, sample, timesteps, context, added)
  assert _rel(_jax_out(model, sample, timesteps, context, added), ref) <= 1e-4
  # The added conditions matter: other time ids (the crop) change the output.
  other = {**added, "time_ids": added["time_ids"] + np.array([0, 0, 64, 64, 0, 0], np.float32)}
  assert _rel(_jax_out(model, sample, timesteps, context, other), ref) > 1e-3


def test_sdxl_tiny_structure(sdxl_pair):
  """The SDXL features are really there: depths, heads, linear projections, added embedding."""
  _, model = sdxl_pair
  assert model.down_blocks[0].attentions is None
  assert [len(a.transformer_blocks) for a in model.down_blocks[2].attentions] == [3, 3]
  assert len(model.mid_block.attentions[0].transformer_blocks) == 3
  assert [len(a.transformer_blocks) for a in model.up_blocks[1].attentions] == [2, 2, 2]
  assert model.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
  assert isinstance(model.down_blocks[1].attentions[0].proj_in, nnx.Linear)
  assert model.add_embedding.linear_1.kernel.shape == (80, 64)
  assert model.down_blocks[2].attentions[0].transformer_blocks[0].attn2.to_k.kernel.shape == \
      (48, 64)


def test_sdxl_remat_and_bfloat16(sdxl_pair):
  """remat=True and bfloat16 compute take the added conditions too."""
  torch_model, model = sdxl_pair
  sample, context = _inputs(SDXL_TINY, 2, 16, 7, seed=3)
  added = _added(2, 32, seed=3)
  t = np.array([5, 600])
  want = _jax_out(model, sample, t, context, added)
  state = _state_dict(torch_model)
  remat = _jax_unet(SDXL_TINY, state, remat=True)
  np.testing.assert_allclose(_jax_out(remat, sample, t, context, added), want, rtol=1e-5,
                             atol=1e-5)
  bf16 = _jax_unet(SDXL_TINY, state, dtype=jnp.bfloat16)
  assert _rel(_jax_out(bf16, sample, t, context, added), want) <= 5e-2


def test_sdxl_load_save_folder_round_trip(sdxl_pair, tmp_path):
  """A diffusers-saved SDXL UNet folder loads through the checkpoint loader (add_embedding keys
  included), and jip2p's export loads back into diffusers."""
  torch_model, model = sdxl_pair
  torch_model.save_pretrained(tmp_path / "unet")
  loaded = load_component(str(tmp_path / "unet"))
  assert loaded.config == UNetConfig.from_dict(SDXL_TINY)
  sample, context = _inputs(SDXL_TINY, 1, 16, 5, seed=4)
  added = _added(1, 32, seed=4)
  ref = _torch_out(torch_model, sample, np.array([250]), context, added)
  assert _rel(_jax_out(loaded, sample, np.array([250]), context, added), ref) <= 1e-4
  save_component(loaded, str(tmp_path / "export"))
  again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "export").eval()
  assert again.config.addition_embed_type == "text_time"
  np.testing.assert_allclose(_torch_out(again, sample, np.array([250]), context, added), ref,
                             rtol=1e-6, atol=1e-6)


def _sdxl_shapes_parity() -> dict:
  """Real SDXL base shapes (2.6 B parameters, 8 input channels), 32×32 latents (small, for the
  CPU's time: every weight is exercised all the same), 77×2048 text, 1280-wide pooled text,
  batch 1: torch first, then JAX filled from the torch weights as they are freed (about one copy
  of the 10.3 GB of float32 weights alive at a time, plus XLA's compile). → the relative error
  and the parameter count."""
  torch_model = _torch_unet(SDXL)
  params = sum(p.numel() for p in torch_model.parameters())
  sample, context = _inputs(SDXL, 1, 32, 77)
  added = _added(1, 1280)
  t = np.array([500])
  ref = _torch_out(torch_model, sample, t, context, added)
  state = _Draining(_state_dict(torch_model))
  del torch_model
  gc.collect()
  parsed = UNetConfig.from_dict(SDXL)
  model = abstract_module(lambda rngs: UNet2DCondition(parsed, rngs=rngs))
  load_torch_state_dict(model, state)
  assert not state
  gc.collect()
  out = _jax_out(model, sample, jnp.asarray(t), context, added)
  return {"rel": _rel(out, ref), "params": params}


@pytest.mark.alone  # beside the two sides' processes on CI's 24 GB the peaks could add up
def test_sdxl_shapes_parity():
  """`_sdxl_shapes_parity` in a fresh process (this file run as a script), so that what the
  suite's process has accumulated by then does not add to its peak (in that process it was
  OOM-killed at 22.4 GB); the child reports its peak RSS and time (README: measured figures)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
  done = subprocess.run([sys.executable, "-m", "tests.models.test_unet"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["params"] > 2.5e9
  assert result["rel"] <= 1e-4
  print(f"SDXL-shape UNet parity: relative error {result['rel']:.2e}, "
        f"{result['seconds']:.0f} s, peak RSS {result['peak_rss_gib']:.1f} GiB")


def test_timestep_embedding_matches_diffusers():
  t = np.array([0.0, 1.0, 17.5, 999.0], np.float32)
  for flip, shift, dim in ((True, 0, 320), (False, 1, 33)):
    ref = diffusers.models.embeddings.get_timestep_embedding(
        torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    out = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # sin/cos of float32 arguments up to ~1e3 turn 1-ulp frequency differences into ~1e-4.
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)


class _Recorder:
  """Records every attention layer it is handed; ``uniform_self`` (a traced bool) flattens
  self-attention to uniform weights."""

  def __init__(self, uniform_self=False):
    self.calls = []
    self.uniform_self = uniform_self

  def edit_logits(self, logits, info):
    self.calls.append((info, logits.shape))
    if info.is_cross:
      return logits
    return jnp.where(self.uniform_self, jnp.zeros_like(logits), logits)

  def edit_probs(self, probs, info):
    return probs


def test_control_reaches_every_attention_layer():
  """Tracing alone (no compile) shows what every attention layer hands the controller."""
  config = UNetConfig.from_dict(SD15_LAYOUT_TINY)
  model = abstract_module(lambda rngs: UNet2DCondition(config, rngs=rngs))
  recorder = _Recorder()
  out = nnx.eval_shape(lambda m: m(jnp.zeros((2, 16, 16, 8)), 10, jnp.zeros((2, 5, 16)),
                                   control=recorder), model)
  assert out.shape == (2, 16, 16, 4)

  infos = [info for info, _ in recorder.calls]
  self_attn = [i for i in infos if not i.is_cross]
  cross = [i for i in infos if i.is_cross]
  assert len(self_attn) == len(cross) == 16  # as in SD 1.5
  attn_paths = {".".join(map(str, path[:-2])) for path, _ in
                nnx.to_flat_state(nnx.state(model, nnx.Param))
                if path[-2:] == ("to_q", "kernel")}
  assert {i.name for i in infos} == attn_paths and len(attn_paths) == 32
  assert all(i.name.endswith(".attn2") for i in cross)
  assert all(i.name.endswith(".attn1") for i in self_attn)
  hw = sorted(i.query_hw for i in self_attn)
  assert hw == [(2, 2)] + [(4, 4)] * 5 + [(8, 8)] * 5 + [(16, 16)] * 5
  for info, shape in recorder.calls:
    keys = 5 if info.is_cross else info.query_hw[0] * info.query_hw[1]
    assert shape == (2, 2, info.query_hw[0] * info.query_hw[1], keys)


def test_sdxl_layout_traced_at_real_shapes():
  """Tracing alone (abstract weights: no memory, no compile): the real SDXL config builds 2.6 B
  parameters (8 input channels) and hands the controller all 70 self- and 70 cross-attention
  layers, none at the attention-free first level."""
  config = UNetConfig.from_dict(SDXL)
  model = abstract_module(lambda rngs: UNet2DCondition(config, rngs=rngs))
  params = sum(np.prod(v.get_value().shape)
               for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert 2.56e9 < params < 2.57e9
  recorder = _Recorder()
  out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 64, 64, 8)), 10, jnp.zeros((1, 77, 2048)),
                                   text_embeds=jnp.zeros((1, 1280)),
                                   time_ids=jnp.zeros((1, 6)), control=recorder), model)
  assert out.shape == (1, 64, 64, 4)
  infos = [info for info, _ in recorder.calls]
  assert sum(i.is_cross for i in infos) == sum(not i.is_cross for i in infos) == 70
  assert sorted({i.query_hw for i in infos}) == [(16, 16), (32, 32)]
  assert len({i.name for i in infos}) == 140


def test_control_edits_reach_the_output(sd1_pair):
  _, model = sd1_pair
  sample, context = _inputs(SD1_TINY, 2, 16, 7)
  t = np.array([0, 999])
  run = nnx.jit(lambda m, s, c, uniform: m(s, t, c, control=_Recorder(uniform_self=uniform)))
  plain = _jax_out(model, sample, t, context)
  sample, context = jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(context)
  identity = np.asarray(run(model, sample, context, False)).transpose(0, 3, 1, 2)
  edited = np.asarray(run(model, sample, context, True)).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(identity, plain, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(edited - plain)) > 1e-3


def test_bfloat16_compute_close_to_float32(sd1_pair):
  torch_model, model = sd1_pair
  model16 = _jax_unet(SD1_TINY, _state_dict(torch_model), dtype=jnp.bfloat16)
  sample, context = _inputs(SD1_TINY, 2, 16, 7)
  t = np.array([0, 999])
  assert _rel(_jax_out(model16, sample, t, context), _jax_out(model, sample, t, context)) <= 5e-2
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))


def test_remat_gradients_match_torch():
  """``remat=True`` checkpoints the blocks and still gives diffusers' parameter gradients."""
  config = {**SD2_TINY, "block_out_channels": [32], "attention_head_dim": 2,
            "down_block_types": ["CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D"]}
  torch_model = _torch_unet(config)
  sample, context = _inputs(config, 1, 8, 3)
  out = torch_model(torch.from_numpy(sample), 100, torch.from_numpy(context)).sample
  out.pow(2).mean().backward()
  torch_grads = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}

  sample, context = jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(context)
  for remat in (False, True):
    model = _jax_unet(config, _state_dict(torch_model), remat=remat)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(model), s)(sample, 100, context))(
        nnx.state(model)))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == remat
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(sample, 100, context) ** 2)))(model)
  grads = to_torch_state_dict(nnx.merge(nnx.graphdef(model), nnx.state(grads, nnx.Param)))
  assert grads.keys() == torch_grads.keys()
  flat = lambda g: np.concatenate([g[k].ravel() for k in sorted(g)])
  assert _rel(flat(grads), flat(torch_grads)) <= 1e-4
  assert np.linalg.norm(flat(torch_grads)) > 0


def test_num_attention_heads_and_to_dict_round_trip():
  with_heads = {**SD2_TINY, "attention_head_dim": 99, "num_attention_heads": [2, 4]}
  config = UNetConfig.from_dict(with_heads)
  assert config.heads == (2, 4) == UNetConfig.from_dict(SD2_TINY).heads
  exported = config.to_dict()
  assert "num_attention_heads" not in exported
  assert UNetConfig.from_dict(exported).heads == (2, 4)
  # diffusers builds the same architecture from the exported config.
  torch_model = diffusers.UNet2DConditionModel(**exported)
  model = abstract_module(lambda rngs: UNet2DCondition(config, rngs=rngs))
  load_torch_state_dict(model, _state_dict(torch_model))
  assert UNetConfig.from_dict(UNetConfig.from_dict(SD1_TINY).to_dict()) == \
      UNetConfig.from_dict(SD1_TINY)


@pytest.mark.parametrize("change, words", [
    ({"cross_attn_magic": 1}, "unknown key(s): cross_attn_magic"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"addition_embed_type": "text"}, "addition_embed_type='text'"),
    ({"addition_embed_type": "text_time"}, "needs addition_time_embed_dim"),
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 8},
     "needs projection_class_embeddings_input_dim"),
    ({"only_cross_attention": [True, False]}, "only_cross_attention"),
    ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
    ({"down_block_types": ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]},
     "'SimpleCrossAttnDownBlock2D'"),
    ({"attention_head_dim": [8, 8, 8]}, "attention_head_dim"),
    ({"attention_head_dim": 5}, "not divisible by its 5 attention heads"),
    ({"transformer_layers_per_block": [[1, 2], [1, 2]]}, "transformer_layers_per_block"),
])
def test_config_errors(change, words):
  with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
    UNetConfig.from_dict({**SD1_TINY, **change})


def test_default_valued_unsupported_keys_accepted():
  config = UNetConfig.from_dict({**SD1_TINY, "class_embed_type": None, "dropout": 0,
                                 "resnet_out_scale_factor": 1, "only_cross_attention": [False] * 2,
                                 "addition_embed_type_num_heads": 64})
  assert config.block_out_channels == (32, 64)


def test_input_errors(sd1_pair):
  _, model = sd1_pair
  context = jnp.zeros((1, 7, 32))
  with pytest.raises(InputError, match="expected \\[B, H, W, 8\\]"):
    model(jnp.zeros((1, 8, 16, 16)), 1, context)
  with pytest.raises(InputError, match="multiples of 2"):
    model(jnp.zeros((1, 15, 16, 8)), 1, context)
  with pytest.raises(InputError, match="encoder_hidden_states"):
    model(jnp.zeros((1, 16, 16, 8)), 1, jnp.zeros((1, 7, 31)))
  with pytest.raises(InputError, match="timesteps"):
    model(jnp.zeros((1, 16, 16, 8)), jnp.zeros((3,)), context)
  with pytest.raises(InputError, match="takes no text_embeds"):
    model(jnp.zeros((1, 16, 16, 8)), 1, context, text_embeds=jnp.zeros((1, 4)))


def test_unsupported_keys_named_in_one_line():
  with pytest.raises(ConfigError) as info:
    UNetConfig.from_dict({**SDXL_TINY, "class_embed_type": "timestep", "act_fn": "gelu",
                          "addition_embed_type": "image"})
  message = str(info.value)
  assert "\n" not in message
  for words in ("class_embed_type='timestep'", "act_fn='gelu'", "addition_embed_type='image'"):
    assert words in message


def test_sdxl_input_errors(sdxl_pair):
  _, model = sdxl_pair
  sample, context = jnp.zeros((2, 16, 16, 8)), jnp.zeros((2, 7, 48))
  added = {k: jnp.asarray(v) for k, v in _added(2, 32).items()}
  with pytest.raises(InputError, match="needs text_embeds"):
    model(sample, 1, context)
  with pytest.raises(InputError, match="needs text_embeds"):
    model(sample, 1, context, text_embeds=added["text_embeds"])
  with pytest.raises(InputError, match=r"time_ids have shape \(6,\)"):
    model(sample, 1, context, text_embeds=added["text_embeds"], time_ids=added["time_ids"][0])
  with pytest.raises(InputError, match=r"text_embeds have shape \(1, 32\)"):
    model(sample, 1, context, text_embeds=added["text_embeds"][:1], time_ids=added["time_ids"])
  with pytest.raises(InputError, match="32 \\+ 5·8 = 72 added features.*is 80"):
    model(sample, 1, context, text_embeds=added["text_embeds"], time_ids=added["time_ids"][:, :5])
  with pytest.raises(InputError, match="encoder_hidden_states"):
    model(sample, 1, jnp.zeros((2, 7, 32)), **added)


def test_abstract_module_is_nnx_eval_shape_with_host_counters():
  """`abstract_module` builds the same abstract model as `nnx.eval_shape` (every parameter a
  shape and dtype, none in memory), only faster (its counters never enter the trace)."""
  config = UNetConfig.from_dict(SD1_TINY)
  fast = abstract_module(lambda rngs: UNet2DCondition(config, rngs=rngs))
  plain = nnx.eval_shape(lambda: UNet2DCondition(config, rngs=nnx.Rngs(0)))
  describe = lambda m: [(path, v.get_value().shape, v.get_value().dtype)
                        for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param))]
  assert describe(fast) == describe(plain) and len(describe(fast)) > 100
  assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
             for _, v in nnx.to_flat_state(nnx.state(fast, nnx.Param)))


if __name__ == "__main__":  # test_sdxl_shapes_parity's child process
  start = time.perf_counter()
  figures = _sdxl_shapes_parity()
  figures.update(seconds=time.perf_counter() - start,
                 peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
  print(json.dumps(figures))
