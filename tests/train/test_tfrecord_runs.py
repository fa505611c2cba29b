"""jip2p-train on TFRecord shards (the tf.data reader): a run stopped and resumed reads exactly the
batches an uninterrupted run reads."""

from __future__ import annotations

import pytest

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
