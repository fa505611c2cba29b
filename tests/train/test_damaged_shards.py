"""A truncated or missing shard is named at the start of a jip2p-train run, before the reader
reaches the cut (a short run would otherwise end without a word about it)."""

from __future__ import annotations

import os

import pytest

from jip2p.train import input as input_lib
from tests.train.helpers import run_trainer, write_world_shards

pytestmark = pytest.mark.tf


@pytest.fixture
def shards(tmp_path) -> str:
  return write_world_shards(str(tmp_path / "shards"), n=24, seed=3, size=40,
                            examples_per_shard=8)


def _shard_files(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory) if "tfrecord" in f)


def test_damaged_shards_are_named_with_their_sizes(shards):
  assert input_lib.damaged_shards(shards) == []
  first, second, _ = _shard_files(shards)
  size = os.path.getsize(first)
  os.truncate(first, size // 2)
  os.remove(second)
  assert input_lib.damaged_shards(shards) == [f"{first} ({size // 2} of {size} bytes)",
                                              f"{second} (missing)"]


def test_short_run_on_a_truncated_shard_reports_it(shards, micro_folder, compile_cache,
                                                   tmp_path):
  first = _shard_files(shards)[0]
  os.truncate(first, os.path.getsize(first) // 2)
  result = run_trainer(f"batch=4,init={micro_folder},steps=2", str(tmp_path / "run"),
                       "--config.data.source=tfrecord", f"--config.data.path={shards}",
                       "--config.eval.every_steps=0", "--config.export.at_end=", devices=1,
                       cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "data: 1 damaged shard(s)" in result.stderr and first in result.stderr
