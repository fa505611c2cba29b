"""The edit program: encode → two-scale guided sampling → decode, traced inside one `jax.jit`.

`jip2p.edit.Editor` and training's validation grid (`jip2p.train.evaluate`) both run `edit`, so
the images a run shows while it trains come from exactly the code its users edit with.

Example b of a batch draws everything from ``seeds[b]`` alone: its initial noise from the first
half of ``split(key(seed))`` (`initial_noise`), its ancestral noise of step i from the second half
folded with i. An edit therefore does not depend on the batch it lands in, and its seed reproduces
it on its own.

`edit` also returns whether each stage's output is all finite, computed inside the same program:
a model with NaN weights (or a float overflow) then stops the caller with the stage that went
wrong, at the cost of a few reductions and no extra host sync.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jip2p.diffusion import guidance, samplers
from jip2p.diffusion.schedules import Schedule

STAGES = ("text encoder", "VAE encoder", "UNet/sampler", "VAE decoder")


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Unit normal latents [B, *shape] float32, example b from the first half of key(seeds[b])."""
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s))[0])(seeds)
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _per_example_noise(keys: jax.Array, i: jax.Array, shape: tuple) -> jax.Array:
  """Ancestral noise of step i, drawn per example from its own key (batch-independent)."""
  return jax.vmap(lambda k: samplers.step_noise(k, i, shape[1:]))(keys)


def edit(unet, vae, text_encoder, images: jax.Array, input_ids: jax.Array,
         noise: jax.Array | None, seeds: jax.Array, schedule: Schedule, text_scale,
         image_scale, *, method: str, scaling_factor: float,
         prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """Edits a batch of B images with B instructions.

  Args:
    unet, vae, text_encoder: the InstructPix2Pix modules (a UNet taking 2 × the VAE's latent
      channels; a VAE with ``encode(x).mode()`` and ``decode``; a CLIP text encoder).
    images: float32 [B, H, W, 3] in [-1, 1].
    input_ids: int32 [B + 1, L], the instructions' tokens and, last, those of "" (the null text).
    noise: float32 [B, h, w, C] unit-variance initial latents, or None for `initial_noise`.
    seeds: uint32 [B], one per example.
    schedule: the sigma grid (`jip2p.diffusion.schedules`).
    text_scale, image_scale: s_T and s_I, scalars or [B].
    method: the sampler (`samplers.METHODS`).
    scaling_factor: the VAE's latent scale; prediction_type: the UNet's ("epsilon", "v_prediction").

  Returns:
    (pixels float32 [B, H, W, 3] in [-1, 1], finite bool [len(STAGES)]): finite[k] is whether
    every output of stage STAGES[k] (text states, image latents, sampled latents, decoded pixels)
    is finite; the first False names the stage that produced NaN or inf.
  """
  image_latents = vae.encode(images).mode()
  embeddings = text_encoder(input_ids)
  eps_fn = guidance.two_scale_eps_fn(unet, image_latents, embeddings[:-1], embeddings[-1],
                                     text_scale, image_scale)
  if noise is None:
    noise = initial_noise(seeds, shape=image_latents.shape[1:])
  step_keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s))[1])(seeds)
  latents = samplers.sample(eps_fn, noise, schedule, step_keys, method=method,
                            noise_fn=_per_example_noise, prediction_type=prediction_type)
  pixels = vae.decode(latents / scaling_factor)
  finite = jnp.stack([jnp.isfinite(x).all() for x in (embeddings, image_latents, latents, pixels)])
  return jnp.clip(pixels, -1.0, 1.0), finite
