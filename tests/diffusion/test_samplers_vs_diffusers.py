"""Whole sampling loops against diffusers' ``scheduler.step`` with the same fake ε-model, initial
noise and (for ancestral steps) the same per-step noise. Uses torch (diffusers), never
TensorFlow."""

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_ancestral_module
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jip2p.diffusion import samplers, schedules
from jip2p.errors import ConfigError
from tests.diffusion.conftest import IP2P_SCHEDULER_CONFIG

SHAPE = (2, 8, 8, 4)  # Elementwise model and steps: the layout does not matter.
CONFIG = schedules.SchedulerConfig.from_dict(IP2P_SCHEDULER_CONFIG)


def fake_eps(xp, x_in, t, i):
  return xp.tanh(0.9 * x_in + 0.0007 * t) + 0.05 * xp.sin(3.0 * x_in) * (1.0 + 0.02 * i)


def diffusers_loop(scheduler, n, noise, step_noises=None, **step_kwargs):
  """diffusers' pipeline loop: init_noise_sigma, scale_model_input, model, step."""
  scheduler.set_timesteps(n)
  latents = torch.from_numpy(noise) * scheduler.init_noise_sigma
  for i, t in enumerate(scheduler.timesteps):
    model_input = scheduler.scale_model_input(latents, t)
    eps = fake_eps(torch, model_input, t.float(), i)
    if step_noises is not None and "eta" in step_kwargs:
      step_kwargs["variance_noise"] = torch.from_numpy(step_noises[i])
    latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
  return latents.numpy()


def jip2p_loop(method, schedule, noise, key=None, **kwargs):
  fn = jax.jit(lambda n, s, k: samplers.sample(lambda x, t, i: fake_eps(jnp, x, t, i), n, s, k,
                                               method=method, **kwargs))
  return np.asarray(fn(noise, schedule, key))


def noise_and_draws(n, seed=0):
  key = jax.random.key(seed)
  noise = np.asarray(jax.random.normal(jax.random.key(100 + seed), SHAPE, jnp.float32))
  return noise, key, [np.asarray(samplers.step_noise(key, i, SHAPE)) for i in range(n)]


def assert_close(ours, ref, tol=1e-5):
  err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
  assert err < tol, f"relative max error {err:.2e}"


@pytest.mark.parametrize("n", [7, 25, 50])
def test_euler_matches_diffusers(n):
  noise, _, _ = noise_and_draws(n)
  ref = diffusers_loop(diffusers.EulerDiscreteScheduler.from_config(IP2P_SCHEDULER_CONFIG), n,
                       noise)
  assert_close(jip2p_loop("euler", schedules.make("diffusers_euler", n, CONFIG), noise), ref)


@pytest.mark.parametrize("n", [7, 25])
def test_euler_ancestral_matches_diffusers_given_the_same_draws(n, monkeypatch):
  noise, key, draws = noise_and_draws(n, 1)
  calls = iter(draws)
  monkeypatch.setattr(euler_ancestral_module, "randn_tensor",
                      lambda *args, **kwargs: torch.from_numpy(next(calls)))
  ref = diffusers_loop(diffusers.EulerAncestralDiscreteScheduler.from_config(IP2P_SCHEDULER_CONFIG),
                       n, noise)
  ours = jip2p_loop("euler_ancestral", schedules.make("diffusers_euler", n, CONFIG), noise, key)
  assert_close(ours, ref)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [7, 25, 50])
def test_ddim_matches_diffusers(n, eta):
  noise, key, draws = noise_and_draws(n, 2)
  ref = diffusers_loop(diffusers.DDIMScheduler.from_config(IP2P_SCHEDULER_CONFIG), n, noise, draws,
                       eta=eta)
  ours = jip2p_loop("ddim", schedules.make("diffusers_ddim", n, CONFIG), noise,
                    key if eta else None, eta=eta)
  assert_close(ours, ref)


@pytest.mark.parametrize("n", [7, 20, 25])
def test_dpmpp_2m_matches_diffusers(n):
  noise, _, _ = noise_and_draws(n, 3)
  ref = diffusers_loop(diffusers.DPMSolverMultistepScheduler.from_config(IP2P_SCHEDULER_CONFIG), n,
                       noise)
  assert_close(jip2p_loop("dpmpp_2m", schedules.make("diffusers_dpm", n, CONFIG), noise), ref)


V_CONFIG = {**IP2P_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}


@pytest.mark.parametrize("cls,method,kind", [
    (diffusers.EulerDiscreteScheduler, "euler", "diffusers_euler"),
    (diffusers.EulerAncestralDiscreteScheduler, "euler_ancestral", "diffusers_euler"),
    (diffusers.DDIMScheduler, "ddim", "diffusers_ddim"),
    (diffusers.DPMSolverMultistepScheduler, "dpmpp_2m", "diffusers_dpm")])
def test_v_prediction_loops_match_diffusers(cls, method, kind, monkeypatch):
  """The same fake model read as a v-prediction: its output is converted to ε as diffusers does."""
  n = 12
  noise, key, draws = noise_and_draws(n, 4)
  calls = iter(draws)
  monkeypatch.setattr(euler_ancestral_module, "randn_tensor",
                      lambda *args, **kwargs: torch.from_numpy(next(calls)))
  ref = diffusers_loop(cls.from_config(V_CONFIG), n, noise)
  config = schedules.SchedulerConfig.from_dict(V_CONFIG)
  assert config.prediction_type == "v_prediction"
  ours = jip2p_loop(method, schedules.make(kind, n, config), noise,
                    key if method == "euler_ancestral" else None, prediction_type="v_prediction")
  assert_close(ours, ref)
  eps_reading = jip2p_loop(method, schedules.make(kind, n, config), noise,
                           key if method == "euler_ancestral" else None)
  assert np.abs(eps_reading - ref).max() > 0.1  # The reading matters.


def test_an_unknown_prediction_type_is_named():
  with pytest.raises(ConfigError, match="prediction_type 'sample'"):
    samplers.sample(lambda x, t, i: x, np.zeros(SHAPE, np.float32),
                    schedules.make("discrete", 3, CONFIG), prediction_type="sample")
