"""The one attention function of jip2p, and the hook that Prompt-to-Prompt edits through.

Every attention layer of the UNet, the VAE and the CLIP text encoder calls
`dot_product_attention`. Implementations:

  * ``"xla"``   — explicit logits (einsum, float32 softmax). The only path that exposes logits
                  and probabilities, so any `AttentionControl` forces it.
  * ``"cudnn"`` — `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel
                  on NVIDIA GPUs (bfloat16/float16 inputs).

Shapes at this boundary: q ``[B, Lq, H, D]``, k and v ``[B, Lk, H, D]`` → ``[B, Lq, H, D]`` in the
dtype of ``q``.

The hook. A model call takes ``control=`` (default None) and hands it to every attention layer
with an `AttentionInfo` describing the layer. The control object may rewrite the pre-softmax
logits (``edit_logits``: InstructPix2Pix's self-attention sharing) and the probabilities
(``edit_probs``: P2P replace / refine / reweight; reading them is how maps are stored). Both are
traced inside the caller's `jax.jit`, so a controller is plain Python holding jnp arrays (step
index, masks, …) and a whole generation stays one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class AttentionInfo:
  """Static description of one attention layer, for controllers.

  name: the layer's parameter path, e.g. ``"up_blocks.1.attentions.0.transformer_blocks.0.attn1"``.
  is_cross: True for cross-attention (keys are text tokens).
  query_hw: (height, width) of the query feature map for image attention, None for text.
  """

  name: str
  is_cross: bool
  query_hw: tuple[int, int] | None = None


class AttentionControl(Protocol):
  """What a controller implements; either method may return its input unchanged.

  logits and probs are float32 ``[B, H, Lq, Lk]``.
  """

  def edit_logits(self, logits: jax.Array, info: AttentionInfo) -> jax.Array:
    ...

  def edit_probs(self, probs: jax.Array, info: AttentionInfo) -> jax.Array:
    ...


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    impl: str = "xla",
    control: AttentionControl | None = None,
    info: AttentionInfo | None = None,
) -> jax.Array:
  """Scaled dot-product attention, softmax(q·kᵀ/√D)·v, over ``[B, L, H, D]`` tensors."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
  if control is not None:
    if info is None:
      raise ValueError("an attention control needs the layer's AttentionInfo")
    impl = "xla"
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    lq, lk = logits.shape[-2:]
    mask = jnp.tril(jnp.ones((lq, lk), dtype=bool), k=lk - lq)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  if control is not None:
    logits = control.edit_logits(logits, info)
  probs = jax.nn.softmax(logits, axis=-1)
  if control is not None:
    probs = control.edit_probs(probs, info)
  return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
