"""The validation image grid: fixed pairs edited with the current EMA weights during training.

The edit is the reference one (DESIGN.md §1): Euler ancestral on k-diffusion's discrete grid,
two-scale guidance, starting from noise fixed by a key, so grids of successive evaluations differ
only by the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jip2p.diffusion import guidance, samplers, schedules


def make_edit_fn(unet_def, vae_def, text_def, *, alphas_cumprod: np.ndarray, num_steps: int,
                 scaling_factor: float, text_scale: float, image_scale: float,
                 prediction_type: str = "epsilon") -> Callable:
  """edit(params, frozen, batch, key) → edited images float32 [B, H, W, 3] in [-1, 1]."""
  schedule = schedules.discrete(alphas_cumprod, num_steps)

  def edit(params, frozen, batch, key):
    unet = nnx.merge(unet_def, params)
    vae = nnx.merge(vae_def, frozen["vae"])
    text_encoder = nnx.merge(text_def, frozen["text_encoder"])
    image_latents = vae.encode(batch["input"]).mode()
    text = text_encoder(batch["input_ids"])
    eps_fn = guidance.two_scale_eps_fn(unet, image_latents, text, frozen["null_text"],
                                       text_scale, image_scale)
    k_init, k_steps = jax.random.split(key)
    noise = jax.random.normal(k_init, image_latents.shape, jnp.float32)
    latents = samplers.sample(eps_fn, noise, schedule, k_steps, method="euler_ancestral",
                              prediction_type=prediction_type)
    return jnp.clip(vae.decode(latents / scaling_factor), -1.0, 1.0)

  return edit

