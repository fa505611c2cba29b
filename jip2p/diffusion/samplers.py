"""Samplers for ε- and v-prediction diffusion models: the whole loop is one XLA loop.

`sample` is a pure, traceable function: call it inside the caller's `jax.jit` (with the model
closed over in ``eps_fn``) and a run of n steps is one compiled program, reused for every input,
schedule and key of the same shapes. A grid of fixed length loops over its steps (a `lax.scan`,
differentiable); a grid padded by `schedules.pad` carries its step count as data and loops that
many times (a while loop), so one program serves every step count up to the padded length.

Conventions (k-diffusion's, which the original InstructPix2Pix uses):
  * Latents are in VE form, ``x = x0 + σ·ε``. The model is called as
    ``eps_fn(x / √(σ_i² + 1), timesteps[i], i)``: the scaled input is the DDPM sample that
    diffusers' ``scale_model_input`` produces, ``t`` is the UNet's timestep and ``i`` the step index
    (int32 scalar, traced) so that attention controllers can depend on the step.
  * A v-prediction model's output is turned into ε before the step:
    ``ε = (v + σ·x_in)/√(σ² + 1)``, diffusers' conversion in VE form. It is affine in v with
    weights that do not depend on the model, so guidance may combine v's as it combines ε's.
  * An EDM grid (`schedules.edm`) carries the model's ``sigma_data`` σ_d (1 for every other
    grid): the model sees ``x_in = x / √(σ² + σ_d²)`` and ``ε = (σ_d·v + σ·x_in)/√(σ² + σ_d²)``,
    which is diffusers' EDM preconditioning (``c_skip·x + c_out·v`` as the denoised latents).
  * The run starts at ``x = noise · schedule.init_sigma`` (``noise`` unit-variance): σ_0·noise for
    k-diffusion grids, as the reference's ``randn · sigmas[0]``; diffusers' ``init_noise_sigma``
    for the diffusers grids.
  * It returns ``x_n / √(σ_n² + 1)``: x0 when the grid ends at σ = 0, and exactly the DDPM latents
    diffusers' DDIM returns when it ends at ᾱ_0.
  * Stochastic steps draw their noise as ``noise_fn(key, i, x.shape)``; the default is
    `step_noise`, ``normal(fold_in(key, i))``, independent per step and per key.

Methods:
  * ``euler_ancestral`` — k-diffusion ``sample_euler_ancestral`` (η = 1 by default): the
    reference sampler for editing and for pair generation.
  * ``euler`` — k-diffusion ``sample_euler`` without churn = diffusers' EulerDiscreteScheduler.
  * ``ddim`` — DDIM(η), η = 0 by default. In VE form DDIM(η) is the ancestral Euler step with
    σ_up = η·σ_{i+1}·√(1 − σ_{i+1}²/σ_i²), which is how it is computed; on the
    `schedules.diffusers_ddim` grid it equals diffusers' DDIMScheduler.
  * ``dpmpp_2m`` — DPM-Solver++(2M), k-diffusion ``sample_dpmpp_2m`` = diffusers'
    DPMSolverMultistepScheduler (dpmsolver++, midpoint, first order at the last step).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jip2p.diffusion.schedules import PREDICTION_TYPES, Schedule
from jip2p.errors import ConfigError

METHODS = ("euler_ancestral", "euler", "ddim", "dpmpp_2m")
_DEFAULT_ETA = {"euler_ancestral": 1.0, "ddim": 0.0}

# eps_fn(x_in [B, ...] float32, t float32 scalar, i int32 scalar) -> the model's prediction
# [B, ...]: ε, or v for a v-prediction model (sample's prediction_type).
EpsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# noise_fn(key, i, shape) -> unit normal noise broadcastable to shape.
NoiseFn = Callable[[jax.Array, jax.Array, tuple], jax.Array]
# post_step(x, i) -> x, applied to the VE latents after step i (e.g. Prompt-to-Prompt's LocalBlend);
# with a post_state, post_step(x, i, state) -> (x, state).
PostStep = Callable[..., Any]


def step_noise(key: jax.Array, i: jax.Array, shape: tuple) -> jax.Array:
  """The default ancestral noise of step i: float32 N(0, 1) from ``fold_in(key, i)``."""
  return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)


def shared_noise(group_size: int) -> NoiseFn:
  """A noise_fn whose draws are shared by consecutive groups of the batch.

  Batch rows ``[g·k, g·k + g)`` get the same noise each step, e.g. group_size=2 for batches of
  Prompt-to-Prompt pairs laid out ``[pair0·img0, pair0·img1, pair1·img0, …]``.
  """
  def noise_fn(key, i, shape):
    if shape[0] % group_size:
      raise ValueError(f"batch of {shape[0]} is not a whole number of groups of {group_size}")
    draws = step_noise(key, i, (shape[0] // group_size, *shape[1:]))
    return jnp.repeat(draws, group_size, axis=0)
  return noise_fn


def _ancestral_sigmas(sigma, sigma_next, eta):
  """k-diffusion's ``get_ancestral_step``: (σ_down, σ_up), σ_up capped at σ_next."""
  var = sigma_next ** 2 * jnp.maximum(sigma ** 2 - sigma_next ** 2, 0.0) / sigma ** 2
  sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(var))
  sigma_down = jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_up ** 2, 0.0))
  return sigma_down, sigma_up


def _check(method: str, eta: float | None, key: jax.Array | None, prediction_type: str) -> float:
  if prediction_type not in PREDICTION_TYPES:
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of "
                      f"{PREDICTION_TYPES}")
  if method not in METHODS:
    raise ConfigError(f"unknown sampler {method!r}; choose one of {METHODS}")
  if method not in _DEFAULT_ETA:
    if eta is not None:
      raise ConfigError(f"the {method} sampler is deterministic and takes no eta (got {eta})")
    return 0.0
  eta = _DEFAULT_ETA[method] if eta is None else float(eta)
  if eta < 0:
    raise ConfigError(f"eta must be ≥ 0, got {eta}")
  if eta > 0 and key is None:
    raise ValueError(f"the {method} sampler with eta={eta} draws noise: pass a jax.random key")
  return eta


def sample(eps_fn: EpsFn, noise: jax.Array, schedule: Schedule, key: jax.Array | None = None, *,
           method: str = "euler_ancestral", eta: float | None = None,
           noise_fn: NoiseFn | None = None, post_step: PostStep | None = None,
           post_state: Any = None, prediction_type: str = "epsilon"
           ) -> jax.Array | tuple[jax.Array, Any]:
  """Runs ``schedule.num_steps`` steps of ``method`` from unit-variance ``noise``.

  Args:
    eps_fn: the model, ``eps_fn(x_in, t, i) -> ε`` (or v, see ``prediction_type`` and the module
      docstring); its output is cast to float32.
    noise: ``[B, ...]`` unit-variance initial noise (the caller's, so that it can be shared).
    schedule: the grid (`schedules.discrete`, …).
    key: the key of the per-step noise; only needed when the method draws noise (η > 0).
    method: one of `METHODS`.
    eta: ancestral noise scale for ``euler_ancestral`` (default 1) and ``ddim`` (default 0); a
      Python number. Other methods take none.
    noise_fn: per-step noise, default `step_noise`; see `shared_noise`.
    post_step: optional ``post_step(x, i) -> x`` on the VE latents after each step.
    post_state: optional initial state (a pytree) carried from step to step for a stateful
      post_step, then called ``post_step(x, i, state) -> (x, state)`` (Prompt-to-Prompt's
      LocalBlend accumulates attention maps this way).
    prediction_type: what eps_fn returns, one of `schedules.PREDICTION_TYPES` (a model's
      ``SchedulerConfig.prediction_type``).

  Returns:
    float32 latents of noise's shape: ``x_n / √(σ_n² + 1)`` (x0 when the grid ends at 0); with
    a post_state, the pair (latents, final state).
  """
  eta = _check(method, eta, key, prediction_type)
  noise_fn = step_noise if noise_fn is None else noise_fn
  if post_state is not None and post_step is None:
    raise ValueError("a post_state is carried for a post_step: pass post_step too")
  sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
  timesteps = jnp.asarray(schedule.timesteps, jnp.float32)
  sigma_data = jnp.asarray(schedule.sigma_data, jnp.float32)
  # A padded grid's count is data (a while loop of `steps` trips); otherwise a fixed-length loop.
  n = schedule.timesteps.shape[0] if schedule.steps is None else schedule.steps
  x = jnp.asarray(noise, jnp.float32) * jnp.asarray(schedule.init_sigma, jnp.float32)

  def body(i, carry):
    x, old_denoised, state = carry
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    c_in = jax.lax.rsqrt(sigma ** 2 + sigma_data ** 2)
    x_in = x * c_in
    eps = eps_fn(x_in, timesteps[i], i).astype(jnp.float32)
    if prediction_type == "v_prediction":
      eps = (sigma_data * eps + sigma * x_in) * c_in
    if method == "euler":
      x = x + eps * (sigma_next - sigma)
    elif method in ("euler_ancestral", "ddim"):
      sigma_down, sigma_up = _ancestral_sigmas(sigma, sigma_next, eta)
      x = x + eps * (sigma_down - sigma)
      if eta > 0:
        x = x + noise_fn(key, i, x.shape) * sigma_up
    else:
      denoised = x - sigma * eps
      sigma_prev = sigmas[jnp.maximum(i - 1, 0)]
      x = _dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, i)
      old_denoised = denoised
    if post_state is not None:
      x, state = post_step(x, i, state)
    elif post_step is not None:
      x = post_step(x, i)
    return x, old_denoised, state

  x, _, state = jax.lax.fori_loop(0, n, body, (x, jnp.zeros_like(x), post_state))
  x = x * jax.lax.rsqrt(sigmas[n] ** 2 + 1)
  return x if post_state is None else (x, state)


def _dpmpp_2m_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, i):
  """One DPM-Solver++(2M) step in log-σ time; first order at the first step and when σ_next = 0."""
  ends = sigma_next <= 0
  h = jnp.log(sigma) - jnp.log(jnp.where(ends, 1.0, sigma_next))
  h_last = jnp.log(sigma_prev) - jnp.log(sigma)
  second_order = (i > 0) & ~ends
  half_inv_r = jnp.where(second_order, h / (2 * jnp.where(second_order, h_last, 1.0)), 0.0)
  d = (1 + half_inv_r) * denoised - half_inv_r * old_denoised
  ratio = jnp.where(ends, 0.0, sigma_next / sigma)
  return ratio * x + (1 - ratio) * d
