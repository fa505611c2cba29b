"""EDM sampling (CosXL's): the `edm` grid and Euler loop against diffusers' EDMEulerScheduler with
the same fake v-model and initial noise, and the scheduler config's named refusals. Uses torch
(diffusers), never TensorFlow."""

import dataclasses

import diffusers
import numpy as np
import pytest

from jip2p.diffusion import schedules
from jip2p.errors import ConfigError
from tests.diffusion.test_samplers_vs_diffusers import assert_close, diffusers_loop, jip2p_loop

# CosXL's scheduler, and EDM's defaults (σ_data 0.5, Karras spacing).
COSXL = {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 120.0,
         "sigma_data": 1.0, "prediction_type": "v_prediction", "sigma_schedule": "exponential"}
EDM_DEFAULTS = {"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"}
SHAPE = (2, 8, 8, 4)


@pytest.mark.parametrize("config", [COSXL, EDM_DEFAULTS], ids=["cosxl", "edm-defaults"])
@pytest.mark.parametrize("n", [1, 7, 25])
def test_edm_grid_matches_diffusers(config, n):
  reference = diffusers.EDMEulerScheduler.from_config(config)
  reference.set_timesteps(n)
  grid = schedules.make("edm", n, schedules.from_scheduler_config(config))
  np.testing.assert_allclose(grid.sigmas, reference.sigmas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(grid.timesteps, reference.timesteps.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grid.init_sigma, reference.init_noise_sigma, rtol=1e-6)
  assert grid.sigma_data == reference.config.sigma_data


@pytest.mark.parametrize("config", [COSXL, EDM_DEFAULTS], ids=["cosxl", "edm-defaults"])
@pytest.mark.parametrize("n", [4, 20])
def test_edm_euler_loop_matches_diffusers(config, n):
  """The whole loop (EDM's input scale and v → denoised preconditioning, Euler steps), padded as
  the editor pads it, against diffusers' scheduler driven as its pipelines drive it."""
  noise = np.random.RandomState(n).standard_normal(SHAPE).astype(np.float32)
  ref = diffusers_loop(diffusers.EDMEulerScheduler.from_config(config), n, noise)
  scheduler_config = schedules.from_scheduler_config(config)
  grid = schedules.make("edm", n, scheduler_config)
  ours = jip2p_loop("euler", schedules.pad(grid, scheduler_config.num_train_timesteps), noise,
                    prediction_type="v_prediction")
  assert_close(ours, ref)
  # σ_data is used: the same grid read as σ_data 1 (DDPM's input scale) ends elsewhere.
  if config.get("sigma_data", 0.5) != 1.0:
    other = jip2p_loop("euler", dataclasses.replace(grid, sigma_data=np.float32(1.0)), noise,
                       prediction_type="v_prediction")
    assert np.abs(other - ref).max() > 1e-2


def test_edm_config_refusals():
  with pytest.raises(ConfigError, match="prediction_type='epsilon' is not supported"):
    schedules.from_scheduler_config({**COSXL, "prediction_type": "epsilon"})
  with pytest.raises(ConfigError, match="final_sigmas_type='sigma_min' is not supported"):
    schedules.from_scheduler_config({**COSXL, "final_sigmas_type": "sigma_min"})
  with pytest.raises(ConfigError, match="sigma_schedule='linear'"):
    schedules.from_scheduler_config({**COSXL, "sigma_schedule": "linear"})
  with pytest.raises(ConfigError, match="sigma_min=200.0 must be below"):
    schedules.from_scheduler_config({**COSXL, "sigma_min": 200.0})
  edm = schedules.from_scheduler_config(COSXL)
  with pytest.raises(ConfigError, match="its scheduler is EDM's .*use schedule 'edm'"):
    schedules.make("discrete", 10, edm)
  with pytest.raises(ConfigError, match="'edm' is for models with an EDM scheduler"):
    schedules.make("edm", 10, schedules.SchedulerConfig())
  assert not schedules.SchedulerConfig().edm
