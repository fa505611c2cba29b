"""Two-scale and plain classifier-free guidance against direct numpy. numpy + JAX only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jip2p.diffusion import guidance, samplers, schedules

B, H, W, L, D = 2, 4, 4, 5, 6
SCALES = [(7.5, 1.5), (1.0, 1.0), (1.0, 1.5), (7.5, 1.0), (0.0, 0.0), (3.0, 0.5), (1.0, 2.2)]


def rand(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("text_scale,image_scale", SCALES)
def test_two_scale_formula(text_scale, image_scale):
  cond, img, uncond = rand(0, B, H, W, 4), rand(1, B, H, W, 4), rand(2, B, H, W, 4)
  ours = np.asarray(guidance.two_scale_cfg(cond, img, uncond, text_scale, image_scale))
  paper = uncond + image_scale * (img - uncond) + text_scale * (cond - img)
  diffusers_order = uncond + text_scale * (cond - img) + image_scale * (img - uncond)
  np.testing.assert_allclose(ours, paper, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours, diffusers_order, rtol=1e-5, atol=1e-5)
  if (text_scale, image_scale) == (1.0, 1.0):
    np.testing.assert_allclose(ours, cond, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 1.0, 7.5])
def test_plain_cfg(scale):
  uncond, cond = rand(3, B, H, W, 4), rand(4, B, H, W, 4)
  np.testing.assert_allclose(np.asarray(guidance.cfg(uncond, cond, scale)),
                             uncond + scale * (cond - uncond), rtol=1e-6, atol=1e-6)


def fake_unet_np(sample, t, context):
  """Distinguishes every input: noisy latents, image latents, timestep and text."""
  return (np.tanh(sample[..., :4] + 0.5 * sample[..., 4:]) * (1 + t[:, None, None, None] / 1000)
          + context.mean(axis=(1, 2))[:, None, None, None])


def fake_unet_jnp(sample, t, context):
  return (jnp.tanh(sample[..., :4] + 0.5 * sample[..., 4:]) * (1 + t[:, None, None, None] / 1000)
          + context.mean(axis=(1, 2))[:, None, None, None])


def direct_numpy(x_in, t, image_latents, text, null, text_scale, image_scale):
  """Three separate calls, as the formula reads."""
  tt = np.full((B,), t, np.float32)
  def call(image, ctx):
    return fake_unet_np(np.concatenate([x_in, image], -1), tt, ctx)
  null = np.broadcast_to(null, text.shape)
  eps_cond = call(image_latents, text)
  eps_img = call(image_latents, null)
  eps_uncond = call(np.zeros_like(image_latents), null)
  ts = np.asarray(text_scale, np.float32).reshape(-1, 1, 1, 1)
  is_ = np.asarray(image_scale, np.float32).reshape(-1, 1, 1, 1)
  return eps_uncond + is_ * (eps_img - eps_uncond) + ts * (eps_cond - eps_img)


@pytest.mark.parametrize("text_scale,image_scale", SCALES[:4])
def test_two_scale_eps_fn_batches_three_ways(text_scale, image_scale):
  x_in, image = rand(5, B, H, W, 4), rand(6, B, H, W, 4)
  text, null = rand(7, B, L, D), rand(8, L, D)
  calls = []

  def unet_fn(sample, t, context):
    calls.append((sample, t, context))
    return fake_unet_jnp(sample, t, context)

  eps_fn = guidance.two_scale_eps_fn(unet_fn, image, text, null, text_scale, image_scale)
  ours = np.asarray(eps_fn(x_in, jnp.float32(321.0), jnp.int32(4)))
  np.testing.assert_allclose(ours, direct_numpy(x_in, 321.0, image, text, null, text_scale,
                                                image_scale), rtol=1e-5, atol=1e-5)
  # One UNet call on [text + image, null + image, null + zero image], as diffusers batches it.
  (sample, t, context), = calls
  assert sample.shape == (3 * B, H, W, 8) and t.shape == (3 * B,)
  np.testing.assert_array_equal(sample[..., :4], np.concatenate([x_in] * 3))
  np.testing.assert_array_equal(sample[..., 4:], np.concatenate([image, image, 0 * image]))
  np.testing.assert_array_equal(context, np.concatenate([text, np.stack([null] * B),
                                                         np.stack([null] * B)]))
  np.testing.assert_array_equal(t, np.full((3 * B,), 321.0))


def test_per_example_scales_equal_separate_runs():
  x_in, image = rand(9, B, H, W, 4), rand(10, B, H, W, 4)
  text, null = rand(11, B, L, D), rand(12, 1, L, D)
  text_scales, image_scales = np.array([7.5, 1.0], np.float32), np.array([1.2, 2.2], np.float32)
  batched = guidance.two_scale_eps_fn(fake_unet_jnp, image, text, null, text_scales, image_scales)
  ours = np.asarray(batched(x_in, 500.0, 0))
  for b in range(B):
    single = guidance.two_scale_eps_fn(fake_unet_jnp, image[b:b + 1], text[b:b + 1], null,
                                       text_scales[b], image_scales[b])
    np.testing.assert_allclose(ours[b:b + 1], np.asarray(single(x_in[b:b + 1], 500.0, 0)),
                               rtol=1e-6, atol=1e-6)


def test_edits_end_to_end_under_jit_deterministically():
  image, text, null = rand(13, B, H, W, 4), rand(14, B, L, D), rand(15, L, D)
  schedule = schedules.discrete(schedules.SchedulerConfig().alphas_cumprod(), 8)

  @jax.jit
  def edit(noise, image, text, schedule, key, text_scale, image_scale):
    eps_fn = guidance.two_scale_eps_fn(fake_unet_jnp, image, text, null, text_scale, image_scale)
    return samplers.sample(eps_fn, noise, schedule, key)

  noise = rand(16, B, H, W, 4)
  a = edit(noise, image, text, schedule, jax.random.key(0), 7.5, 1.5)
  b = edit(noise, image, text, schedule, jax.random.key(0), 7.5, 1.5)
  c = edit(noise, image, text, schedule, jax.random.key(0), 7.5, 1.0)
  assert a.shape == (B, H, W, 4) and np.isfinite(np.asarray(a)).all()
  assert np.array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_mismatched_batches_are_named():
  with pytest.raises(ValueError, match="2 image latents but 3 text embeddings"):
    guidance.two_scale_eps_fn(fake_unet_jnp, rand(0, 2, H, W, 4), rand(1, 3, L, D), rand(2, L, D),
                              7.5, 1.5)
  with pytest.raises(ValueError, match="scalar or one value per example"):
    guidance.two_scale_eps_fn(fake_unet_jnp, rand(0, 2, H, W, 4), rand(1, 2, L, D), rand(2, L, D),
                              np.ones((2, 2)), 1.5)
