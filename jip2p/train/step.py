"""The InstructPix2Pix train step: one pure function of (state, frozen models, batch).

Per example (docs/design.md §1): target latents ``z = scaling · VAE.encode(edited).sample()``, image
conditioning ``VAE.encode(input).mode()`` (unscaled), text ``CLIP(instruction)``; conditioning
dropout; ``t ~ U{0..T−1}``, ``z_t = √ᾱ_t·z + √(1−ᾱ_t)·ε``; the UNet predicts ε from
``concat([z_t, image latent])`` — or the velocity ``v = √ᾱ_t·ε − √(1−ᾱ_t)·z`` for a v-prediction
model (the scheduler config's ``prediction_type``); loss = mean squared error in float32.

An SDXL model (`clip_text.SDXLTextEncoders` as the text model, a ``text_time`` UNet) is trained
the same way, conditioned as its editor (`jip2p.diffusion.editing`) conditions it: the text is the
pair (prompt states, pooled text), dropped text replaces both by the null text the editor uses
(zeros, or the encoding of "", per the folder's ``force_zeros_for_empty_prompt``), and the
micro-conditioning ``time_ids`` are each example's own (`micro_conditioning`): its original size
and crop from the batch, the trained crop's size as the target.

``task="text_to_image"`` is the same step for the base model an editor starts from: the UNet sees
``z_t`` alone, the text is the image's caption, and dropout replaces the text only (p of the
examples' ``2p``, as for an edit) — Stable Diffusion's training.

Every random draw is made at the shape of the *global* micro-batch from keys folded from
``(state.rng, step, micro-step)``, so results do not depend on how the batch is split over devices.
Gradients are accumulated over ``grad_accum`` micro-batches with `lax.scan`; micro-batch ``a``
takes rows ``a, a+A, a+2A…`` of the batch, so each device's rows stay on that device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jip2p.diffusion import schedules
from jip2p.errors import ConfigError
from jip2p.train import config as config_lib
from jip2p.train import sharding


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds besides the data position. ``rng`` is a raw uint32 key [2]."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
  rng: jax.Array


def make_optimizer(lr: float, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, grad_clip_norm: float = 0.0
                   ) -> optax.GradientTransformation:
  """AdamW at a constant learning rate (no warm-up), optionally after global-norm clipping."""
  adamw = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
  return adamw


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Step 0: EMA starts as a copy of the parameters."""
  params = jax.tree.map(jnp.asarray, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), ema=jax.tree.map(jnp.copy, params),
                    rng=jax.random.key_data(jax.random.key(seed)))


def initial_state(params, optimizer: optax.GradientTransformation, seed: int,
                  shardings: TrainState) -> TrainState:
  """`init_state` compiled to the state's ``shardings``, taking over ``params``: their buffers are
  donated and become the state's parameters, so the weights are not held twice while the
  optimizer state and EMA are made (five copies of the UNet at once where four are the state).
  ``params`` are deleted: drop every other reference to them (e.g. the module they came from)."""
  params = jax.device_put(params, shardings.params)
  init = jax.jit(lambda p: init_state(p, optimizer, seed), out_shardings=shardings,
                 donate_argnums=0)
  return init(params)


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """The original's LitEma: min(decay, (1 + n)/(10 + n)) at the n-th update (n from 1)."""
  if not warmup:
    return jnp.float32(decay)
  n = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def dropout_masks(key: jax.Array, batch: int, prob: float) -> tuple[jax.Array, jax.Array]:
  """(drop_text, drop_image), bool [batch], from one r ~ U(0, 1) per example.

  r < 2p drops the text, p ≤ r < 3p the image: p of the examples lose only the text, p both, p
  only the image (the original's ``prompt_mask`` and ``input_mask``).
  """
  r = jax.random.uniform(key, (batch,))
  return r < 2 * prob, (r >= prob) & (r < 3 * prob)


def drop_text(drop: jax.Array, text, null_text):
  """Rows ``drop`` (bool [B]) of ``text`` replaced by the null text: text [B, L, D] and null text
  [1, L, D] (SD: CLIP("")), or an SDXL model's pairs (states [B, L, D], pooled [B, P]) and
  (states [1, L, D], pooled [1, P])."""
  return jax.tree.map(
      lambda t, n: jnp.where(drop.reshape((-1,) + (1,) * (t.ndim - 1)), n.astype(t.dtype), t),
      text, null_text)


def conditioning_dropout(key: jax.Array, text, null_text, image_latents: jax.Array,
                         prob: float) -> tuple[Any, jax.Array]:
  """Replaces dropped text by the null text (`drop_text`) and zeroes dropped image latents.

  text as `drop_text`'s, image_latents [B, h, w, C] → the same shapes.
  """
  drop, drop_image = dropout_masks(key, image_latents.shape[0], prob)
  image_latents = jnp.where(drop_image[:, None, None, None], 0.0, image_latents)
  return drop_text(drop, text, null_text), image_latents


def micro_conditioning(batch: dict[str, Any], target_size: tuple[int, int]) -> jax.Array | None:
  """SDXL's ``time_ids`` of each example, float32 [B, 6]: the batch's ``original_size`` (height,
  width) and ``crop_top_left`` (top, left), int32 [B, 2], then ``target_size`` (height, width),
  the size of the crop trained on; in the order of `jip2p.edit.time_ids`. None for a batch
  without them (SD)."""
  if "original_size" not in batch:
    return None
  original = jnp.asarray(batch["original_size"], jnp.int32)
  target = jnp.broadcast_to(jnp.asarray(target_size, jnp.int32), original.shape)
  return jnp.concatenate([original, jnp.asarray(batch["crop_top_left"], jnp.int32), target],
                         axis=-1).astype(jnp.float32)


def _micro_batches(batch: dict[str, jax.Array], accum: int, mesh) -> dict[str, jax.Array]:
  """[B, …] → [A, B/A, …] with micro-batch a = rows a, a+A, …; the second axis stays split."""
  def split(x):
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def noised_and_target(latents: jax.Array, noise: jax.Array, sqrt_ac: jax.Array,
                      sqrt_1m_ac: jax.Array, prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(z_t, the UNet's target) for latents and noise [B, h, w, C] at √ᾱ_t, √(1−ᾱ_t) [B]:
  diffusers' ``add_noise`` and the noise or ``get_velocity``."""
  a, s = sqrt_ac[:, None, None, None], sqrt_1m_ac[:, None, None, None]
  noisy = a * latents + s * noise
  return noisy, (noise if prediction_type == "epsilon" else a * noise - s * latents)


def make_loss_fn(unet_def, vae_def, text_def, *, alphas_cumprod: np.ndarray,
                 scaling_factor: float, dropout: float, prediction_type: str = "epsilon",
                 task: str = "edit") -> Callable:
  """loss(params, frozen, micro_batch, key) → scalar float32 loss of one micro-batch.

  prediction_type: the UNet's target, "epsilon" or "v_prediction" (`schedules.PREDICTION_TYPES`).
  task: "edit" (micro-batch ``input``, ``edited``, ``input_ids``) or "text_to_image"
  (``edited``, the image to draw, and ``input_ids``, its caption). An SDXL model's micro-batch
  also holds ``original_size`` and ``crop_top_left`` (`micro_conditioning`); its ``input_ids``
  are what its text model reads (`clip_text.SDXLTextEncoders`: int32 [B, 2, L]).
  """
  if task not in config_lib.TASKS:
    raise ConfigError(f"unknown task {task!r}; choose one of {config_lib.TASKS}")
  if prediction_type not in schedules.PREDICTION_TYPES:
    raise ConfigError(f"unknown prediction_type {prediction_type!r}; choose one of "
                      f"{schedules.PREDICTION_TYPES}")
  sqrt_ac = jnp.asarray(np.sqrt(alphas_cumprod), jnp.float32)
  sqrt_1m_ac = jnp.asarray(np.sqrt(1.0 - alphas_cumprod), jnp.float32)
  num_timesteps = len(alphas_cumprod)

  def loss_fn(params, frozen, batch, key):
    k_sample, k_drop, k_t, k_noise = jax.random.split(key, 4)
    vae = nnx.merge(vae_def, frozen["vae"])
    text_encoder = nnx.merge(text_def, frozen["text_encoder"])
    if task == "text_to_image":
      latents = vae.encode(batch["edited"]).sample(k_sample) * scaling_factor
      text = jax.lax.stop_gradient(text_encoder(batch["input_ids"]))
      latents = jax.lax.stop_gradient(latents)
      dropped, _ = dropout_masks(k_drop, latents.shape[0], dropout)
      text = drop_text(dropped, text, frozen["null_text"])
      return _denoising_loss(params, latents, None, text, None, k_t, k_noise)
    # One encoder pass over both images (rows interleaved, so each device keeps its own rows):
    # half the program of two passes, twice the batch.
    b = batch["edited"].shape[0]
    pairs = jnp.stack([batch["edited"], batch["input"]], axis=1)
    posterior = vae.encode(pairs.reshape((2 * b,) + pairs.shape[2:]))
    posterior = jax.tree.map(lambda x: x.reshape((b, 2) + x.shape[1:]), posterior)
    latents = jax.tree.map(lambda x: x[:, 0], posterior).sample(k_sample) * scaling_factor
    image_latents = posterior.mode()[:, 1]
    text = text_encoder(batch["input_ids"])
    latents, image_latents, text = jax.lax.stop_gradient((latents, image_latents, text))
    text, image_latents = conditioning_dropout(k_drop, text, frozen["null_text"], image_latents,
                                               dropout)
    size = (latents.shape[1] * vae.config.downscale, latents.shape[2] * vae.config.downscale)
    return _denoising_loss(params, latents, image_latents, text, micro_conditioning(batch, size),
                           k_t, k_noise)

  def _denoising_loss(params, latents, image_latents, text, time_ids, k_t, k_noise):
    """The UNet's error on ``latents`` noised at a random t, given the text (and image); an SDXL
    UNet's text is (states, pooled), with the ``time_ids``."""
    b = latents.shape[0]
    t = jax.random.randint(k_t, (b,), 0, num_timesteps)
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    noisy, target = noised_and_target(latents, noise, sqrt_ac[t], sqrt_1m_ac[t], prediction_type)
    unet = nnx.merge(unet_def, params)
    x = noisy if image_latents is None else jnp.concatenate([noisy, image_latents], axis=-1)
    if time_ids is None:
      pred = unet(x, t, text)
    else:
      pred = unet(x, t, text[0], text_embeds=text[1], time_ids=time_ids)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))

  return loss_fn


def make_train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, mesh,
                    grad_accum: int, ema_decay_rate: float, ema_warmup: bool,
                    lr: float) -> Callable:
  """train_step(state, frozen, batch) → (state, metrics); jit it with the loop's shardings.

  batch: ``input`` (edit only), ``edited`` float [B, H, W, 3] in [-1, 1]; ``input_ids`` int32
  [B, 77] (SDXL: [B, 2, 77], and ``original_size``, ``crop_top_left`` int32 [B, 2]).
  metrics: ``loss``, ``grad_norm``, ``lr``, ``ema_decay`` (float32) and ``finite`` (bool). A
  non-finite loss or gradient leaves params, optimizer state and EMA as they were (the step
  counter still advances, so the data moves on); the loop decides whether to stop.
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: TrainState, frozen, batch):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    micro = _micro_batches(batch, grad_accum, mesh)

    def accumulate(carry, xs):
      loss_sum, grad_sum = carry
      mb, index = xs
      loss, grads = grad_fn(state.params, frozen, mb, jax.random.fold_in(step_key, index))
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    if grad_accum == 1:
      # No scan: XLA:CPU runs a convolution's gradient inside a loop body several times slower.
      loss, grads = grad_fn(state.params, frozen, jax.tree.map(lambda x: x[0], micro),
                            jax.random.fold_in(step_key, 0))
    else:
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros),
                                      (micro, jnp.arange(grad_accum)))
      loss = loss / grad_accum
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    step = state.step + 1
    decay = ema_decay(step, ema_decay_rate, ema_warmup)

    def update(params, opt_state, ema):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      ema = jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)
      return params, opt_state, ema

    # A branch, not a select of new against old values: a select keeps both alive (XLA:CPU's
    # temporaries at 3.1× the parameters, `test_the_skip_costs_no_copy_of_the_state`); the branch
    # updates the state in place and holds only the gradients (1×).
    params, opt_state, ema = jax.lax.cond(finite, update, lambda *old: old, state.params,
                                          state.opt_state, state.ema)
    new_state = TrainState(step=step, params=params, opt_state=opt_state, ema=ema, rng=state.rng)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
               "lr": jnp.float32(lr), "ema_decay": decay}
    return new_state, metrics

  return train_step
