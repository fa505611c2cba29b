"""Blocks shared by the UNet and the VAE, named exactly like diffusers' modules.

Naming is the contract with `jip2p.checkpoints`: every attribute path of a jip2p module equals the
diffusers/transformers state-dict key (``down_blocks.0.resnets.1.conv1.weight`` ↔
``down_blocks[0].resnets[1].conv1.kernel``), so loading and exporting are one generic mapping
(conv OIHW ↔ HWIO, linear transposed, norm ``weight`` ↔ ``scale``) with no per-model tables.

Layout NHWC. Parameters are float32 (``param_dtype``); ``dtype`` is the compute dtype.
Group norms compute their statistics in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jip2p.models.attention import AttentionInfo, dot_product_attention


def abstract_module(make: Callable[[nnx.Rngs], nnx.Module], seed: int = 0) -> nnx.Module:
  """``make(rngs)`` with abstract parameters (`nnx.eval_shape`: shapes and dtypes, no memory),
  its random-number counters kept on the host. Traced, each draw's counter update makes flax
  ask a tracer for its sharding, whose error message walks the whole trace so far: quadratic in
  the number of parameters (21 s for SD 1.5's UNet on a 2-core CPU, minutes for SDXL's; 4 s
  this way)."""
  def build():
    rngs = nnx.Rngs(seed)
    counts = nnx.state(rngs, nnx.RngCount)
    nnx.update(rngs, jax.tree.map(lambda c: np.zeros(c.shape, c.dtype), counts))
    return make(rngs)
  return nnx.eval_shape(build)


def conv(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1, padding=None,
         dtype=jnp.float32) -> nnx.Conv:
  """A torch-style Conv2d: symmetric padding of kernel//2 unless given."""
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=pad,
                  dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(cin: int, cout: int, *, rngs: nnx.Rngs, bias: bool = True,
           dtype=jnp.float32) -> nnx.Linear:
  return nnx.Linear(cin, cout, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def group_norm(channels: int, groups: int, eps: float, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm computed in float32 (its output is cast back by the caller's next layer)."""
  return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


def layer_norm(channels: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(channels, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                       rngs=rngs)


class Attention(nnx.Module):
  """diffusers' ``Attention`` (to_q / to_k / to_v / to_out.0) over ``[B, L, C]`` sequences.

  Used for UNet self- and cross-attention and the VAE mid-block (heads=1, biased projections).
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int, name: str,
               cross_attention_dim: int | None = None, qkv_bias: bool = False,
               impl: str = "xla", dtype=jnp.float32, rngs: nnx.Rngs):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.impl = impl
    self.dtype = dtype
    self.name = name
    self.is_cross = cross_attention_dim is not None
    self.to_q = linear(query_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_k = linear(kv_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_v = linear(kv_dim, inner, bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.to_out = nnx.List([linear(inner, query_dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               query_hw: tuple[int, int] | None = None, control=None) -> jax.Array:
    """x [B, Lq, C]; context [B, Lk, Ck] (None: self-attention) → [B, Lq, C]."""
    context = x if context is None else context
    b, lq, _ = x.shape
    split = lambda t: t.reshape(b, t.shape[1], self.heads, -1)
    q = split(self.to_q(x))
    k = split(self.to_k(context))
    v = split(self.to_v(context))
    info = AttentionInfo(self.name, self.is_cross, query_hw) if control is not None else None
    out = dot_product_attention(q, k, v, impl=self.impl, control=control, info=info)
    return self.to_out[0](out.reshape(b, lq, -1))


class ResnetBlock2D(nnx.Module):
  """GroupNorm → SiLU → conv, twice, with an optional timestep projection and 1×1 shortcut."""

  def __init__(self, cin: int, cout: int, *, temb_channels: int | None, groups: int, eps: float,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm1 = group_norm(cin, groups, eps, rngs=rngs)
    self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs)
    self.time_emb_proj = (linear(temb_channels, cout, dtype=dtype, rngs=rngs)
                          if temb_channels else None)
    self.norm2 = group_norm(cout, groups, eps, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, Cin], temb [B, T] → [B, H, W, Cout]."""
    h = self.conv1(jax.nn.silu(self.norm1(x)).astype(self.dtype))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)).astype(self.dtype))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Downsample2D(nnx.Module):
  """Stride-2 3×3 conv. ``asymmetric_pad`` is the VAE's (0, 1, 0, 1) padding, else padding 1."""

  def __init__(self, channels: int, *, asymmetric_pad: bool = False, dtype=jnp.float32,
               rngs: nnx.Rngs):
    pad = ((0, 1), (0, 1)) if asymmetric_pad else 1
    self.conv = conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest-neighbour ×2 then a 3×3 conv."""

  def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)
