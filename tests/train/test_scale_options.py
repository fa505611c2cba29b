"""Options for runs at scale: the multi-slice mesh (config.mesh.dcn_data) and the profiler
(config.profile)."""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp
import pytest

from jip2p.errors import ConfigError
from jip2p.train import config as config_lib
from jip2p.train import profiler, sharding
from tests.train.helpers import REPO


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What the mesh code reads of a TPU device of a multi-slice run."""
  id: int
  slice_index: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "fake"


def test_multislice_mesh_splits_data_across_slices_and_keeps_fsdp_inside(monkeypatch):
  # 2 slices × 4 chips; each slice's devices listed interleaved with the other's.
  devices = [FakeTpu(id=i, slice_index=i % 2, process_index=i % 2) for i in range(8)]
  monkeypatch.setattr(sharding, "Mesh", lambda grid, axes: (grid, axes))
  grid, axes = sharding.make_mesh(4, 2, devices, dcn_data=2)
  assert axes == ("data", "fsdp") and grid.shape == (4, 2)
  slices = [[d.slice_index for d in row] for row in grid]
  assert slices == [[0, 0], [0, 0], [1, 1], [1, 1]]  # data rows 0-1 on slice 0, 2-3 on slice 1


def test_multislice_mesh_errors_name_the_problem():
  with pytest.raises(ConfigError, match="dcn_data=2: these 8 devices are not 2 slices"):
    sharding.make_mesh(4, 2, dcn_data=2)  # CPU devices have no slice
  c = config_lib.base_config()
  c.model.init = "random:tiny"
  c.batch_size, c.grad_accum = 8, 1
  c.mesh.fsdp, c.mesh.dcn_data = 4, 3
  with pytest.raises(ConfigError, match="dcn_data=3 slices do not divide the data axis of 2"):
    config_lib.mesh_shape(c, 8)


def test_profiler_traces_the_chosen_steps(tmp_path):
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  p = profiler.StepProfiler(str(tmp_path), first_step=11, steps=2, skip=3)
  started = []
  for step in range(11, 20):
    p.before_step(step)
    started.append(p.active)
    x = step_fn(x)
    p.after_step(step, x)
  p.close()
  assert started == [False, False, False, True, True, False, False, False, False]
  assert glob.glob(os.path.join(tmp_path, "plugins", "profile", "*", "*.xplane.pb"))
  off = profiler.StepProfiler(str(tmp_path / "off"), first_step=1, steps=0, skip=0)
  off.before_step(1)
  assert not off.active


@pytest.mark.parametrize("name", ["ip2p_sd15.py", "ip2p_sd15_512.py", "ip2p_sd21.py"])
def test_scale_configs_save_often_enough_for_spot_preemption(name):
  """A spot TPU VM gets ~30 s between notice and power-off, too little to promise a save of SD's
  train state: the periodic, asynchronous saves bound what a preemption loses (100 steps, minutes
  at these configs' step times), and the newest few are kept."""
  c = config_lib.load(str(REPO / "configs" / name))
  assert config_lib.base_config().checkpoint.every_steps == 100
  assert c.checkpoint.every_steps <= 100 and c.checkpoint.async_save and c.checkpoint.keep >= 2
