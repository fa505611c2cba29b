"""Classifier-free guidance: the plain two-way form and InstructPix2Pix's two-scale form.

Two-scale guidance (Brooks et al. 2023, eq. 3) with text scale s_T and image scale s_I:

    ε = ε(∅, ∅) + s_I·(ε(I, ∅) − ε(∅, ∅)) + s_T·(ε(I, T) − ε(I, ∅))

always evaluated as written: s_T = 1 or s_I = 1 are ordinary values, not switches. (diffusers'
pipeline drops guidance altogether unless s_T > 1 and s_I ≥ 1, which changes the result for
s_T = 1, s_I ≠ 1; jip2p does not.) The three predictions come from one UNet call on a batch of 3B
ordered [text + image, null text + image, null text + zero image], like the reference and
diffusers, and are combined in float32. A v-prediction model's outputs are combined the same way
(the sampler's conversion to ε is affine with model-independent weights, so the two commute).

The text conditioning may be any pytree whose leaves have the batch first (SDXL's: the prompt
states, the pooled text and the micro-conditioning time ids, `jip2p.diffusion.editing`): the null
branch's is broadcast and concatenated leaf by leaf, and ``unet_fn`` receives the tree.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jip2p.diffusion.samplers import EpsFn

# unet_fn(sample [N, h, w, C + C_img], timesteps float32 [N], context [N, L, D] or a pytree of
# [N, ...] leaves) -> ε [N, h, w, C].
UnetFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def cfg(eps_uncond: jax.Array, eps_cond: jax.Array, scale) -> jax.Array:
  """Two-way guidance ``ε(∅) + s·(ε(c) − ε(∅))``; ``scale`` broadcasts against the ε's."""
  return eps_uncond + scale * (eps_cond - eps_uncond)


def two_scale_cfg(eps_cond: jax.Array, eps_img: jax.Array, eps_uncond: jax.Array, text_scale,
                  image_scale) -> jax.Array:
  """The two-scale formula on ε(I, T), ε(I, ∅), ε(∅, ∅); scales broadcast against the ε's."""
  return (eps_uncond + image_scale * (eps_img - eps_uncond)
          + text_scale * (eps_cond - eps_img))


def _with_null(text, null, order: str):
  """The contexts of a guided batch, leaf by leaf: ``null`` broadcast to ``text``'s shapes and
  dtypes, then ``[text, null, null]`` (order "tnn") or ``[null, text]`` ("nt")."""
  def leaf(t, n):
    n = jnp.broadcast_to(n, t.shape).astype(t.dtype)
    return jnp.concatenate([t, n, n] if order == "tnn" else [n, t])
  return jax.tree.map(leaf, text, null)


def _batch(tree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def _per_example(scale, ndim: int) -> jax.Array:
  """A scalar, or one scale per example ``[B]`` shaped to broadcast over ``[B, h, w, C]``."""
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim > 1:
    raise ValueError("a guidance scale is a scalar or one value per example, got shape "
                     f"{scale.shape}")
  return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim)) if scale.ndim else scale


def two_scale_eps_fn(unet_fn: UnetFn, image_latents: jax.Array, text_embeddings: jax.Array,
                     null_embeddings: jax.Array, text_scale, image_scale) -> EpsFn:
  """An ``eps_fn`` for `samplers.sample` that edits B images with B instructions at once.

  Args:
    unet_fn: the 8-channel InstructPix2Pix UNet (see `UnetFn`); the image latents are
      concatenated after the noisy latents on the channel axis.
    image_latents: ``[B, h, w, C_img]`` unscaled VAE-mode latents of the input images.
    text_embeddings: ``[B, L, D]`` CLIP embeddings of the instructions (or a pytree of ``[B, ...]``
      leaves, see the module docstring).
    null_embeddings: CLIP embedding of "" — ``[L, D]``, ``[1, L, D]`` or ``[B, L, D]`` (a pytree:
      leaves that broadcast to the text's).
    text_scale, image_scale: s_T and s_I, scalars or ``[B]`` (one per example, e.g. a sweep).

  Returns:
    ``eps_fn(x_in [B, h, w, C], t, i) -> ε`` float32, the guided prediction.
  """
  batch = image_latents.shape[0]
  if _batch(text_embeddings) != batch:
    raise ValueError(f"{batch} image latents but {_batch(text_embeddings)} text embeddings")
  context = _with_null(text_embeddings, null_embeddings, "tnn")
  images = jnp.concatenate([image_latents, image_latents, jnp.zeros_like(image_latents)])
  text_scale = _per_example(text_scale, image_latents.ndim)
  image_scale = _per_example(image_scale, image_latents.ndim)

  def eps_fn(x_in, t, i):
    del i  # The step index matters only to attention controllers, which this guidance has none of.
    if x_in.shape[0] != batch:
      raise ValueError(f"latents of batch {x_in.shape[0]} for {batch} image latents")
    sample = jnp.concatenate([jnp.concatenate([x_in] * 3), images.astype(x_in.dtype)], axis=-1)
    timesteps = jnp.full((3 * batch,), t, jnp.float32)
    eps = unet_fn(sample, timesteps, context).astype(jnp.float32)
    eps_cond, eps_img, eps_uncond = jnp.split(eps, 3)
    return two_scale_cfg(eps_cond, eps_img, eps_uncond, text_scale, image_scale)

  return eps_fn


def cfg_eps_fn(unet_fn: UnetFn, text_embeddings: jax.Array, null_embeddings: jax.Array,
               scale) -> EpsFn:
  """An ``eps_fn`` for `samplers.sample` with a text-to-image UNet and plain guidance (`cfg`):
  B latents, B captions ``[B, L, D]``, the null text as in `two_scale_eps_fn`, ``scale`` a scalar
  or ``[B]``. One UNet call on the batch ``[null, caption]`` per step."""
  batch = _batch(text_embeddings)
  context = _with_null(text_embeddings, null_embeddings, "nt")
  scale = _per_example(scale, 4)

  def eps_fn(x_in, t, i):
    del i
    if x_in.shape[0] != batch:
      raise ValueError(f"latents of batch {x_in.shape[0]} for {batch} captions")
    eps = unet_fn(jnp.concatenate([x_in, x_in]), jnp.full((2 * batch,), t, jnp.float32),
                  context).astype(jnp.float32)
    eps_uncond, eps_cond = jnp.split(eps, 2)
    return cfg(eps_uncond, eps_cond, scale)

  return eps_fn
