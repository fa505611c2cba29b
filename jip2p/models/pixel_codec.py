"""An exact pixel-space "autoencoder": space-to-depth with the `AutoencoderKL` interface.

The procedural edit world (`jip2p.data.synthetic`) has no pretrained VAE, and a learned one would
blur the exact edges its metrics score. This codec stands in for the VAE wherever jip2p uses one
(trainer, editor, export): ``encode`` folds each ``p × p`` patch of pixels into the channel axis
(a posterior of zero variance, so ``sample() == mode()``), ``decode`` unfolds it, and the round
trip is the identity. ``scaling_factor`` is 1: pixels in [-1, 1] already have about unit scale.

Shapes: images ``[B, H, W, C]`` in [-1, 1] with H, W multiples of ``patch_size`` ↔ latents
``[B, H/p, W/p, p·p·C]``, channels ordered (row in patch, column in patch, colour). No parameters:
a model folder's ``vae/`` holds only ``config.json`` (``"_class_name": "PixelCodec"``) and an empty
safetensors file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jip2p.errors import ConfigError, InputError
from jip2p.models.attention import IMPLEMENTATIONS
from jip2p.models.vae import DiagonalGaussian


@dataclasses.dataclass(frozen=True)
class PixelCodecConfig:
  """``config.json`` of the codec; ``sample_size`` is informational (the image side trained at)."""

  in_channels: int = 3
  patch_size: int = 4
  scaling_factor: float = 1.0
  sample_size: int = 64

  def __post_init__(self):
    for key in ("in_channels", "patch_size", "sample_size"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"PixelCodec config: {key}={value!r} must be a positive integer")
    if not self.scaling_factor > 0:
      raise ConfigError(f"PixelCodec config: scaling_factor={self.scaling_factor!r} must be > 0")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> PixelCodecConfig:
    """From a ``config.json`` dict; keys starting with ``_`` are metadata and ignored."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(d.keys() - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"PixelCodec config: unknown key(s) {', '.join(unknown)}")
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def latent_channels(self) -> int:
    return self.in_channels * self.patch_size ** 2

  @property
  def out_channels(self) -> int:
    return self.in_channels

  @property
  def downscale(self) -> int:
    """Image pixels per latent pixel along each side."""
    return self.patch_size


class PixelCodec(nnx.Module):
  """Space-to-depth encoder and its exact inverse; drop-in for `jip2p.models.vae.AutoencoderKL`."""

  def __init__(self, config: PixelCodecConfig, *, dtype=jnp.float32, attention_impl: str = "xla",
               rngs: nnx.Rngs | None = None):
    del rngs  # Nothing to initialise; the argument keeps the constructor the VAE's.
    if attention_impl not in IMPLEMENTATIONS:
      raise ConfigError(f"unknown attention_impl {attention_impl!r}; choose one of "
                        f"{IMPLEMENTATIONS}")
    self.config = config
    self.dtype = dtype

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """x [B, H, W, C] → a zero-variance posterior over [B, H/p, W/p, p·p·C] (float32)."""
    p, c = self.config.patch_size, self.config.in_channels
    if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % p or x.shape[2] % p:
      raise InputError(f"PixelCodec.encode expects images [B, H, W, {c}] with H and W multiples "
                       f"of {p}, got shape {tuple(x.shape)}")
    b, h, w, _ = x.shape
    z = x.astype(jnp.float32).reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    mean = z.reshape(b, h // p, w // p, p * p * c)
    return DiagonalGaussian(mean=mean, logvar=jnp.full_like(mean, -jnp.inf))

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, h, w, p·p·C] → images [B, h·p, w·p, C], float32."""
    p, c = self.config.patch_size, self.config.in_channels
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise InputError(f"PixelCodec.decode expects latents [B, h, w, "
                       f"{self.config.latent_channels}], got shape {tuple(z.shape)}")
    b, h, w, _ = z.shape
    x = z.astype(jnp.float32).reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)
