"""jip2p-train from a latent cache (``data.latents=True``): a run end to end, the same losses as
the run from the images the cache was written from, and a cache of another model refused."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from jip2p import checkpoints
from jip2p.cli import cache_latents
from jip2p.train import checkpointing
from tests.train.helpers import losses, run_trainer, write_world_shards

pytestmark = pytest.mark.tf

RES = 32  # configs/tiny.py's, and the cache's crop: resize = res, so the whole image.
N = 8  # One shard each of triplets and latents; two steps of batch 4 per epoch.


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
  return write_world_shards(str(tmp_path_factory.mktemp("latent_run_shards")), n=N, seed=5,
                            size=40, examples_per_shard=N)


@pytest.fixture(scope="module")
def cache(shards, micro_folder, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("latent_run_cache") / "latents")
  code = cache_latents.main(["--data", shards, "--model", micro_folder, "--out", out,
                             "--resolution", str(RES), "--batch-size", "3"])
  assert code == 0
  return out


def _overrides(path: str, *extra: str) -> tuple[str, ...]:
  return ("--config.data.source=tfrecord", f"--config.data.path={path}",
          "--config.log_every_steps=1", *extra)


def test_run_from_the_cache_checkpoints_evaluates_and_exports(cache, micro_folder,
                                                              compile_cache, tmp_path):
  workdir = str(tmp_path / "run")
  result = run_trainer(f"batch=4,init={micro_folder},steps=4", workdir,
                       *_overrides(cache, "--config.data.latents=True",
                                   "--config.eval.every_steps=2"),
                       devices=1, cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  run_losses = losses(workdir)
  assert sorted(run_losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in run_losses.values())
  assert checkpointing.Checkpointer(workdir, read_only=True).latest_step() == 4
  # Validation sampling decodes with the real VAE: the cache's stored crops, edited.
  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_00000002.png",
                                                                  "step_00000004.png"]
  exported = checkpoints.load_pipeline(os.path.join(workdir, "export", "ema"))
  assert exported.unet.config.in_channels == 8
  assert exported.vae.config.latent_channels == 4


def test_cache_losses_equal_image_losses(shards, cache, micro_folder, compile_cache, tmp_path):
  """Same crops (resize = res), no flip, stored order (shuffle buffer 1, one shard: the two
  sources shuffle with different keys otherwise), and the step's keys: the cache's moments and
  embeddings are what the step's own encoders compute, so the losses match to rounding."""
  same = ("--config.data.flip=False", "--config.data.shuffle_buffer=1",
          "--config.eval.every_steps=0", "--config.export.at_end=")
  arg = f"batch=4,init={micro_folder},steps=5"
  images, cached = str(tmp_path / "images"), str(tmp_path / "cached")
  result = run_trainer(arg, images, *_overrides(shards, *same), devices=1,
                       cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  result = run_trainer(arg, cached, *_overrides(cache, "--config.data.latents=True", *same),
                       devices=1, cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = losses(images), losses(cached)
  assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5]
  assert len({round(v, 6) for v in want.values()}) == 5  # steps differ: the test can fail
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-6)
  # The cached run's step runs neither the VAE encoder nor the text encoder: fewer FLOPs (counted
  # by XLA, not timed; the micro model's encoders are ~10% of its step).
  assert _step_flops(cached) < 0.95 * _step_flops(images)


def _step_flops(workdir: str) -> float:
  """The train step's FLOPs (per device) as the loop counted them, from its last log line."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    record = json.loads(f.read().splitlines()[-1])
  return record["tflops_per_device"] * 1e12 * record["step_time_sec"]


def test_a_cache_at_another_resolution_is_refused(cache, micro_folder, compile_cache, tmp_path):
  result = run_trainer(f"batch=4,init={micro_folder},steps=1,res=64", str(tmp_path / "bad"),
                       *_overrides(cache, "--config.data.latents=True"), devices=1,
                       cache_dir=compile_cache)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "jip2p-train: error: the latent cache" in result.stderr
  assert "resolution 32 (this run: 64)" in result.stderr
  assert "latent shape (16, 16, 4) (this run: (32, 32, 4))" in result.stderr


@pytest.mark.parametrize("source,path", [("synthetic", ""), ("synthetic", "/cache"),
                                         ("tfrecord", "")])
def test_latents_need_a_cache_folder(source, path):
  from jip2p.errors import ConfigError
  from jip2p.train import config as config_lib
  c = config_lib.base_config()
  c.model.init = "random:tiny"
  c.data.update(latents=True, source=source, path=path)
  with pytest.raises(ConfigError, match="latent cache|data.path is empty"):
    config_lib.validate(c)
  c.data.update(source="tfrecord", path="/cache")
  config_lib.validate(c)
