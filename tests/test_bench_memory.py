"""`jip2p-bench --memory` at the tiny preset: the compiled train step's bytes per device from XLA's
memory analysis, split into the train state's parts, and the largest micro-batch per chip from a
line through micro-batch 1 and 2, checked by one more compile."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from jip2p.checkpoints import build_component, preset_configs
from jip2p.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
CHIPS = "small=0.08,large=0.2"  # GiB: a handful of tiny-preset examples each


def _bench(*args, timeout=900):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "jip2p.cli.bench", *args], capture_output=True,
                        text=True, timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
  out = tmp_path_factory.mktemp("memory")
  done = _bench("--memory", "configs/tiny.py", "--fsdp", "4", "--memory-remat", "off",
                "--chips", CHIPS, "--json", str(out / "m.json"), "--markdown", str(out / "m.md"))
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout, json.loads((out / "m.json").read_text()), (out / "m.md").read_text()


def _tiny_unet_param_bytes() -> int:
  unet = build_component(preset_configs("tiny", unet_in_channels=8)["unet"], abstract=True)
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))


def test_state_parts_are_the_sharded_train_state(memory):
  """Under FSDP over 4 devices each holds a quarter of the large tensors and all of the small
  ones; AdamW holds two moments per parameter, EMA one copy."""
  _, doc, _ = memory
  [row] = doc["rows"]
  assert (row["remat"], row["devices"]) == (False, 4)
  b1, b2 = row["b1"], row["b2"]
  whole = _tiny_unet_param_bytes()
  assert whole / 4 < b1["params"] < whole / 2
  assert b1["ema"] == b1["params"]
  assert 2 * b1["params"] <= b1["opt_state"] <= 2 * b1["params"] + 64
  for part in ("params", "opt_state", "ema"):
    assert b2[part] == b1[part]
  # The batch (two 32² images and 77 ids per example) is the only input that grows.
  assert b2["frozen_batch"] - b1["frozen_batch"] == 2 * 32 * 32 * 3 * 4 + 77 * 4
  assert 0 < b1["temp"] < b2["temp"]
  assert b1["total"] >= b1["params"] + b1["opt_state"] + b1["ema"] + b1["temp"]


def test_largest_batch_per_chip_is_checked_by_a_compile(memory):
  """The line through b = 1 and 2 picks the b to check; the batches per chip come from the line
  through b = 1 and the checked b, never beyond it."""
  _, doc, _ = memory
  [row] = doc["rows"]
  t1, t2, check = row["b1"]["total"], row["b2"]["total"], row["check"]
  capacity = {chip: gib * 2 ** 30 for chip, gib in doc["chips_gib"].items()}
  assert check["batch"] == 1 + int((max(capacity.values()) - t1) // (t2 - t1)) > 2
  assert check["line"] == pytest.approx(t1 + (check["batch"] - 1) * (t2 - t1))
  assert check["total"] == pytest.approx(check["line"], rel=0.1)
  per = row["per_example"]
  assert per == pytest.approx((check["total"] - t1) / (check["batch"] - 1))
  for chip, b in row["fits"].items():
    assert t1 + (b - 1) * per <= capacity[chip] + 1
    assert b == check["batch"] or capacity[chip] < t1 + b * per


def test_table_states_the_estimate(memory):
  stdout, doc, md = memory
  assert md.strip() in stdout
  assert "the CPU compiler's estimate" in md
  lines = [l for l in md.splitlines() if l.startswith("|")]
  assert len(lines) == 3 and len({l.count("|") for l in lines}) == 1
  assert "| small 0.08 | large 0.2 |" in lines[0]
  assert lines[2].startswith("| off | 4 |")
  assert doc["command"].startswith("jip2p-bench --memory configs/tiny.py")


def test_largest_batch():
  from jip2p.bench.memory import largest_batch
  assert largest_batch(10, 13, 9) == 0
  assert largest_batch(10, 13, 10) == 1
  assert largest_batch(10, 13, 22) == 5
  with pytest.raises(ConfigError, match="did not grow"):
    largest_batch(10, 10, 20)


@pytest.mark.parametrize("args, message", [
    (["--fsdp", "0"], "--fsdp='0'"),
    (["--memory-remat", "sometimes"], "--memory-remat='sometimes'"),
    (["--chips", "H100"], "not NAME=GiB"),
])
def test_bad_options_are_one_line(args, message):
  done = _bench("--memory", "configs/tiny.py", *args, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [done.stderr.strip()]
  assert message in done.stderr


def test_a_config_without_a_model_needs_a_preset():
  done = _bench("--memory", "configs/ip2p_sd15.py", timeout=120)
  assert done.returncode == 2 and "pass --preset" in done.stderr


def test_sdxl_configs_compile_with_both_text_encoders_and_time_ids(tmp_path):
  """configs/ip2p_sdxl.py at the tiny-sdxl preset: the step the trainer runs for SDXL (ids of both
  tokenizers, each example's original size and crop) compiles; the state is the whole UNet's at
  FSDP 1, and each example adds its two images, 2×77 ids and 2+2 micro-conditioning ints."""
  done = _bench("--memory", "configs/ip2p_sdxl.py:res=64,accum=1", "--preset", "tiny-sdxl",
                "--fsdp", "1", "--memory-remat", "on", "--chips", CHIPS,
                "--json", str(tmp_path / "m.json"))
  assert done.returncode == 0, done.stderr[-3000:]
  [row] = json.loads((tmp_path / "m.json").read_text())["rows"]
  unet = build_component(preset_configs("tiny-sdxl", unet_in_channels=8)["unet"], abstract=True)
  whole = sum(math.prod(x.shape) * x.dtype.itemsize
              for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))
  assert row["b1"]["params"] == row["b1"]["ema"] == whole
  assert row["b2"]["frozen_batch"] - row["b1"]["frozen_batch"] == (
      2 * 64 * 64 * 3 * 4 + 2 * 77 * 4 + 4 * 4)
  assert 0 < row["b1"]["temp"] < row["b2"]["temp"]
