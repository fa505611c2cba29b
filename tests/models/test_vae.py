"""AutoencoderKL: parity with diffusers' PyTorch AutoencoderKL on random weights (torch side)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from flax import nnx

from jip2p.checkpoints import load_torch_state_dict
from jip2p.errors import ConfigError, InputError
from jip2p.models import vae

TINY = {
    "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8,
    "latent_channels": 4, "sample_size": 32,
}
SD15 = {
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
    "latent_channels": 4, "sample_size": 512,
}


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def nchw(x) -> np.ndarray:
  return np.asarray(x).transpose(0, 3, 1, 2)


def torch_vae(config: dict, seed: int = 0) -> diffusers.AutoencoderKL:
  """A random diffusers VAE whose norm affines are random too (so their mapping is tested)."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
        m.bias.copy_(0.2 * torch.randn_like(m.bias))
  return model


def jax_vae(tm: diffusers.AutoencoderKL, dtype=jnp.float32) -> vae.AutoencoderKL:
  config = vae.VAEConfig.from_dict(dict(tm.config))
  model = nnx.eval_shape(lambda: vae.AutoencoderKL(config, dtype=dtype, rngs=nnx.Rngs(0)))
  load_torch_state_dict(model, {k: v.numpy() for k, v in tm.state_dict().items()})
  return model


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """[n, 3, size, size] in [-1, 1], smooth enough to look like an image."""
  rs = np.random.RandomState(seed)
  x = rs.uniform(-1, 1, (n, 3, size // 4, size // 4)).astype(np.float32)
  return np.repeat(np.repeat(x, 4, axis=2), 4, axis=3) + 0.05 * rs.randn(n, 3, size, size).astype(
      np.float32)


@nnx.jit
def _encode(model, x):
  return model.encode(x)


@nnx.jit
def _decode(model, z):
  return model.decode(z)


def test_tiny_parity_encode_mode_decode():
  tm = torch_vae(TINY)
  model = jax_vae(tm)
  x = images(2, 32)
  with torch.no_grad():
    post = tm.encode(torch.from_numpy(x)).latent_dist
    dec = tm.decode(post.mode()).sample.numpy()
  got = _encode(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert got.mean.shape == (2, 16, 16, 4)
  assert rel_err(nchw(got.mean), post.mean.numpy()) <= 1e-4
  assert rel_err(nchw(got.logvar), post.logvar.numpy()) <= 1e-4
  assert rel_err(nchw(got.std), post.std.numpy()) <= 1e-4
  assert rel_err(nchw(got.mode()), post.mode().numpy()) <= 1e-4
  out = _decode(model, got.mode())
  assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32
  assert rel_err(nchw(out), dec) <= 1e-4


def test_config_roundtrip_and_errors():
  tm = diffusers.AutoencoderKL(**TINY)
  config = vae.VAEConfig.from_dict(dict(tm.config))  # carries _class_name, _diffusers_version
  assert config.scaling_factor == 0.18215 and config.downscale == 2
  assert vae.VAEConfig.from_dict(config.to_dict()) == config
  assert vae.VAEConfig(**TINY) == config  # same defaults as diffusers; lists become tuples
  assert hash(vae.VAEConfig(**TINY)) == hash(config)
  with pytest.raises(ConfigError, match="block_output"):
    vae.VAEConfig.from_dict({**TINY, "block_output": [32]})
  with pytest.raises(ConfigError, match="shift_factor"):
    vae.VAEConfig.from_dict({**TINY, "shift_factor": 0.1159})
  with pytest.raises(ConfigError, match="down_block_types"):
    vae.VAEConfig.from_dict({**TINY, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
  with pytest.raises(ConfigError, match="same length"):
    vae.VAEConfig.from_dict({**TINY, "up_block_types": ["UpDecoderBlock2D"]})
  with pytest.raises(ConfigError, match="attention_impl"):
    vae.AutoencoderKL(config, attention_impl="flash", rngs=nnx.Rngs(0))


def test_wrong_input_shapes_raise():
  model = nnx.eval_shape(lambda: vae.AutoencoderKL(vae.VAEConfig.from_dict(TINY),
                                                   rngs=nnx.Rngs(0)))
  with pytest.raises(InputError, match=r"images \[B, H, W, 3\]"):
    model.encode(jnp.zeros((1, 32, 32, 4)))
  with pytest.raises(InputError, match=r"latents \[B, h, w, 4\]"):
    model.decode(jnp.zeros((1, 4, 8, 8)))


def test_cudnn_request_keeps_wide_heads_on_xla():
  small = nnx.eval_shape(lambda: vae.AutoencoderKL(vae.VAEConfig.from_dict(TINY),
                                                   attention_impl="cudnn", rngs=nnx.Rngs(0)))
  assert small.encoder.mid_block.attentions[0].impl == "cudnn"  # 64-wide head: cuDNN takes it
  wide = nnx.eval_shape(lambda: vae.AutoencoderKL(vae.VAEConfig.from_dict(SD15),
                                                  attention_impl="cudnn", rngs=nnx.Rngs(0)))
  assert wide.decoder.mid_block.attentions[0].impl == "xla"  # 512-wide head: beyond cuDNN


def test_gaussian_clips_logvar_like_diffusers():
  moments = np.random.RandomState(1).randn(2, 8, 3, 3).astype(np.float32) * 40
  want = DiagonalGaussianDistribution(torch.from_numpy(moments))
  got = vae.DiagonalGaussian.from_moments(jnp.asarray(moments.transpose(0, 2, 3, 1)))
  assert np.asarray(got.logvar).min() == -30.0 and np.asarray(got.logvar).max() == 20.0
  np.testing.assert_allclose(nchw(got.mean), want.mean.numpy())
  np.testing.assert_allclose(nchw(got.logvar), want.logvar.numpy())
  np.testing.assert_allclose(nchw(got.std), want.std.numpy(), rtol=1e-6)


def test_sample_statistics():
  post = vae.DiagonalGaussian.from_moments(jnp.concatenate(
      [jnp.linspace(-2, 2, 16).reshape(1, 2, 2, 4),
       jnp.linspace(-3, 1, 16).reshape(1, 2, 2, 4)], axis=-1))
  n = 20000
  draws = np.asarray(jax.vmap(post.sample)(jax.random.split(jax.random.key(0), n)))
  assert draws.shape == (n, 1, 2, 2, 4)
  std = np.asarray(post.std)
  # Standard error of the mean is std/√n; of the std about std/√(2n).
  np.testing.assert_array_less(np.abs(draws.mean(0) - np.asarray(post.mean)), 5 * std / np.sqrt(n))
  np.testing.assert_allclose(draws.std(0), std, rtol=5 / np.sqrt(2 * n))
  key = jax.random.key(3)
  np.testing.assert_array_equal(post.sample(key), post.sample(key))
  assert not np.allclose(post.sample(key), post.sample(jax.random.key(4)))


def test_bfloat16_close_to_float32():
  tm = torch_vae({**TINY, "force_upcast": False})
  f32, bf16 = jax_vae(tm), jax_vae(tm, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  x = jnp.asarray(images(2, 32).transpose(0, 2, 3, 1))
  post32, post16 = _encode(f32, x), _encode(bf16, x)
  assert post16.mean.dtype == jnp.float32
  assert 0 < rel_err(post16.mean, post32.mean) < 5e-2
  out32, out16 = _decode(f32, post32.mean), _decode(bf16, post32.mean)
  assert out16.dtype == jnp.float32
  assert 0 < rel_err(out16, out32) < 5e-2


@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16])
def test_force_upcast_computes_in_float32(half):
  """force_upcast (diffusers' default, SDXL's VAE) makes a half-precision run's VAE compute in
  float32: the same numbers as a float32 VAE; without it, the half type's."""
  tm = torch_vae({**TINY, "scaling_factor": 0.13025, "force_upcast": True})
  f32, upcast = jax_vae(tm), jax_vae(tm, dtype=half)
  assert upcast.dtype == jnp.float32
  assert upcast.encoder.conv_in.dtype == upcast.decoder.conv_out.dtype == jnp.float32
  assert {p.dtype for p in jax.tree.leaves(nnx.state(upcast, nnx.Param))} == {np.dtype(np.float32)}
  assert vae.compute_dtype(upcast.config, jnp.float32) == jnp.float32
  x = jnp.asarray(images(2, 32).transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(_encode(upcast, x).mean, _encode(f32, x).mean)
  z = _encode(f32, x).mean
  np.testing.assert_array_equal(_decode(upcast, z), _decode(f32, z))
  tm.register_to_config(force_upcast=False)
  kept = jax_vae(tm, dtype=half)
  assert kept.dtype == kept.encoder.conv_in.dtype == half
  assert rel_err(_decode(kept, z), _decode(f32, z)) > 0


def test_legacy_attention_keys_load():
  tm = torch_vae(TINY)
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
             ".to_out.0.": ".proj_attn."}
  def legacy_key(key):
    for new, old in renames.items():
      key = key.replace(new, old) if ".attentions." in key else key
    return key

  legacy = {legacy_key(k): v.numpy() for k, v in tm.state_dict().items()}
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
  model = nnx.eval_shape(lambda: vae.AutoencoderKL(vae.VAEConfig.from_dict(TINY),
                                                   rngs=nnx.Rngs(0)))
  load_torch_state_dict(model, vae.canonical_state_dict(legacy))
  np.testing.assert_array_equal(
      model.decoder.mid_block.attentions[0].to_out[0].kernel.get_value(),
      tm.decoder.mid_block.attentions[0].to_out[0].weight.detach().numpy().T)


def test_sd15_shapes_parity():
  """The real SD 1.5 VAE (83.7M parameters) at 256×256, batch 1; about 1 min on 2 CPU cores."""
  tm = torch_vae(SD15)
  model = jax_vae(tm)
  x = images(1, 256)
  with torch.no_grad():
    post = tm.encode(torch.from_numpy(x)).latent_dist
    z = post.mean
    dec = tm.decode(z).sample.numpy()
  got = _encode(model, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert got.mean.shape == (1, 32, 32, 4)
  assert rel_err(nchw(got.mean), post.mean.numpy()) <= 1e-4
  assert rel_err(nchw(got.logvar), post.logvar.numpy()) <= 1e-4
  out = _decode(model, jnp.asarray(z.numpy().transpose(0, 2, 3, 1)))
  assert out.shape == (1, 256, 256, 3)
  assert rel_err(nchw(out), dec) <= 1e-4
