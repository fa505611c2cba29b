"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``, SD 1.x/2.x) in Flax NNX.

Every attribute path equals the diffusers state-dict key (``encoder.mid_block.attentions.0.to_q``,
``decoder.up_blocks.1.upsamplers.0.conv`` …), so `jip2p.checkpoints` loads it with the generic
mapping.

Shapes: images ``[B, H, W, in_channels]`` in [-1, 1]; latents ``[B, H/f, W/f, latent_channels]``
with f = 2^(len(block_out_channels) − 1) (8 for SD). ``encode`` and ``decode`` work on *unscaled*
latents, as diffusers' model does: the diffusion model sees ``config.scaling_factor · z`` and the
caller multiplies (InstructPix2Pix scales the target latents but feeds the image-conditioning
latent unscaled). Parameters are float32; ``dtype`` is the compute dtype (float32 instead of a
half type when the config says ``force_upcast``, as SDXL's VAE does: `compute_dtype`); group norms,
softmax and the returned moments and images are float32.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from jip2p.errors import ConfigError, InputError
from jip2p.models import layers
from jip2p.models.attention import IMPLEMENTATIONS

# diffusers' VAE builds every GroupNorm with eps 1e-6 (the UNet uses 1e-5).
_EPS = 1e-6
# cuDNN's flash kernel takes head dims up to 128 (256 on Hopper); the SD VAE's single head is 512
# wide, so such a layer runs on the XLA path whatever ``attention_impl`` says.
_CUDNN_MAX_HEAD_DIM = 128


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers ``AutoencoderKL`` ``config.json``; defaults are diffusers'.

  ``sample_size`` is kept for round trips only. ``force_upcast`` (diffusers' default true, so
  also for SD 1.x folders that do not say it) makes the VAE compute in float32 in a bfloat16 /
  float16 run (`compute_dtype`): SDXL's VAE overflows in half precision; the fp16-fix VAE says
  false.
  """

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    for key in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                "latents_std"):
      if isinstance(getattr(self, key), list):  # JSON lists; a module's config must hash
        object.__setattr__(self, key, tuple(getattr(self, key)))

    def unsupported(key, why):
      raise ConfigError(f"VAE config: {key}={getattr(self, key)!r} is not supported ({why})")

    if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
      unsupported("down_block_types", "only DownEncoderBlock2D")
    if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
      unsupported("up_block_types", "only UpDecoderBlock2D")
    if not len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels):
      raise ConfigError(
          f"VAE config: down_block_types ({len(self.down_block_types)}), up_block_types "
          f"({len(self.up_block_types)}) and block_out_channels ({len(self.block_out_channels)}) "
          "must have the same length")
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise ConfigError(f"VAE config: block_out_channels {self.block_out_channels} must be "
                        f"multiples of norm_num_groups={self.norm_num_groups}")
    if self.act_fn not in ("silu", "swish"):
      unsupported("act_fn", "only silu")
    for key in ("shift_factor", "latents_mean", "latents_std"):
      if getattr(self, key) is not None:
        unsupported(key, "SD 1.x/2.x VAEs have none")
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      if getattr(self, key) is not True:
        unsupported(key, "SD 1.x/2.x VAEs have it")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> VAEConfig:
    """From a diffusers ``config.json`` dict; keys starting with ``_`` are metadata and ignored."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(d.keys() - known)
    if unknown:
      raise ConfigError(f"VAE config: unknown key(s) {', '.join(unknown)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    """The diffusers ``config.json`` fields (lists for tuples, as JSON has them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each side."""
    return 2 ** (len(self.block_out_channels) - 1)


def compute_dtype(config: VAEConfig, dtype):
  """The VAE's compute dtype in a run of ``dtype``: float32 for a half type when
  ``config.force_upcast``, else ``dtype``."""
  if config.force_upcast and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return jnp.float32
  return dtype


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)) per latent element; both ``[B, h, w, C]``."""

  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """moments ``[B, h, w, 2C]``: mean channels first, then log-variance (clipped as diffusers)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean


class SpatialSelfAttention(layers.Attention):
  """The mid-block attention: GroupNorm, one head over all H·W positions, residual add.

  diffusers' ``Attention(group_norm=…, residual_connection=True)`` with heads=1 and biased q/k/v;
  the norm lives on the attention module itself (key ``attentions.0.group_norm``).
  """

  def __init__(self, channels: int, *, groups: int, name: str, impl: str, dtype,
               rngs: nnx.Rngs):
    if impl == "cudnn" and channels > _CUDNN_MAX_HEAD_DIM:
      impl = "xla"
    super().__init__(channels, heads=1, dim_head=channels, name=name, qkv_bias=True, impl=impl,
                     dtype=dtype, rngs=rngs)
    self.group_norm = layers.group_norm(channels, groups, _EPS, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] → [B, H, W, C]."""
    b, h, w, c = x.shape
    y = self.group_norm(x).astype(self.dtype).reshape(b, h * w, c)
    y = super().__call__(y, query_hw=(h, w)).reshape(b, h, w, c)
    return x + y


def _resnet(cin: int, cout: int, groups: int, dtype, rngs: nnx.Rngs) -> layers.ResnetBlock2D:
  return layers.ResnetBlock2D(cin, cout, temb_channels=None, groups=groups, eps=_EPS, dtype=dtype,
                              rngs=rngs)


class DownEncoderBlock2D(nnx.Module):
  """``num_layers`` resnets, then (except in the last block) a stride-2 conv."""

  def __init__(self, cin: int, cout: int, *, num_layers: int, groups: int, add_downsample: bool,
               dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, groups, dtype, rngs)
                             for i in range(num_layers)])
    self.downsamplers = (
        nnx.List([layers.Downsample2D(cout, asymmetric_pad=True, dtype=dtype, rngs=rngs)])
        if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """``num_layers`` resnets, then (except in the last block) nearest ×2 and a conv."""

  def __init__(self, cin: int, cout: int, *, num_layers: int, groups: int, add_upsample: bool,
               dtype, rngs: nnx.Rngs):
    self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, groups, dtype, rngs)
                             for i in range(num_layers)])
    self.upsamplers = (nnx.List([layers.Upsample2D(cout, dtype=dtype, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class MidBlock2D(nnx.Module):
  """resnet → attention → resnet at the lowest resolution (diffusers ``UNetMidBlock2D``)."""

  def __init__(self, channels: int, *, groups: int, name: str, impl: str, dtype,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([_resnet(channels, channels, groups, dtype, rngs) for _ in range(2)])
    self.attentions = nnx.List([SpatialSelfAttention(
        channels, groups=groups, name=f"{name}.attentions.0", impl=impl, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    return self.resnets[1](self.attentions[0](x))


class Encoder(nnx.Module):
  """image [B, H, W, in_channels] → moments [B, H/f, W/f, 2·latent_channels] (before quant_conv)."""

  def __init__(self, config: VAEConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    ch = config.block_out_channels
    groups = config.norm_num_groups
    self.dtype = dtype
    self.conv_in = layers.conv(config.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=config.layers_per_block,
                           groups=groups, add_downsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
        for i in range(len(ch))])
    self.mid_block = MidBlock2D(ch[-1], groups=groups, name="encoder.mid_block", impl=impl,
                                dtype=dtype, rngs=rngs)
    self.conv_norm_out = layers.group_norm(ch[-1], groups, _EPS, rngs=rngs)
    self.conv_out = layers.conv(ch[-1], 2 * config.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)).astype(self.dtype))


class Decoder(nnx.Module):
  """latents [B, h, w, latent_channels] (after post_quant_conv) → image [B, h·f, w·f, out_channels]."""

  def __init__(self, config: VAEConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    ch = tuple(reversed(config.block_out_channels))
    groups = config.norm_num_groups
    self.dtype = dtype
    self.conv_in = layers.conv(config.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock2D(ch[0], groups=groups, name="decoder.mid_block", impl=impl,
                                dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=config.layers_per_block + 1,
                         groups=groups, add_upsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
        for i in range(len(ch))])
    self.conv_norm_out = layers.group_norm(ch[-1], groups, _EPS, rngs=rngs)
    self.conv_out = layers.conv(ch[-1], config.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)).astype(self.dtype))


class AutoencoderKL(nnx.Module):
  """The KL-regularised autoencoder of Stable Diffusion (diffusers ``AutoencoderKL``); ``dtype``
  is the run's compute dtype, upcast by `compute_dtype` (``self.dtype`` is the one used)."""

  def __init__(self, config: VAEConfig, *, dtype=jnp.float32, attention_impl: str = "xla",
               rngs: nnx.Rngs):
    if attention_impl not in IMPLEMENTATIONS:
      raise ConfigError(f"unknown attention_impl {attention_impl!r}; choose one of "
                        f"{IMPLEMENTATIONS}")
    dtype = compute_dtype(config, dtype)
    self.config = config
    self.dtype = dtype
    c2 = 2 * config.latent_channels
    self.encoder = Encoder(config, impl=attention_impl, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(config, impl=attention_impl, dtype=dtype, rngs=rngs)
    self.quant_conv = layers.conv(c2, c2, 1, dtype=dtype, rngs=rngs)
    self.post_quant_conv = layers.conv(config.latent_channels, config.latent_channels, 1,
                                       dtype=dtype, rngs=rngs)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """x [B, H, W, in_channels] in [-1, 1] → posterior over unscaled latents [B, H/f, W/f, C]."""
    if x.ndim != 4 or x.shape[-1] != self.config.in_channels:
      raise InputError(f"VAE.encode expects images [B, H, W, {self.config.in_channels}], "
                       f"got shape {tuple(x.shape)}")
    moments = self.quant_conv(self.encoder(x.astype(self.dtype)))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, h, w, latent_channels] (unscaled) → images [B, h·f, w·f, out_channels], float32."""
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise InputError(f"VAE.decode expects latents [B, h, w, {self.config.latent_channels}], "
                       f"got shape {tuple(z.shape)}")
    x = self.decoder(self.post_quant_conv(z.astype(self.dtype)))
    return x.astype(jnp.float32)


_LEGACY_ATTENTION = re.compile(r"^(.*mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q.", "key": "to_k.", "value": "to_v.", "proj_attn": "to_out.0."}


def canonical_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Renames the pre-0.14 diffusers attention keys (query/key/value/proj_attn) of older VAE files.

  diffusers renames them the same way when it loads such a file; other keys pass unchanged.
  """
  def rename(key: str) -> str:
    m = _LEGACY_ATTENTION.match(key)
    return m.group(1) + _LEGACY_NAMES[m.group(2)] + key[m.end():] if m else key

  return {rename(k): v for k, v in state_dict.items()}
