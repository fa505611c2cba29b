"""jip2p-train on TFRecord shards (the tf.data reader): a run stopped and resumed reads exactly the
batches an uninterrupted run reads, for SD and for SDXL (the tiny-sdxl preset)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jip2p import checkpoints
from jip2p.train import checkpointing
from tests.train.helpers import losses, run_trainer, write_world_shards

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
  return write_world_shards(str(tmp_path_factory.mktemp("shards")), n=24, seed=3, size=40,
                            examples_per_shard=8)


def test_resumed_run_reads_the_same_batches(shards, micro_folder, compile_cache, tmp_path):
  overrides = ("--config.data.source=tfrecord", f"--config.data.path={shards}",
               "--config.data.shuffle_buffer=16", "--config.log_every_steps=1",
               "--config.eval.every_steps=0", "--config.export.at_end=")
  arg = "batch=4,init=" + micro_folder + ",steps={}"
  whole = str(tmp_path / "whole")
  result = run_trainer(arg.format(8), whole, *overrides, devices=1, cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  split = str(tmp_path / "split")
  for steps in (3, 8):  # 24 examples = 6 steps per epoch: the resumed run crosses an epoch
    result = run_trainer(arg.format(steps), split, *overrides, devices=1,
                         cache_dir=compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint of step 3" in result.stdout
  assert checkpointing.Checkpointer(split, read_only=True).latest_step() == 8
  assert losses(split) == losses(whole) and len(losses(whole)) == 8


def test_tiny_sdxl_trains_and_resumes_bit_exact(shards, compile_cache, tmp_path):
  """The tiny-sdxl preset (both text encoders, pooled text, each example's original size and
  crop): a run of 2 steps resumed to 4 logs the uninterrupted run's loss at every step, bit for
  bit; the validation grid edits with SDXL conditioning and the export is an SDXL folder."""
  overrides = ("--config.data.source=tfrecord", f"--config.data.path={shards}",
               "--config.data.shuffle_buffer=16", "--config.log_every_steps=1",
               "--config.checkpoint.every_steps=2")
  arg = "batch=4,init=random:tiny-sdxl,steps={}"
  whole = str(tmp_path / "whole")
  result = run_trainer(arg.format(4), whole, *overrides, "--config.eval.every_steps=4",
                       "--config.export.at_end=ema", devices=1, cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  want = losses(whole)
  assert sorted(want) == [1, 2, 3, 4] and all(np.isfinite(v) for v in want.values())
  assert len(set(want.values())) == 4
  assert os.listdir(os.path.join(whole, "samples")) == ["step_00000004.png"]
  exported = checkpoints.load_pipeline(os.path.join(whole, "export", "ema"))
  assert exported.is_sdxl and exported.unet.config.in_channels == 8
  split = str(tmp_path / "split")
  for steps in (2, 4):
    result = run_trainer(arg.format(steps), split, *overrides, "--config.eval.every_steps=0",
                         "--config.export.at_end=", devices=1, cache_dir=compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint of step 2" in result.stdout
  assert checkpointing.Checkpointer(split, read_only=True).latest_step() == 4
  assert losses(split) == want
