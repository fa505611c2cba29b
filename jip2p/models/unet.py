"""The Stable Diffusion UNet (SD 1.x / 2.x / XL): a Flax NNX port of diffusers'
``UNet2DConditionModel``.

Parameter paths equal the diffusers state-dict keys (``down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k.kernel`` ↔ ``...attn2.to_k.weight``), so `jip2p.checkpoints`
loads and exports it without a per-model table.

Shapes and dtypes at the boundary:
  sample                 ``[B, H, W, Cin]`` any float dtype; H, W multiples of 2**(#blocks − 1)
  timesteps              ``[B]`` or scalar, int or float (fractional timesteps are fine)
  encoder_hidden_states  ``[B, L, cross_attention_dim]`` (CLIP last hidden state, L = 77; SDXL:
                         both encoders' penultimate states concatenated, 768 + 1280 = 2048)
  text_embeds, time_ids  SDXL only (``addition_embed_type="text_time"``): the pooled, projected
                         text ``[B, P]`` any float dtype, and the micro-conditioning ``[B, N]``
                         (N = 6: original size, crop top-left, target size) int or float32
                         (bfloat16 would round sizes such as 1023); P + N ·
                         ``addition_time_embed_dim`` = ``projection_class_embeddings_input_dim``
  → noise prediction     ``[B, H, W, Cout]`` float32

Parameters are float32; ``dtype`` is the compute dtype (inputs are cast to it). Group and layer
norms compute their statistics in float32, attention logits and softmax are float32 (so
diffusers' ``upcast_attention`` holds whatever its value), the timestep and time-id sinusoids are
float32.

Every attention layer receives ``control=`` with its `AttentionInfo` (name = parameter path,
``is_cross``, ``query_hw``), which is how Prompt-to-Prompt and InstructPix2Pix's attention sharing
reach all 16 self- and 16 cross-attention layers of SD 1.5 (and all 70 + 70 of SDXL).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jip2p.errors import ConfigError, InputError
from jip2p.models import layers

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers keys that jip2p understands only at these values: the features the others switch on
# (class embeddings, addition embeddings other than SDXL's, other time embeddings, …) are part of
# no SD 1.x / 2.x / XL model.
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "act_fn": ("silu",),
    "dropout": (0.0,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# Known keys without effect here (they only matter with a feature rejected above).
_IGNORED = ("addition_embed_type_num_heads",)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture, in diffusers' ``config.json`` vocabulary; defaults are diffusers' (SD 1.x).

  Per-block keys (``layers_per_block``, ``attention_head_dim``, ``num_attention_heads``,
  ``transformer_layers_per_block``) take an int or one value per down block. As in diffusers,
  ``attention_head_dim`` is really the number of heads unless ``num_attention_heads`` is set.

  ``addition_embed_type="text_time"`` is SDXL's micro-conditioning: each of the ``time_ids`` goes
  through ``addition_time_embed_dim`` sinusoids, the pooled text is appended, and
  ``add_embedding`` (``projection_class_embeddings_input_dim`` → time embedding) adds the result
  to the timestep embedding.
  """

  sample_size: int | tuple[int, int] | None = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  use_linear_projection: bool = False
  upcast_attention: bool = False
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):
        object.__setattr__(self, f.name, tuple(value))
    self._validate()

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
    """From a diffusers ``unet/config.json`` dict; ``_``-prefixed keys are ignored.

    Every key jip2p does not know, or knows only at other values, is named in one `ConfigError`.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - names - set(_FIXED) - set(_IGNORED))
    if unknown:
      raise ConfigError(f"UNet config has unknown key(s): {', '.join(unknown)}")
    unsupported = []
    for key, allowed in _FIXED.items():
      value = d.get(key, allowed[0])
      values = value if key == "only_cross_attention" and isinstance(value, list) else [value]
      if not all(_is_one_of(v, allowed) for v in values):
        unsupported.append(f"{key}={value!r} (jip2p supports {' or '.join(map(repr, allowed))})")
    if unsupported:
      raise ConfigError(f"UNet config: not supported: {'; '.join(unsupported)}")
    return cls(**{k: v for k, v in d.items() if k in names})

  def to_dict(self) -> dict[str, Any]:
    """The diffusers ``config.json`` keys (lists for tuples) that rebuild this architecture.

    Heads are written as ``attention_head_dim``: diffusers refuses ``num_attention_heads``.
    """
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = list(value) if isinstance(value, tuple) else value
    if out.pop("num_attention_heads") is not None:
      out["attention_head_dim"] = list(self.heads)
    return out

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  def per_block(self, key: str) -> tuple[int, ...]:
    """An int-or-per-block key as one value per down block."""
    value = getattr(self, key)
    return (value,) * self.num_blocks if isinstance(value, int) else tuple(value)

  @property
  def heads(self) -> tuple[int, ...]:
    """Attention heads per down block (diffusers' naming quirk resolved)."""
    key = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
    return self.per_block(key)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  def _validate(self) -> None:
    n = self.num_blocks
    if n == 0 or any(not isinstance(c, int) or c <= 0 for c in self.block_out_channels):
      raise ConfigError(f"UNet config: block_out_channels={self.block_out_channels!r} must be "
                        "positive ints")
    for key, types, allowed in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                                ("up_block_types", self.up_block_types, _UP_TYPES)):
      if len(types) != n:
        raise ConfigError(f"UNet config: {key} has {len(types)} entries but block_out_channels "
                          f"has {n}")
      for t in types:
        if t not in allowed:
          raise ConfigError(f"UNet config: {key} entry {t!r} is not supported (choose from "
                            f"{', '.join(allowed)})")
    per_block = ["layers_per_block", "transformer_layers_per_block", "attention_head_dim"]
    if self.num_attention_heads is not None:
      per_block.append("num_attention_heads")
    for key in per_block:
      value = getattr(self, key)
      values = (value,) if isinstance(value, int) else value
      if (not isinstance(value, (int, tuple)) or isinstance(value, bool)
          or (isinstance(value, tuple) and len(value) != n)
          or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in values)):
        raise ConfigError(f"UNet config: {key}={value!r} must be a positive int or {n} of them")
    if not isinstance(self.cross_attention_dim, int) or self.cross_attention_dim <= 0:
      raise ConfigError(f"UNet config: cross_attention_dim={self.cross_attention_dim!r} is not "
                        "supported (one positive int)")
    if not isinstance(self.norm_num_groups, int) or self.norm_num_groups <= 0:
      raise ConfigError(f"UNet config: norm_num_groups={self.norm_num_groups!r} is not supported "
                        "(one positive int)")
    for c, heads in zip(self.block_out_channels, self.heads):
      if c % self.norm_num_groups:
        raise ConfigError(f"UNet config: block_out_channels entry {c} is not divisible by "
                          f"norm_num_groups={self.norm_num_groups}")
      if c % heads:
        raise ConfigError(f"UNet config: block_out_channels entry {c} is not divisible by its "
                          f"{heads} attention heads")
    for key in ("conv_in_kernel", "conv_out_kernel"):
      k = getattr(self, key)
      if not isinstance(k, int) or k <= 0 or k % 2 == 0:
        raise ConfigError(f"UNet config: {key}={k!r} is not supported (a positive odd int)")
    if self.downsample_padding not in (0, 1):
      raise ConfigError(f"UNet config: downsample_padding={self.downsample_padding!r} is not "
                        "supported (0 or 1)")
    for key in ("in_channels", "out_channels"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
        raise ConfigError(f"UNet config: {key}={getattr(self, key)!r} must be a positive int")
    supported = _FIXED["addition_embed_type"]
    if not _is_one_of(self.addition_embed_type, supported):
      raise ConfigError(f"UNet config: not supported: addition_embed_type="
                        f"{self.addition_embed_type!r} (jip2p supports "
                        f"{' or '.join(map(repr, supported))})")
    if self.addition_embed_type == "text_time":
      for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        value = getattr(self, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
          raise ConfigError(f"UNet config: addition_embed_type='text_time' needs {key} (a "
                            f"positive int), got {value!r}")


def _is_one_of(value: Any, allowed: tuple) -> bool:
  """Equality that keeps None, booleans and numbers apart (``0 == False`` in Python)."""
  for a in allowed:
    if a is None or isinstance(a, bool):
      if value is a:
        return True
    elif not isinstance(value, bool) and value == a:
      return True
  return False


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """diffusers' ``get_timestep_embedding``: [B] timesteps → [B, dim] float32 sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """linear_1 → SiLU → linear_2: sinusoids [B, C0] → time embedding [B, 4·C0]."""

  def __init__(self, cin: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.linear_1 = layers.linear(cin, dim, dtype=dtype, rngs=rngs)
    self.linear_2 = layers.linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class GEGLU(nnx.Module):
  """One projection to 2·inner, split into value and gate; value · gelu(gate) (exact erf gelu)."""

  def __init__(self, dim: int, inner: int, *, dtype, rngs: nnx.Rngs):
    self.proj = layers.linear(dim, 2 * inner, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """diffusers' ``FeedForward``: net = [GEGLU, Dropout(0), Linear], indexed like its state dict."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.net = nnx.List([GEGLU(dim, 4 * dim, dtype=dtype, rngs=rngs), nnx.Dropout(0.0),
                         layers.linear(4 * dim, dim, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.net:
      x = layer(x)
    return x


class BasicTransformerBlock(nnx.Module):
  """Pre-norm self-attention, cross-attention to the text, and a GEGLU feed-forward."""

  def __init__(self, dim: int, heads: int, context_dim: int, *, name: str, impl: str, dtype,
               rngs: nnx.Rngs):
    attn = functools.partial(layers.Attention, dim, heads=heads, dim_head=dim // heads, impl=impl,
                             dtype=dtype, rngs=rngs)
    self.norm1 = layers.layer_norm(dim, 1e-5, rngs=rngs)
    self.attn1 = attn(name=f"{name}.attn1")
    self.norm2 = layers.layer_norm(dim, 1e-5, rngs=rngs)
    self.attn2 = attn(name=f"{name}.attn2", cross_attention_dim=context_dim)
    self.norm3 = layers.layer_norm(dim, 1e-5, rngs=rngs)
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array, context: jax.Array, *, query_hw: tuple[int, int],
               control=None) -> jax.Array:
    """x [B, H·W, C], context [B, L, Dctx] → [B, H·W, C]."""
    x = x + self.attn1(self.norm1(x).astype(self.dtype), query_hw=query_hw, control=control)
    x = x + self.attn2(self.norm2(x).astype(self.dtype), context, query_hw=query_hw,
                       control=control)
    return x + self.ff(self.norm3(x).astype(self.dtype))


class Transformer2DModel(nnx.Module):
  """GroupNorm → proj_in → transformer blocks over the H·W tokens → proj_out, plus the input.

  proj_in/proj_out are 1×1 convs (SD 1.x) or Linears (``use_linear_projection``, SD 2.x); on
  NHWC both are the same map over channels, only the parameter layout differs.
  """

  def __init__(self, channels: int, heads: int, config: UNetConfig, num_layers: int, *,
               name: str, impl: str, dtype, rngs: nnx.Rngs):
    self.norm = layers.group_norm(channels, config.norm_num_groups, 1e-6, rngs=rngs)
    if config.use_linear_projection:
      self.proj_in = layers.linear(channels, channels, dtype=dtype, rngs=rngs)
      self.proj_out = layers.linear(channels, channels, dtype=dtype, rngs=rngs)
    else:
      self.proj_in = layers.conv(channels, channels, 1, dtype=dtype, rngs=rngs)
      self.proj_out = layers.conv(channels, channels, 1, dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, config.cross_attention_dim,
                              name=f"{name}.transformer_blocks.{j}", impl=impl, dtype=dtype,
                              rngs=rngs)
        for j in range(num_layers)])
    self.dtype = dtype

  def __call__(self, x: jax.Array, context: jax.Array, *, control=None) -> jax.Array:
    """x [B, H, W, C], context [B, L, Dctx] → [B, H, W, C]."""
    b, h, w, c = x.shape
    y = self.proj_in(self.norm(x).astype(self.dtype))
    y = y.reshape(b, h * w, c)
    for block in self.transformer_blocks:
      y = block(y, context, query_hw=(h, w), control=control)
    return self.proj_out(y).reshape(b, h, w, c) + x


def _resnet(cin: int, cout: int, config: UNetConfig, dtype, rngs: nnx.Rngs):
  return layers.ResnetBlock2D(cin, cout, temb_channels=config.time_embed_dim,
                              groups=config.norm_num_groups, eps=config.norm_eps, dtype=dtype,
                              rngs=rngs)


class DownBlock(nnx.Module):
  """diffusers' ``CrossAttnDownBlock2D`` (``cross_attention``) or ``DownBlock2D``.

  Resnets (each followed by a transformer when cross-attending), then an optional stride-2 conv;
  every intermediate output is kept as a skip for the matching up block.
  """

  def __init__(self, index: int, cin: int, cout: int, config: UNetConfig, *, cross_attention: bool,
               add_downsample: bool, impl: str, dtype, rngs: nnx.Rngs):
    n = config.per_block("layers_per_block")[index]
    self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, config, dtype, rngs)
                             for i in range(n)])
    depth = config.per_block("transformer_layers_per_block")[index]
    self.attentions = nnx.List([
        Transformer2DModel(cout, config.heads[index], config, depth,
                           name=f"down_blocks.{index}.attentions.{i}", impl=impl, dtype=dtype,
                           rngs=rngs)
        for i in range(n)]) if cross_attention else None
    self.downsamplers = nnx.List([layers.Downsample2D(
        cout, asymmetric_pad=config.downsample_padding == 0, dtype=dtype,
        rngs=rngs)]) if add_downsample else None

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, control=None
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """x [B, H, W, Cin] → (output [B, H', W', Cout], skips to concatenate on the way up)."""
    skips = ()
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context, control=control)
      skips += (x,)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips += (x,)
    return x, skips


class MidBlock(nnx.Module):
  """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) pairs."""

  def __init__(self, config: UNetConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    c = config.block_out_channels[-1]
    depth = config.per_block("transformer_layers_per_block")[-1]
    self.attentions = nnx.List([Transformer2DModel(c, config.heads[-1], config, depth,
                                                   name="mid_block.attentions.0", impl=impl,
                                                   dtype=dtype, rngs=rngs)])
    self.resnets = nnx.List([_resnet(c, c, config, dtype, rngs) for _ in range(2)])
    self.scale = config.mid_block_scale_factor

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, control=None
               ) -> jax.Array:
    """x [B, h, w, C] → [B, h, w, C]."""
    # diffusers divides each resnet's residual sum by output_scale_factor; this is the same.
    x = self.resnets[0](x, temb) / self.scale
    for attention, resnet in zip(self.attentions, self.resnets[1:]):
      x = attention(x, context, control=control)
      x = resnet(x, temb) / self.scale
    return x


class UpBlock(nnx.Module):
  """diffusers' ``CrossAttnUpBlock2D`` (``cross_attention``) or ``UpBlock2D``.

  Each resnet takes the running features concatenated (channels last) with the newest remaining
  skip; one more layer than the down block, then an optional ×2 nearest upsample + conv.
  """

  def __init__(self, index: int, cin: int, cprev: int, cout: int, config: UNetConfig, *,
               cross_attention: bool, add_upsample: bool, impl: str, dtype, rngs: nnx.Rngs):
    rev = config.num_blocks - 1 - index
    n = config.per_block("layers_per_block")[rev] + 1
    self.resnets = nnx.List([
        _resnet((cprev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, config, dtype,
                rngs)
        for i in range(n)])
    depth = config.per_block("transformer_layers_per_block")[rev]
    self.attentions = nnx.List([
        Transformer2DModel(cout, config.heads[rev], config, depth,
                           name=f"up_blocks.{index}.attentions.{i}", impl=impl, dtype=dtype,
                           rngs=rngs)
        for i in range(n)]) if cross_attention else None
    self.upsamplers = (nnx.List([layers.Upsample2D(cout, dtype=dtype, rngs=rngs)])
                       if add_upsample else None)

  def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array,
               context: jax.Array, control=None) -> jax.Array:
    """x [B, h, w, Cprev], skips (oldest first, consumed from the end) → [B, h', w', Cout]."""
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context, control=control)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


def _call_block(block: nnx.Module, *args) -> Any:
  """A block call as a plain function of the module, the form `nnx.remat` wraps."""
  return block(*args)


class UNet2DCondition(nnx.Module):
  """The conditional denoiser: (noisy latents, timesteps, text states) → predicted noise.

  ``attention_impl`` picks the `dot_product_attention` implementation (a control forces
  ``"xla"``); ``remat=True`` rematerialises each down, mid and up block in the backward pass
  (calls with a control, i.e. sampling, run unrematerialised).
  """

  def __init__(self, config: UNetConfig, *, dtype=jnp.float32, attention_impl: str = "xla",
               remat: bool = False, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.attention_impl = attention_impl
    self.remat = remat
    boc = config.block_out_channels
    n = config.num_blocks
    kw = dict(impl=attention_impl, dtype=dtype, rngs=rngs)

    self.conv_in = layers.conv(config.in_channels, boc[0], config.conv_in_kernel, dtype=dtype,
                               rngs=rngs)
    self.time_embedding = TimestepEmbedding(boc[0], config.time_embed_dim, dtype=dtype, rngs=rngs)
    # SDXL's micro-conditioning and pooled text (diffusers' add_time_proj has no parameters).
    self.add_embedding = (TimestepEmbedding(config.projection_class_embeddings_input_dim,
                                            config.time_embed_dim, dtype=dtype, rngs=rngs)
                          if config.addition_embed_type == "text_time" else None)

    self.down_blocks = nnx.List([
        DownBlock(i, boc[max(i - 1, 0)], boc[i], config,
                  cross_attention=t == "CrossAttnDownBlock2D", add_downsample=i < n - 1, **kw)
        for i, t in enumerate(config.down_block_types)])
    self.mid_block = MidBlock(config, **kw)
    rboc = boc[::-1]
    self.up_blocks = nnx.List([
        UpBlock(i, rboc[min(i + 1, n - 1)], rboc[max(i - 1, 0)], rboc[i], config,
                cross_attention=t == "CrossAttnUpBlock2D", add_upsample=i < n - 1, **kw)
        for i, t in enumerate(config.up_block_types)])

    self.conv_norm_out = layers.group_norm(boc[0], config.norm_num_groups, config.norm_eps,
                                           rngs=rngs)
    self.conv_out = layers.conv(boc[0], config.out_channels, config.conv_out_kernel, dtype=dtype,
                                rngs=rngs)

  def __call__(self, sample: jax.Array, timesteps: jax.Array | int | float,
               encoder_hidden_states: jax.Array, *, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None, control=None) -> jax.Array:
    """sample [B, H, W, Cin], timesteps [B] or scalar, text [B, L, Dctx] → [B, H, W, Cout] f32.

    ``text_embeds`` [B, P] and ``time_ids`` [B, N] are required by (and only by) an
    ``addition_embed_type="text_time"`` (SDXL) UNet: diffusers' ``added_cond_kwargs``.
    """
    cfg = self.config
    self._check_inputs(sample, encoder_hidden_states)
    self._check_added_inputs(sample.shape[0], text_embeds, time_ids)
    b = sample.shape[0]
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, (b,))
    if timesteps.shape != (b,):
      raise InputError(f"UNet timesteps have shape {timesteps.shape}; expected () or ({b},)")

    if cfg.center_input_sample:
      sample = 2.0 * sample - 1.0
    x = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0],
                               flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    temb = self.time_embedding(t_emb.astype(self.dtype))
    if self.add_embedding is not None:
      time_emb = timestep_embedding(jnp.reshape(time_ids, (-1,)), cfg.addition_time_embed_dim,
                                    flip_sin_to_cos=cfg.flip_sin_to_cos,
                                    freq_shift=cfg.freq_shift).reshape(b, -1)
      added = jnp.concatenate([text_embeds.astype(jnp.float32), time_emb], axis=-1)
      temb = temb + self.add_embedding(added.astype(self.dtype))

    # Rematerialisation only saves memory under differentiation; sampling with a control (whose
    # recorded arrays must not be traced inside a checkpoint) runs the blocks as they are.
    run = nnx.remat(_call_block) if self.remat and control is None else _call_block

    x = self.conv_in(x)
    skips = (x,)
    for block in self.down_blocks:
      x, block_skips = run(block, x, temb, context, control)
      skips += block_skips
    x = run(self.mid_block, x, temb, context, control)
    for block in self.up_blocks:
      n = len(block.resnets)
      x = run(block, x, skips[-n:], temb, context, control)
      skips = skips[:-n]

    x = jax.nn.silu(self.conv_norm_out(x)).astype(self.dtype)
    return self.conv_out(x).astype(jnp.float32)

  def _check_inputs(self, sample: jax.Array, context: jax.Array) -> None:
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise InputError(f"UNet sample has shape {tuple(sample.shape)}; expected [B, H, W, "
                       f"{cfg.in_channels}] (NHWC)")
    factor = 2 ** (cfg.num_blocks - 1)
    if sample.shape[1] % factor or sample.shape[2] % factor:
      raise InputError(f"UNet sample is {sample.shape[1]}×{sample.shape[2]}; height and width "
                       f"must be multiples of {factor}")
    if (context.ndim != 3 or context.shape[0] != sample.shape[0]
        or context.shape[-1] != cfg.cross_attention_dim):
      raise InputError(f"UNet encoder_hidden_states have shape {tuple(context.shape)}; expected "
                       f"[{sample.shape[0]}, L, {cfg.cross_attention_dim}]")

  def _check_added_inputs(self, batch: int, text_embeds: jax.Array | None,
                          time_ids: jax.Array | None) -> None:
    cfg = self.config
    if self.add_embedding is None:
      if text_embeds is not None or time_ids is not None:
        raise InputError("this UNet takes no text_embeds / time_ids (its config has "
                         f"addition_embed_type={cfg.addition_embed_type!r}, not 'text_time')")
      return
    if text_embeds is None or time_ids is None:
      raise InputError("this UNet (addition_embed_type='text_time', SDXL) needs text_embeds "
                       "[B, P] (the pooled text) and time_ids [B, N] (the micro-conditioning)")
    if text_embeds.ndim != 2 or text_embeds.shape[0] != batch:
      raise InputError(f"UNet text_embeds have shape {tuple(text_embeds.shape)}; expected "
                       f"[{batch}, P]")
    if time_ids.ndim != 2 or time_ids.shape[0] != batch:
      raise InputError(f"UNet time_ids have shape {tuple(time_ids.shape)}; expected [{batch}, N]")
    width = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
      raise InputError(
          f"UNet text_embeds [{batch}, {text_embeds.shape[1]}] and time_ids [{batch}, "
          f"{time_ids.shape[1]}] give {text_embeds.shape[1]} + {time_ids.shape[1]}·"
          f"{cfg.addition_time_embed_dim} = {width} added features; the config's "
          f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")
