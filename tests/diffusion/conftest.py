"""The scheduler config of InstructPix2Pix's model folder (SD 1.5's, with EulerAncestral)."""

import pytest

IP2P_SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.12.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.fixture
def ip2p_scheduler_config():
  return dict(IP2P_SCHEDULER_CONFIG)
