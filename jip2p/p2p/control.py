"""Attention controllers for paired generation, as pure functions of traced arrays.

Two ways to make image 1 of a pair an edit of image 0, both through the models' attention hook
(`jip2p.models.attention.AttentionControl`):

  * `SelfAttentionSharing` — InstructPix2Pix's data generation (Brooks et al. 2023): in every
    self-attention layer, while ``p > i/(N−1)`` at step i of N, image 1's pre-softmax logits are
    replaced by image 0's, in both guidance halves. Cross-attention is untouched.
  * `PromptToPrompt` — Hertz et al. 2022 (google/prompt-to-prompt): image 1's cross-attention
    maps rebuilt from image 0's through a token map (Replace, Refine), scaled per token (Reweight),
    within per-token step windows; image 1's self-attention maps replaced by image 0's within a
    step window at coarse query resolutions. Conditional half only.

and `LocalBlend`, which confines the edit to where chosen words attend, blending the latents after
every step from cross-attention maps that an `AttentionStore` collects during the UNet call.

Controllers are frozen dataclasses registered as pytrees: per-candidate arrays are data, sizes
are static. They are built on the host (`jip2p.p2p.sampling` builds them from captions), passed
into the jitted sampler, and `at_step(i)` gives the controller of (traced) step i, so one compiled
program serves every p, caption and edit of the same shapes.

The UNet batch of K candidate pairs has 4K rows ordered [guidance half, candidate, image]:
half 0 unconditional (the empty caption), half 1 conditional; image 0 from caption 0, image 1
from the edited caption. For K = 1 that is the reference's
[uncond·caption0, uncond·caption1, cond·caption0, cond·caption1].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jip2p.models.attention import AttentionInfo
from jip2p.models.unet import UNetConfig


def split_halves(x: jax.Array, num_candidates: int) -> jax.Array:
  """``[4K, ...]`` UNet rows → ``[2 halves, K, 2 images, ...]``."""
  return x.reshape(2, num_candidates, 2, *x.shape[1:])


def merge_halves(x: jax.Array) -> jax.Array:
  """The inverse of `split_halves`."""
  return x.reshape(-1, *x.shape[3:])


def _expand(mask: jax.Array, ndim: int) -> jax.Array:
  return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def copy_image0(x: jax.Array, where: jax.Array, *, halves: tuple[int, ...] = (0, 1)) -> jax.Array:
  """Image 1's rows replaced by image 0's in the given halves, for candidates where ``where``.

  x: ``[4K, ...]`` UNet rows; where: bool ``[K]``.
  """
  parts = split_halves(x, where.shape[0])
  for half in halves:
    image0, image1 = parts[half, :, 0], parts[half, :, 1]
    parts = parts.at[half, :, 1].set(jnp.where(_expand(where, image1.ndim), image0, image1))
  return merge_halves(parts)


def attention_hw(config: UNetConfig, latent_hw: tuple[int, int]) -> tuple[int, int]:
  """The coarsest query resolution of the down/up blocks' attention layers.

  16×16 for SD 1.x at 512 px, the resolution Prompt-to-Prompt's LocalBlend reads and up to which
  it replaces self-attention maps; for smaller models the same rule picks the equivalent level.
  """
  levels = [i for i, t in enumerate(config.down_block_types) if t == "CrossAttnDownBlock2D"]
  levels += [config.num_blocks - 1 - i for i, t in enumerate(config.up_block_types)
             if t == "CrossAttnUpBlock2D"]
  if not levels:
    raise ValueError("the UNet has no attention layers outside its mid block")
  level = max(levels)
  return latent_hw[0] >> level, latent_hw[1] >> level


def ip2p_fraction(step: jax.Array, num_steps: int) -> jax.Array:
  """i/(N−1) as the reference compares p with (0 for a single step)."""
  return step.astype(jnp.float32) / max(num_steps - 1, 1)


@dataclasses.dataclass(frozen=True)
class SelfAttentionSharing:
  """InstructPix2Pix's attention sharing.

  p: float32 ``[K]``, the fraction of the N steps during which candidate k shares.
  step: int32 scalar, the current step (set by `at_step`).
  num_steps: N.
  """

  p: jax.Array
  step: jax.Array
  num_steps: int

  def at_step(self, i: jax.Array) -> SelfAttentionSharing:
    return dataclasses.replace(self, step=jnp.asarray(i, jnp.int32))

  def active(self) -> jax.Array:
    """bool ``[K]``: which candidates share at the current step (``p > i/(N−1)``)."""
    return self.p > ip2p_fraction(self.step, self.num_steps)

  def edit_logits(self, logits: jax.Array, info: AttentionInfo) -> jax.Array:
    if info.is_cross:
      return logits
    return copy_image0(logits, self.active())

  def edit_probs(self, probs: jax.Array, info: AttentionInfo) -> jax.Array:
    return probs


jax.tree_util.register_dataclass(SelfAttentionSharing, data_fields=["p", "step"],
                                 meta_fields=["num_steps"])


def edit_cross_attention(probs: jax.Array, token_map: jax.Array, keep: jax.Array,
                         equalizer: jax.Array, alpha: jax.Array) -> jax.Array:
  """Prompt-to-Prompt's cross-attention edit of the conditional half.

  probs ``[4K, H, Lq, L]``; token_map ``[K, L, L]``; keep, equalizer, alpha ``[K, L]``.
  Image 1's map of token n becomes
  ``alpha[n] · equalizer[n] · (Σ_w image0[w]·token_map[w, n] + keep[n]·image1[n])
  + (1 − alpha[n]) · image1[n]``.
  """
  parts = split_halves(probs, token_map.shape[0])
  base, own = parts[1, :, 0], parts[1, :, 1]
  per_token = lambda a: a[:, None, None, :]
  edited = jnp.einsum("khqw,kwn->khqn", base, token_map) + own * per_token(keep)
  edited = edited * per_token(equalizer)
  new = per_token(alpha) * edited + (1.0 - per_token(alpha)) * own
  return merge_halves(parts.at[1, :, 1].set(new.astype(probs.dtype)))


@dataclasses.dataclass(frozen=True)
class PromptToPrompt:
  """Prompt-to-Prompt's Replace / Refine / Reweight in one form (see `edit_cross_attention`).

  Replace: ``token_map`` the word-swap map, ``keep`` 0. Refine: ``token_map`` the alignment
  (columns scaled by alpha), ``keep`` 1 − alpha. Reweight alone: identity map, ``keep`` 0; with
  either of the others it scales their result, as the reference composes them.

  token_map: float32 ``[K, L, L]`` (source token rows, target token columns).
  keep, equalizer: float32 ``[K, L]``.
  cross_alpha: float32 ``[K, N, L]``, the weight of the edit per step and target token.
  self_window: int32 ``[K, 2]``, the steps [start, end) with image 1's self-attention maps
    replaced by image 0's, in layers whose query has at most ``self_max_pixels`` positions.
  step: int32 scalar, the current step.
  """

  token_map: jax.Array
  keep: jax.Array
  equalizer: jax.Array
  cross_alpha: jax.Array
  self_window: jax.Array
  step: jax.Array
  self_max_pixels: int

  def at_step(self, i: jax.Array) -> PromptToPrompt:
    return dataclasses.replace(self, step=jnp.asarray(i, jnp.int32))

  def edit_logits(self, logits: jax.Array, info: AttentionInfo) -> jax.Array:
    return logits

  def edit_probs(self, probs: jax.Array, info: AttentionInfo) -> jax.Array:
    if info.is_cross:
      alpha = jnp.take(self.cross_alpha, self.step, axis=1)
      return edit_cross_attention(probs, self.token_map, self.keep, self.equalizer, alpha)
    h, w = info.query_hw
    if h * w > self.self_max_pixels:
      return probs
    active = (self.self_window[:, 0] <= self.step) & (self.step < self.self_window[:, 1])
    return copy_image0(probs, active, halves=(1,))


jax.tree_util.register_dataclass(
    PromptToPrompt,
    data_fields=["token_map", "keep", "equalizer", "cross_alpha", "self_window", "step"],
    meta_fields=["self_max_pixels"])


class AttentionStore:
  """Wraps a controller (or none) for one traced UNet call and keeps the conditional half's
  cross-attention maps at one query resolution, after the controller's edit.

  Only down- and up-block layers are kept (the reference reads "down" and "up", not "mid").
  Lives only while one UNet call is traced: `maps` then holds traced values of that call.
  """

  def __init__(self, control, hw: tuple[int, int], num_candidates: int):
    self.control = control
    self.hw = tuple(hw)
    self.num_candidates = num_candidates
    self.layers: list[jax.Array] = []

  def edit_logits(self, logits: jax.Array, info: AttentionInfo) -> jax.Array:
    return logits if self.control is None else self.control.edit_logits(logits, info)

  def edit_probs(self, probs: jax.Array, info: AttentionInfo) -> jax.Array:
    if self.control is not None:
      probs = self.control.edit_probs(probs, info)
    if info.is_cross and info.query_hw == self.hw and not info.name.startswith("mid_block"):
      cond = split_halves(probs, self.num_candidates)[1]  # [K, 2, H, Lq, L]
      self.layers.append(cond.astype(jnp.float32).mean(axis=2))
    return probs

  def maps(self) -> jax.Array:
    """float32 ``[K, 2, h, w, L]``: the recorded maps averaged over heads and layers."""
    if not self.layers:
      raise ValueError(f"no cross-attention layer of the down/up blocks has {self.hw} queries")
    mean = jnp.mean(jnp.stack(self.layers), axis=0)
    return mean.reshape(*mean.shape[:2], *self.hw, mean.shape[-1])


@dataclasses.dataclass(frozen=True)
class LocalBlend:
  """Prompt-to-Prompt's LocalBlend: image 1 keeps image 0's latents outside the region where the
  chosen words attend.

  word_weights: float32 ``[K, 2, L]``, 1 on the chosen words' tokens of each caption.
  threshold: float32 ``[K]`` (the reference's 0.3).
  """

  word_weights: jax.Array
  threshold: jax.Array

  def mask(self, maps: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """Accumulated maps ``[K, 2, h, w, L]`` → float32 mask ``[K, H, W]`` at latent resolution.

    As the reference: the words' maps summed, a 3×3 max filter, nearest upsampling, division by
    the maximum, ``> threshold``, then the union of the two images' masks. A candidate without
    words (all-zero weights) gets a full mask: it is not blended.
    """
    m = jnp.einsum("kiyxl,kil->kiyx", maps, self.word_weights)
    m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 1, 1),
                              ((0, 0), (0, 0), (1, 1), (1, 1)))
    rows = _nearest(m.shape[2], latent_hw[0])
    cols = _nearest(m.shape[3], latent_hw[1])
    m = m[:, :, rows][:, :, :, cols]
    peak = jnp.max(m, axis=(2, 3), keepdims=True)
    m = jnp.where(peak > 0, m / jnp.where(peak > 0, peak, 1.0), 1.0)
    over = m > self.threshold[:, None, None, None]
    return (over[:, 0] | over[:, 1]).astype(jnp.float32)

  def __call__(self, x: jax.Array, maps: jax.Array) -> jax.Array:
    """x: latents ``[2K, H, W, C]`` ordered [candidate, image] → blended latents."""
    k = self.word_weights.shape[0]
    pairs = x.reshape(k, 2, *x.shape[1:])
    mask = self.mask(maps, x.shape[1:3])[..., None]
    image0, image1 = pairs[:, 0], pairs[:, 1]
    blended = jnp.where(mask > 0, image1, image0)  # = image0 + mask·(image1 − image0)
    return jnp.stack([image0, blended], axis=1).reshape(x.shape)


jax.tree_util.register_dataclass(LocalBlend, data_fields=["word_weights", "threshold"],
                                 meta_fields=[])


def _nearest(size_in: int, size_out: int) -> np.ndarray:
  """Source indices of torch's ``interpolate(mode="nearest")``: ⌊dst · in/out⌋."""
  scale = np.float32(size_in) / np.float32(size_out)
  return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64),
                    size_in - 1)
