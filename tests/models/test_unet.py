"""Parity of jip2p's Flax UNet with diffusers' UNet2DConditionModel on random weights (torch side).

SLOW: ``test_sd15_shapes_parity`` runs the real 860M-parameter SD 1.5 shapes, torch then JAX (the
torch model is dropped before the JAX forward): about 3 minutes on 2 busy CPU cores, peak RSS
about 11 GB. The rest of the file takes 1-2 minutes, mostly XLA compiles.
"""

import gc
import time

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jip2p.checkpoints import load_torch_state_dict, to_torch_state_dict
from jip2p.errors import ConfigError, InputError
from jip2p.models.unet import UNet2DCondition, UNetConfig, timestep_embedding

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
  model = nnx.eval_shape(lambda: UNet2DCondition(parsed, rngs=nnx.Rngs(0), **kwargs))
  load_torch_state_dict(model, state_dict)
  return model


def _inputs(config, batch, hw, tokens, seed=0):
  rng = np.random.default_rng(seed)
  sample = rng.standard_normal((batch, config["in_channels"], hw, hw)).astype(np.float32)
  context = rng.standard_normal((batch, tokens, config["cross_attention_dim"])).astype(np.float32)
  return sample, context


def _torch_out(model, sample, t, context):
  with torch.no_grad():
    return model(torch.from_numpy(sample), torch.as_tensor(t),
                 torch.from_numpy(context)).sample.numpy()


# One jitted forward for all tests: a compile is cached per model structure and input shapes.
_forward = nnx.jit(lambda model, sample, t, context: model(sample, t, context))


def _jax_out(model, sample, t, context):
  out = _forward(model, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(t),
                 jnp.asarray(context))
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
  model = nnx.eval_shape(lambda: UNet2DCondition(config, rngs=nnx.Rngs(0)))
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
  model = nnx.eval_shape(lambda: UNet2DCondition(config, rngs=nnx.Rngs(0)))
  load_torch_state_dict(model, _state_dict(torch_model))
  assert UNetConfig.from_dict(UNetConfig.from_dict(SD1_TINY).to_dict()) == \
      UNetConfig.from_dict(SD1_TINY)


@pytest.mark.parametrize("change, words", [
    ({"cross_attn_magic": 1}, "unknown key(s): cross_attn_magic"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
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
