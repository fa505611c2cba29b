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

An SDXL model (a second text encoder, a UNet with ``text_time`` added conditioning) is
conditioned as diffusers' ``StableDiffusionXLInstructPix2PixPipeline`` does it
(`text_conditioning`): the prompt states of both encoders and the pooled, projected text of the
second (`clip_text.encode_prompt_sdxl`), the micro-conditioning ``time_ids`` (original size,
crop's top left corner, target size) in every branch, and for the null text zeros in place of both
the states and the pooled text (the pipeline's ``force_zeros_for_empty_prompt``, its default) or,
with ``zero_null_text=False``, the encoding of "".

`edit` also returns whether each stage's output is all finite, computed inside the same program:
a model with NaN weights (or a float overflow) then stops the caller with the stage that went
wrong, at the cost of a few reductions and no extra host sync.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jip2p.diffusion import guidance, samplers
from jip2p.diffusion.schedules import Schedule
from jip2p.errors import ConfigError
from jip2p.models import clip_text

STAGES = ("text encoder", "VAE encoder", "UNet/sampler", "VAE decoder")


@functools.partial(jax.jit, static_argnames=("shape",))
def initial_noise(seeds: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Unit normal latents [B, *shape] float32, example b from the first half of key(seeds[b])."""
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s))[0])(seeds)
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _per_example_noise(keys: jax.Array, i: jax.Array, shape: tuple) -> jax.Array:
  """Ancestral noise of step i, drawn per example from its own key (batch-independent)."""
  return jax.vmap(lambda k: samplers.step_noise(k, i, shape[1:]))(keys)


def text_conditioning(unet, text_encoder, input_ids: jax.Array, text_encoder_2=None,
                      input_ids_2: jax.Array | None = None, time_ids: jax.Array | None = None, *,
                      zero_null_text: bool = True):
  """(unet_fn, the instructions' context, the null text's context) for `guidance`'s eps_fns.

  ``input_ids`` [B + 1, L]: the instructions' tokens and, last, those of "". Without
  ``text_encoder_2`` (SD 1.x/2.x) the contexts are the encoder's states [B, L, D] and [L, D] and
  ``unet_fn`` is the UNet. With it (SDXL): ``input_ids_2`` are the same texts through
  ``tokenizer_2`` and ``time_ids`` float32 [B, 6] each example's micro-conditioning; a context is
  the tuple (prompt states, pooled text, time ids), the null text's zeros (``zero_null_text``, as
  diffusers' pipeline by default) or the encoding of "", with the same time ids. ``unet_fn``
  passes keyword arguments (paired generation's attention ``control``) on to the UNet.
  """
  if text_encoder_2 is None:
    embeddings = text_encoder(input_ids)
    return unet, embeddings[:-1], embeddings[-1]
  if input_ids_2 is None or time_ids is None:
    raise ValueError("an SDXL edit needs input_ids_2 (tokenizer_2's) and time_ids [B, 6]")
  states, pooled = clip_text.encode_prompt_sdxl(text_encoder, text_encoder_2, input_ids,
                                                input_ids_2)
  null_states, null_pooled = sdxl_null_text((states[-1], pooled[-1]), zero_null_text)
  time_ids = jnp.asarray(time_ids, jnp.float32)

  def unet_fn(sample, timesteps, context, **kwargs):
    context_states, text_embeds, ids = context
    return unet(sample, timesteps, context_states, text_embeds=text_embeds, time_ids=ids,
                **kwargs)

  return (unet_fn, (states[:-1], pooled[:-1], time_ids), (null_states, null_pooled, time_ids))


def sdxl_null_text(encoded, zero_null_text: bool):
  """An SDXL model's null text from ``encoded``, the (prompt states, pooled text) of "": zeros of
  their shapes when ``zero_null_text`` (diffusers' ``force_zeros_for_empty_prompt``), else
  themselves. The editor's guidance and training's conditioning dropout both take it from here."""
  return jax.tree.map(jnp.zeros_like, encoded) if zero_null_text else encoded


def edit(unet, vae, text_encoder, images: jax.Array, input_ids: jax.Array,
         noise: jax.Array | None, seeds: jax.Array, schedule: Schedule, text_scale,
         image_scale, *, method: str, scaling_factor: float,
         prediction_type: str, text_encoder_2=None, input_ids_2: jax.Array | None = None,
         time_ids: jax.Array | None = None, zero_null_text: bool = True,
         scale_image_latents: bool = False) -> tuple[jax.Array, jax.Array]:
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
    text_encoder_2, input_ids_2, time_ids, zero_null_text: an SDXL model's (`text_conditioning`).
    scale_image_latents: multiply the image latents by ``scaling_factor`` (CosXL Edit, diffusers'
      ``is_cosxl_edit``); InstructPix2Pix models take them unscaled.

  Returns:
    (pixels float32 [B, H, W, 3] in [-1, 1], finite bool [len(STAGES)]): finite[k] is whether
    every output of stage STAGES[k] (text states, image latents, sampled latents, decoded pixels)
    is finite; the first False names the stage that produced NaN or inf.
  """
  image_latents = vae.encode(images).mode()
  if scale_image_latents:
    image_latents = image_latents * scaling_factor
  unet_fn, text, null = text_conditioning(unet, text_encoder, input_ids, text_encoder_2,
                                          input_ids_2, time_ids, zero_null_text=zero_null_text)
  eps_fn = guidance.two_scale_eps_fn(unet_fn, image_latents, text, null, text_scale, image_scale)
  if noise is None:
    noise = initial_noise(seeds, shape=image_latents.shape[1:])
  return _sample_and_decode(eps_fn, noise, schedule, seeds, vae, (text, null), image_latents,
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
  text_finite = jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(embeddings)]).all()
  finite = jnp.stack([text_finite] + [jnp.isfinite(x).all() for x in (image_latents, latents,
                                                                       pixels)])
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
  tail = dataclasses.replace(schedule, init_sigma=jnp.ones((), jnp.float32))
  return _sample_and_decode(eps_fn, start, tail, seeds, vae, embeddings, latents0,
                            method=method, scaling_factor=scaling_factor,
                            prediction_type=prediction_type)
