"""Schedules against diffusers' schedulers (SD 1.5 / InstructPix2Pix config) and a float64 numpy
k-diffusion; scheduler_config.json reading. Uses torch (diffusers), never TensorFlow."""

import json
import math

import diffusers
import jax
import numpy as np
import pytest

from jip2p.diffusion import schedules
from jip2p.errors import CheckpointError, ConfigError
from tests.diffusion import kdiffusion_numpy as kd
from tests.diffusion.conftest import IP2P_SCHEDULER_CONFIG

STEPS = [1, 7, 20, 50, 100]
AC = kd.ldm_alphas_cumprod()


def from_config(cls, **overrides):
  return cls.from_config({**IP2P_SCHEDULER_CONFIG, **overrides})


@pytest.mark.parametrize("kind,start,end", [("scaled_linear", 0.00085, 0.012),
                                            ("linear", 0.0001, 0.02),
                                            ("squaredcos_cap_v2", 0.0001, 0.02)])
def test_betas_and_alphas_cumprod_match_diffusers(kind, start, end):
  ref = diffusers.DDPMScheduler(beta_schedule=kind, beta_start=start, beta_end=end)
  ours = schedules.betas(kind, 1000, start, end)
  np.testing.assert_allclose(ours, ref.betas.numpy(), rtol=1e-5)
  np.testing.assert_allclose(schedules.alphas_cumprod(ours), ref.alphas_cumprod.numpy(), rtol=1e-4)


def test_scaled_linear_is_compvis_schedule():
  np.testing.assert_allclose(schedules.SchedulerConfig().alphas_cumprod(), AC, rtol=1e-12)


@pytest.mark.parametrize("n", STEPS)
def test_discrete_matches_kdiffusion(n):
  ours = schedules.discrete(AC, n)
  sigmas, t = kd.discrete_sigmas(AC, n)
  np.testing.assert_allclose(ours.sigmas, sigmas, rtol=1e-6)
  assert ours.sigmas[-1] == 0 and ours.sigmas.shape == (n + 1,) and ours.num_steps == n
  np.testing.assert_allclose(ours.timesteps, t, atol=1e-4)
  # The UNet's t is what k-diffusion's CompVisDenoiser passes: sigma_to_t(σ_i).
  np.testing.assert_allclose(ours.timesteps, kd.sigma_to_t(sigmas[:-1], AC), atol=1e-3)
  assert ours.init_sigma == ours.sigmas[0]


@pytest.mark.parametrize("n", STEPS[1:])
def test_karras_matches_kdiffusion_and_diffusers(n):
  ours = schedules.karras(AC, n)
  train = kd.training_sigmas(AC)
  sigmas = kd.karras_sigmas(n, train[0], train[-1])
  np.testing.assert_allclose(ours.sigmas, sigmas, rtol=1e-6)
  np.testing.assert_allclose(ours.timesteps, kd.sigma_to_t(sigmas[:-1], AC), atol=1e-3)
  ref = from_config(diffusers.EulerDiscreteScheduler, use_karras_sigmas=True)
  ref.set_timesteps(n)
  np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-4)
  np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=2e-2)


def assert_grid_matches(ours, ref, *, ddpm_latents):
  """sigmas, timesteps and the initial noise scale of a diffusers scheduler."""
  np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-4)
  np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=1e-3)
  # diffusers starts at noise·init_noise_sigma, in VE form for Euler, in DDPM form for DDIM/DPM.
  init = float(ref.init_noise_sigma) * (math.sqrt(ours.sigmas[0] ** 2 + 1) if ddpm_latents else 1)
  np.testing.assert_allclose(ours.init_sigma, init, rtol=1e-4)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", [None, "leading", "trailing"])
@pytest.mark.parametrize("cls", [diffusers.EulerDiscreteScheduler,
                                 diffusers.EulerAncestralDiscreteScheduler])
def test_euler_grids_match_diffusers(cls, spacing, n):
  ref = from_config(cls, **({} if spacing is None else {"timestep_spacing": spacing}))
  ref.set_timesteps(n)
  config = schedules.SchedulerConfig.from_dict(dict(ref.config))
  assert_grid_matches(schedules.make("diffusers_euler", n, config), ref, ddpm_latents=False)


@pytest.mark.parametrize("n", STEPS + [61, 1000])
def test_trailing_spacing_has_n_steps(n):
  ref = from_config(diffusers.EulerDiscreteScheduler, timestep_spacing="trailing")
  ref.set_timesteps(n)
  ours = schedules.diffusers_euler(AC, n, spacing="trailing")
  assert ours.num_steps == n
  common = min(n, len(ref.timesteps))  # diffusers yields a bogus extra step for n = 61.
  np.testing.assert_allclose(ours.timesteps[:common], ref.timesteps.numpy()[:common])


@pytest.mark.parametrize("n", STEPS)
def test_ddim_grid_matches_diffusers(n):
  ref = from_config(diffusers.DDIMScheduler)
  ref.set_timesteps(n)
  ours = schedules.make("diffusers_ddim", n,
                        schedules.SchedulerConfig.from_dict(IP2P_SCHEDULER_CONFIG))
  np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
  ac = ref.alphas_cumprod.numpy().astype(np.float64)
  prev = ref.timesteps.numpy() - 1000 // n
  ac_next = np.where(prev >= 0, ac[np.maximum(prev, 0)], float(ref.final_alpha_cumprod))
  np.testing.assert_allclose(ours.sigmas[:-1], np.sqrt((1 - ac) / ac)[ref.timesteps.numpy()],
                             rtol=1e-4)
  np.testing.assert_allclose(ours.sigmas[1:], np.sqrt((1 - ac_next) / ac_next), rtol=1e-4)
  assert ours.sigmas[-1] > 0.02  # set_alpha_to_one=False: the run ends at ᾱ_0.
  np.testing.assert_allclose(ours.init_sigma / np.sqrt(ours.sigmas[0] ** 2 + 1),
                             ref.init_noise_sigma, rtol=1e-6)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing", [None, "leading", "trailing"])
def test_dpm_grid_matches_diffusers(spacing, n):
  ref = from_config(diffusers.DPMSolverMultistepScheduler,
                    **({} if spacing is None else {"timestep_spacing": spacing}))
  ref.set_timesteps(n)
  config = schedules.SchedulerConfig.from_dict(dict(ref.config))
  assert_grid_matches(schedules.make("diffusers_dpm", n, config), ref, ddpm_latents=True)


def test_schedule_is_a_pytree_of_float32():
  schedule = schedules.discrete(AC, 5)
  leaves = jax.tree.leaves(schedule)
  assert [leaf.shape for leaf in leaves] == [(6,), (5,), (), ()]  # …, init_sigma, sigma_data
  assert all(leaf.dtype == np.float32 for leaf in leaves)
  doubled = jax.jit(lambda s: jax.tree.map(lambda a: 2 * a, s))(schedule)
  assert isinstance(doubled, schedules.Schedule)
  np.testing.assert_allclose(doubled.sigmas, 2 * schedule.sigmas)


@pytest.mark.parametrize("cls", [diffusers.EulerAncestralDiscreteScheduler,
                                 diffusers.EulerDiscreteScheduler, diffusers.DDIMScheduler,
                                 diffusers.DPMSolverMultistepScheduler, diffusers.PNDMScheduler])
def test_reads_scheduler_configs_that_diffusers_writes(cls, tmp_path):
  from_config(cls).save_pretrained(tmp_path / "scheduler")
  config = schedules.from_scheduler_config(tmp_path)
  assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085,
                                                                       0.012)
  assert (config.num_train_timesteps, config.steps_offset, config.set_alpha_to_one) == (1000, 1,
                                                                                        False)
  for path in (tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"):
    assert schedules.from_scheduler_config(path) == config
  assert schedules.from_scheduler_config(json.loads(
      (tmp_path / "scheduler" / "scheduler_config.json").read_text())) == config


@pytest.mark.parametrize("key,value,message", [
    ("prediction_type", "sample", "prediction_type='sample'"),
    ("trained_betas", [0.1] * 1000, "trained_betas"),
    ("beta_schedule", "sigmoid", "beta_schedule='sigmoid'"),
    ("timestep_spacing", "uniform", "timestep_spacing 'uniform'"),
    ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr=True"),
    ("clip_sample", True, "clip_sample=True"),
    ("num_train_timesteps", "1000", "num_train_timesteps='1000'"),
    ("steps_offset", -1, "steps_offset=-1"),
    ("beta_start", 0, "beta_start=0"),
])
def test_unsupported_scheduler_configs_are_named(key, value, message):
  with pytest.raises(ConfigError, match=message):
    schedules.from_scheduler_config({**IP2P_SCHEDULER_CONFIG, key: value})


def test_missing_or_malformed_scheduler_config(tmp_path):
  with pytest.raises(CheckpointError, match="scheduler/scheduler_config.json"):
    schedules.from_scheduler_config(tmp_path)
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="not a JSON scheduler config"):
    schedules.from_scheduler_config(tmp_path)
  (tmp_path / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
  with pytest.raises(ConfigError, match="JSON object"):
    schedules.from_scheduler_config(tmp_path)


def test_bad_step_counts_and_kinds_are_named():
  for n in (0, 1001, 2.5, True):
    with pytest.raises(ConfigError, match="number of sampling steps"):
      schedules.discrete(AC, n)
  with pytest.raises(ConfigError, match="beyond the 1000 training timesteps"):
    schedules.diffusers_ddim(AC, 1000, steps_offset=1)
  with pytest.raises(ConfigError, match="unknown schedule 'cosine'"):
    schedules.make("cosine", 10)
  with pytest.raises(ConfigError, match="beta_schedule 'cosine'"):
    schedules.betas("cosine")
  with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
    schedules.karras(AC, 10, sigma_min=2.0, sigma_max=1.0)
