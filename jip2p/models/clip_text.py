"""The CLIP text encoders of Stable Diffusion (transformers ``CLIPTextModel`` and, for SDXL's
second encoder, ``CLIPTextModelWithProjection``) in Flax NNX, and SDXL's prompt encoding.

Attribute paths equal the keys of the text-encoder files SD checkpoints ship
(``text_model.encoder.layers.3.self_attn.q_proj.weight`` …), so `jip2p.checkpoints` loads them
with the generic mapping. transformers 5 drops the ``text_model.`` prefix from its own module
names and from the files it saves; `canonical_state_dict` puts it back.

Shapes: token ids ``[B, L]`` int32 (L ≤ max_position_embeddings, 77 for SD) → hidden states
``[B, L, D]`` float32; the projected pooled output (``text_embeds``) ``[B, projection_dim]``
float32. Parameters are float32; ``dtype`` is the compute dtype of the projections and MLPs; layer
norms, softmax and the residual stream are float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jip2p.errors import ConfigError, InputError
from jip2p.models import layers
from jip2p.models.attention import IMPLEMENTATIONS, dot_product_attention

# Keys a transformers config.json may carry that do not change the text encoder's function:
# CLIP's own training settings and PretrainedConfig's generic (mostly generation) ones.
_IGNORED_KEYS = frozenset({
    "attention_dropout", "dropout", "initializer_range", "initializer_factor",
    "architectures", "torch_dtype", "dtype", "transformers_version", "model_type",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "tie_word_embeddings", "id2label", "label2id", "problem_type",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "use_cache", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of a transformers ``CLIPTextConfig`` that shape the model; defaults are theirs.

  ``eos_token_id`` only matters for `CLIPTextEncoder.pooled`: configs written before
  transformers PR #24773 (SD 1.x/2.x ones among them) say 2, which transformers reads as "the
  end token is the largest id" and keeps for compatibility. ``projection_dim`` only shapes
  ``CLIPTextModelWithProjection``'s ``text_projection``.
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407
  projection_dim: int = 512

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ConfigError(f"CLIP text config: hidden_act={self.hidden_act!r} is not supported "
                        f"(choose one of {sorted(_ACTIVATIONS)})")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"CLIP text config: hidden_size={self.hidden_size} is not a multiple of "
                        f"num_attention_heads={self.num_attention_heads}")
    if self.eos_token_id is not None and not isinstance(self.eos_token_id, int):
      raise ConfigError(f"CLIP text config: eos_token_id={self.eos_token_id!r} is not supported "
                        "(a single id)")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
    """From a transformers ``config.json`` dict; keys starting with ``_`` are ignored."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if d.get("model_type", "clip_text_model") != "clip_text_model":
      raise ConfigError(f"CLIP text config: model_type={d['model_type']!r} is not supported "
                        "(a CLIPTextModel config has 'clip_text_model')")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(d.keys() - known - _IGNORED_KEYS)
    if unknown:
      raise ConfigError(f"CLIP text config: unknown key(s) {', '.join(unknown)}")
    return cls(**{k: v for k, v in d.items() if k in known})

  def to_dict(self) -> dict[str, Any]:
    """The transformers ``config.json`` fields that `from_dict` reads."""
    return dataclasses.asdict(self)


class CLIPAttention(nnx.Module):
  """Causal multi-head self-attention (q_proj / k_proj / v_proj / out_proj, all biased)."""

  def __init__(self, config: CLIPTextConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.heads = config.num_attention_heads
    self.impl = impl
    self.q_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)
    self.k_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)
    self.v_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)
    self.out_proj = layers.linear(d, d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, L, D] → [B, L, D]."""
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.heads, -1)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                split(self.v_proj(x)), causal=True, impl=self.impl)
    return self.out_proj(out.reshape(b, l, -1))


class CLIPMLP(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
    self.act = _ACTIVATIONS[config.hidden_act]
    self.fc1 = layers.linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
    self.fc2 = layers.linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, config: CLIPTextConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    self.self_attn = CLIPAttention(config, impl=impl, dtype=dtype, rngs=rngs)
    self.layer_norm1 = layers.layer_norm(config.hidden_size, config.layer_norm_eps, rngs=rngs)
    self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
    self.layer_norm2 = layers.layer_norm(config.hidden_size, config.layer_norm_eps, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    self.layers = nnx.List([CLIPEncoderLayer(config, impl=impl, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array, *, start: int = 0, stop: int) -> jax.Array:
    """Runs layers ``start`` … ``stop − 1``: [B, L, D] → [B, L, D]."""
    for layer in self.layers[start:stop]:
      x = layer(x)
    return x


class CLIPTextEmbeddings(nnx.Module):
  """Token embedding plus learned absolute position embedding (positions 0 … L−1)."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
    d = config.hidden_size
    self.token_embedding = nnx.Embed(config.vocab_size, d, dtype=jnp.float32, rngs=rngs)
    self.position_embedding = nnx.Embed(config.max_position_embeddings, d, dtype=jnp.float32,
                                        rngs=rngs)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    return (self.token_embedding(input_ids)
            + self.position_embedding(jnp.arange(input_ids.shape[-1]))[None])


class CLIPTextTransformer(nnx.Module):
  def __init__(self, config: CLIPTextConfig, *, impl: str, dtype, rngs: nnx.Rngs):
    self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
    self.encoder = CLIPEncoder(config, impl=impl, dtype=dtype, rngs=rngs)
    self.final_layer_norm = layers.layer_norm(config.hidden_size, config.layer_norm_eps,
                                              rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, num_layers: int, final_layer_norm: bool = True
               ) -> jax.Array:
    x = self.encoder(self.embeddings(input_ids), stop=num_layers)
    return self.final_layer_norm(x) if final_layer_norm else x


class CLIPTextEncoder(nnx.Module):
  """transformers ``CLIPTextModel``: what SD conditions on (the last or an earlier layer)."""

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, attention_impl: str = "xla",
               rngs: nnx.Rngs):
    if attention_impl not in IMPLEMENTATIONS:
      raise ConfigError(f"unknown attention_impl {attention_impl!r}; choose one of "
                        f"{IMPLEMENTATIONS}")
    self.config = config
    self.text_model = CLIPTextTransformer(config, impl=attention_impl, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, skip_last_layers: int = 0,
               final_layer_norm: bool = True) -> jax.Array:
    """input_ids [B, L] int → hidden states [B, L, D] float32, after ``final_layer_norm``.

    ``skip_last_layers=k`` stops k layers early and applies the final layer norm to that output:
    transformers' ``final_layer_norm(hidden_states[-1 - k])``. SD 1.x uses k=0 (the
    ``last_hidden_state``); diffusers' ``clip_skip=c`` is k=c, and SD 2.x's OpenCLIP "penultimate"
    conditioning is k=1 on its 24-layer encoder (diffusers ships it with 23 layers and k=0).
    ``final_layer_norm=False`` returns the layer's output as it is: transformers'
    ``hidden_states[-1 - k]``, what SDXL conditions on (k=1, see `encode_prompt_sdxl`).
    """
    self._check(input_ids, skip_last_layers)
    hidden = self.text_model(input_ids, num_layers=self.config.num_hidden_layers - skip_last_layers,
                             final_layer_norm=final_layer_norm)
    return hidden.astype(jnp.float32)

  def _check(self, input_ids: jax.Array, skip_last_layers: int) -> None:
    cfg = self.config
    if not 0 <= skip_last_layers < cfg.num_hidden_layers:
      raise ConfigError(f"skip_last_layers={skip_last_layers} must be in "
                        f"[0, {cfg.num_hidden_layers - 1}]")
    if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
      raise InputError(f"CLIP text encoder expects token ids [B, L≤{cfg.max_position_embeddings}],"
                       f" got shape {tuple(input_ids.shape)}")

  def pooled(self, input_ids: jax.Array, hidden: jax.Array) -> jax.Array:
    """The hidden state at each sequence's end token: [B, L] ids, [B, L, D] → [B, D].

    As transformers: with the legacy ``eos_token_id`` 2 the end token is the largest id
    (49407 ends every CLIP-tokenised prompt); otherwise the first position holding
    ``eos_token_id`` (padding may repeat it).
    """
    eos = self.config.eos_token_id
    if eos is None:
      raise ConfigError("CLIP text config has no eos_token_id; the pooled output needs one")
    pos = jnp.argmax(input_ids if eos == 2 else (input_ids == eos).astype(jnp.int32), axis=-1)
    return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]


class CLIPTextEncoderWithProjection(CLIPTextEncoder):
  """transformers ``CLIPTextModelWithProjection``: the encoder plus ``text_projection`` (a
  bias-free [D → projection_dim] linear) of the pooled output — SDXL's second text encoder
  (OpenCLIP ViT-bigG/14), whose projection is the pooled text the UNet's ``add_embedding`` reads.
  """

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32, attention_impl: str = "xla",
               rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.text_projection = layers.linear(config.hidden_size, config.projection_dim, bias=False,
                                         dtype=dtype, rngs=rngs)

  def text_embeds(self, input_ids: jax.Array, hidden: jax.Array) -> jax.Array:
    """transformers' ``text_embeds``: [B, L] ids and the last hidden states [B, L, D] (after
    ``final_layer_norm``) → the projected pooled output [B, projection_dim] float32."""
    return self.text_projection(self.pooled(input_ids, hidden)).astype(jnp.float32)

  def hidden_and_text_embeds(self, input_ids: jax.Array, *, skip_last_layers: int = 1
                             ) -> tuple[jax.Array, jax.Array]:
    """One pass for SDXL: (the output of the layer ``skip_last_layers`` before the last, with no
    final layer norm, [B, L, D] float32; ``text_embeds`` of the full encoder [B, P] float32)."""
    self._check(input_ids, skip_last_layers)
    model = self.text_model
    stop = self.config.num_hidden_layers - skip_last_layers
    hidden = model.encoder(model.embeddings(input_ids), stop=stop)
    last = model.final_layer_norm(model.encoder(hidden, start=stop,
                                                stop=self.config.num_hidden_layers))
    return hidden.astype(jnp.float32), self.text_embeds(input_ids, last)


def encode_prompt_sdxl(text_encoder: CLIPTextEncoder,
                       text_encoder_2: CLIPTextEncoderWithProjection, input_ids: jax.Array,
                       input_ids_2: jax.Array, *, clip_skip: int = 0
                       ) -> tuple[jax.Array, jax.Array]:
  """SDXL's text conditioning, as diffusers' SDXL pipelines' ``encode_prompt``.

  ``input_ids`` [B, L] from ``tokenizer/`` (CLIP ViT-L's, padded with ``<|endoftext|>``),
  ``input_ids_2`` [B, L] from ``tokenizer_2/`` (OpenCLIP bigG's, padded with ``!`` = id 0) →
  (``prompt_embeds`` [B, L, D1 + D2] float32: each encoder's penultimate hidden state — no final
  layer norm — concatenated, 768 + 1280 = 2048 for SDXL; ``pooled`` [B, P] float32: the second
  encoder's ``text_embeds``, 1280 for SDXL). ``clip_skip=c`` takes the layer c earlier in both,
  diffusers' ``hidden_states[-(c + 2)]``.
  """
  if not isinstance(text_encoder_2, CLIPTextEncoderWithProjection):
    raise ConfigError("SDXL's text_encoder_2 must be a CLIPTextModelWithProjection (its pooled "
                      f"output is projected); got a {type(text_encoder_2).__name__}")
  if input_ids.shape != input_ids_2.shape:
    raise InputError(f"SDXL token ids of the two tokenizers differ in shape: "
                     f"{tuple(input_ids.shape)} and {tuple(input_ids_2.shape)}")
  first = text_encoder(input_ids, skip_last_layers=1 + clip_skip, final_layer_norm=False)
  second, pooled = text_encoder_2.hidden_and_text_embeds(input_ids_2,
                                                         skip_last_layers=1 + clip_skip)
  return jnp.concatenate([first, second], axis=-1), pooled


class SDXLTextEncoders(nnx.Module):
  """SDXL's two text encoders as one module, so training carries them as one frozen text model:
  ``input_ids`` int32 [B, 2, L] (row 0 from ``tokenizer/``, row 1 from ``tokenizer_2/``) →
  `encode_prompt_sdxl`'s (prompt states [B, L, D1 + D2], pooled [B, P])."""

  def __init__(self, text_encoder: CLIPTextEncoder,
               text_encoder_2: CLIPTextEncoderWithProjection):
    self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return encode_prompt_sdxl(self.text_encoder, self.text_encoder_2, input_ids[:, 0],
                              input_ids[:, 1])


def canonical_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Adds the ``text_model.`` prefix that transformers 5 leaves out of a CLIPTextModel's saved
  keys (a CLIPTextModelWithProjection keeps it; its ``text_projection.`` sits beside it)."""
  return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
          for k, v in state_dict.items()}
