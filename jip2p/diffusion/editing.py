"""The edit programs: encode → guided sampling → decode, each traced inside one `jax.jit`.

`edit` is InstructPix2Pix's (the image latents condition an 8-channel UNet, two-scale guidance);
`sdedit` is the paper's baseline, SDEdit (Meng et al. 2022) with a text-to-image model: the image
latents are noised to an intermediate step of the grid and denoised from there towards the
edited caption with plain classifier-free guidance.

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
from jip2p.errors import ConfigError

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
  return _sample_and_decode(eps_fn, noise, schedule, seeds, vae, embeddings, image_latents,
                            method=method, scaling_factor=scaling_factor,
                            prediction_type=prediction_type)


def _sample_and_decode(eps_fn, noise, schedule, seeds, vae, embeddings, image_latents, *,
                       method, scaling_factor, prediction_type):
  """The sampling loop (each example's ancestral noise from its seed) and the decode; the
  (clipped pixels, stage finite flags) `edit` and `sdedit` return."""
  step_keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s))[1])(seeds)
  latents = samplers.sample(eps_fn, noise, schedule, step_keys, method=method,
                            noise_fn=_per_example_noise, prediction_type=prediction_type)
  pixels = vae.decode(latents / scaling_factor)
  finite = jnp.stack([jnp.isfinite(x).all() for x in (embeddings, image_latents, latents, pixels)])
  return jnp.clip(pixels, -1.0, 1.0), finite


def sdedit_start(steps: int, strength: float) -> int:
  """The grid step SDEdit starts at for ``strength`` in (0, 1], as diffusers' img2img pipelines:
  ``int(steps · strength)`` steps are run, the last ones of the ``steps``-step grid."""
  if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
      0 < strength <= 1):
    raise ConfigError(f"strength must be in (0, 1], got {strength!r}")
  run = min(int(steps * strength), steps)
  if run < 1:
    raise ConfigError(f"strength {strength} of {steps} steps runs no step: raise the strength or "
                      f"the steps (at least {steps}·strength ≥ 1)")
  return steps - run


def sdedit(unet, vae, text_encoder, images: jax.Array, input_ids: jax.Array,
           noise: jax.Array | None, seeds: jax.Array, schedule: Schedule, text_scale, *,
           method: str, scaling_factor: float, prediction_type: str
           ) -> tuple[jax.Array, jax.Array]:
  """SDEdit on a batch of B images towards B captions, on the tail of a grid.

  ``schedule`` is the part of the grid that is run (the steps from `sdedit_start` on): the scaled
  VAE-mode latents x0 start at ``x0 + σ_0·noise`` in VE form (diffusers' ``add_noise`` at that
  step: √ᾱ·x0 + √(1 − ᾱ)·ε in DDPM form), and the UNet sees ``[null, caption]`` per step,
  combined as ``ε(∅) + s·(ε(c) − ε(∅))``. The encoder's mode is used where diffusers samples the
  posterior (its noise is small; the mode keeps one seed's draws to the initial noise).

  Args as `edit`, except: unet is a text-to-image UNet (its input channels are the VAE's latent
  channels); input_ids are the captions' tokens and, last, those of ""; text_scale is the
  guidance scale (scalar or [B]). Returns as `edit`.
  """
  latents0 = vae.encode(images).mode() * scaling_factor
  embeddings = text_encoder(input_ids)
  eps_fn = guidance.cfg_eps_fn(unet, embeddings[:-1], embeddings[-1], text_scale)
  if noise is None:
    noise = initial_noise(seeds, shape=latents0.shape[1:])
  start = latents0 + jnp.asarray(schedule.sigmas, jnp.float32)[0] * noise
  # `sample` starts from ``noise · init_sigma``: a grid whose init_sigma is 1 starts at ``start``.
  tail = Schedule(sigmas=schedule.sigmas, timesteps=schedule.timesteps,
                  init_sigma=jnp.ones((), jnp.float32), steps=schedule.steps)
  return _sample_and_decode(eps_fn, start, tail, seeds, vae, embeddings, latents0,
                            method=method, scaling_factor=scaling_factor,
                            prediction_type=prediction_type)
