"""The one attention function of jip2p, and the hook that Prompt-to-Prompt edits through.

Every attention layer of the UNet, the VAE and the CLIP text encoder calls
`dot_product_attention`. Implementations:

  * ``"xla"``   — explicit logits (einsum, float32 softmax). The only path that exposes logits
                  and probabilities, so any `AttentionControl` forces it.
  * ``"cudnn"`` — `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel
                  on NVIDIA GPUs (bfloat16/float16 inputs).
  * ``"pallas"`` — the Pallas TPU flash-attention kernel
                  (`jax.experimental.pallas.ops.tpu.flash_attention`), forward and backward. Lengths
                  are zero-padded to its 128-wide blocks (padded keys masked by segment ids) and
                  head dims to 128 lanes, so the UNet's 77 text tokens and 40-wide heads run on it.
                  Under a mesh set with `jax.set_mesh` the kernel runs per device on the batch split
                  over all mesh axes (`jax.shard_map`): a kernel has no SPMD partitioning rule.
                  Off TPU it raises `ConfigError`, except inside `pallas_interpret()`, which runs
                  the same kernel in Pallas' TPU interpret mode (slow; for tests on CPU).

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

import contextlib
import contextvars
import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from jip2p.errors import ConfigError

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")

# The Pallas kernel's tile along both sequence axes, and the TPU's lane width (head dims).
_PALLAS_BLOCK = 128
_LANES = 128
_interpreting = contextvars.ContextVar("jip2p_pallas_interpret", default=False)


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
    raise ConfigError(f"unknown attention implementation {impl!r}; choose one of "
                      f"{IMPLEMENTATIONS}")
  if control is not None:
    if info is None:
      raise ValueError("an attention control needs the layer's AttentionInfo")
    impl = "xla"
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
  if impl == "pallas":
    return _pallas_attention(q, k, v, causal)

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


@contextlib.contextmanager
def pallas_interpret():
  """Runs ``impl="pallas"`` attention traced inside this context in Pallas' TPU interpret mode, on
  any backend: the kernel's own code, executed by XLA (for equality tests on CPU)."""
  from jax.experimental.pallas import tpu as pltpu
  # The interpreter sizes its simulated memories for the first device count it meets.
  pltpu.reset_tpu_interpret_mode_state()
  token = _interpreting.set(True)
  try:
    with pltpu.force_tpu_interpret_mode():
      yield
  finally:
    _interpreting.reset(token)


def _pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  """The Pallas TPU flash kernel on ``[B, L, H, D]``, per device under an ambient mesh."""
  backend = jax.default_backend()
  if backend != "tpu" and not _interpreting.get():
    raise ConfigError(f"attention implementation 'pallas' is a TPU kernel and the backend is "
                      f"{backend!r}: use 'cudnn' on NVIDIA GPUs or 'xla' elsewhere (tests may run "
                      "it on CPU inside jip2p.models.attention.pallas_interpret())")
  if causal and q.shape[1] != k.shape[1]:
    raise ConfigError(f"'pallas' attention supports causal masks only for equal query and key "
                      f"lengths, got {q.shape[1]} and {k.shape[1]}: use impl='xla'")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _pallas_flash(q, k, v, causal)
  if q.shape[0] % mesh.size:
    raise ConfigError(f"'pallas' attention splits the batch over the mesh's {mesh.size} devices, "
                      f"but the batch is {q.shape[0]}")
  spec = jax.sharding.PartitionSpec(mesh.axis_names)
  return jax.shard_map(lambda *a: _pallas_flash(*a, causal), mesh=mesh, in_specs=(spec,) * 3,
                       out_specs=spec, check_vma=False)(q, k, v)


def _pallas_flash(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_fa
  b, lq, _, d = q.shape
  lk = k.shape[1]
  pad_q, pad_k, pad_d = -lq % _PALLAS_BLOCK, -lk % _PALLAS_BLOCK, -d % _LANES
  # Zero head-dim padding adds nothing to q·k and gives zero output columns, which are cut off.
  to_kernel = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, pad_d))).swapaxes(1, 2)
  segment_ids = None
  if pad_k:  # Padded keys get segment 0, which no query (all segment 1) attends to.
    segment_ids = pallas_fa.SegmentIds(
        q=jnp.ones((b, lq + pad_q), jnp.int32),
        kv=jnp.broadcast_to((jnp.arange(lk + pad_k) < lk).astype(jnp.int32), (b, lk + pad_k)))
  out = pallas_fa.flash_attention(to_kernel(q, pad_q), to_kernel(k, pad_k), to_kernel(v, pad_k),
                                  segment_ids=segment_ids, causal=causal,
                                  sm_scale=1.0 / math.sqrt(d))
  return out.swapaxes(1, 2)[:, :lq, :, :d].astype(q.dtype)
