"""The training pieces on their own: dropout statistics, EMA warm-up, sharding rules, checkpoints,
FLOP counting and the peak-FLOPs table."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jip2p import checkpoints
from jip2p.errors import CheckpointError, Jip2pError, OutputError
from jip2p.models.layers import abstract_module
from jip2p.models.unet import UNet2DCondition, UNetConfig
from jip2p.train import checkpointing, events, metrics, sharding
from jip2p.train import config as config_lib
from jip2p.train import step as step_lib


def test_conditioning_dropout_frequencies():
  n, p = 400_000, 0.05
  drop_text, drop_image = jax.jit(step_lib.dropout_masks, static_argnums=(1, 2))(
      jax.random.key(0), n, p)
  drop_text, drop_image = np.asarray(drop_text), np.asarray(drop_image)
  sigma5 = 5 * np.sqrt(p * (1 - p) / n)
  for observed in (drop_text & ~drop_image, drop_text & drop_image, ~drop_text & drop_image):
    assert abs(observed.mean() - p) < sigma5
  assert abs((~drop_text & ~drop_image).mean() - (1 - 3 * p)) < 5 * np.sqrt(0.15 * 0.85 / n)


def test_conditioning_dropout_uses_null_text_and_zero_latents():
  b = 1024
  rng = np.random.default_rng(1)
  text = rng.standard_normal((b, 77, 8), np.float32)
  latents = rng.standard_normal((b, 4, 4, 4), np.float32)
  null = rng.standard_normal((1, 77, 8), np.float32)
  key = jax.random.key(2)
  out_text, out_latents = jax.jit(step_lib.conditioning_dropout, static_argnums=4)(
      key, text, null, latents, 0.05)
  drop_text, drop_image = map(np.asarray, jax.jit(step_lib.dropout_masks, static_argnums=(1, 2))(
      key, b, 0.05))
  out_text, out_latents = np.asarray(out_text), np.asarray(out_latents)
  np.testing.assert_array_equal(out_text[drop_text],
                                np.broadcast_to(null, (drop_text.sum(), 77, 8)))
  np.testing.assert_array_equal(out_text[~drop_text], text[~drop_text])
  assert not out_latents[drop_image].any()
  np.testing.assert_array_equal(out_latents[~drop_image], latents[~drop_image])
  assert 0 < drop_text.sum() < b and 0 < drop_image.sum() < b


def test_ema_warmup_follows_the_original():
  decay = lambda n: float(step_lib.ema_decay(jnp.int32(n), 0.9999, True))
  assert decay(1) == pytest.approx(2 / 11)
  assert decay(1000) == pytest.approx(1001 / 1010)
  assert decay(10 ** 6) == pytest.approx(0.9999)
  assert float(step_lib.ema_decay(jnp.int32(1), 0.9999, False)) == pytest.approx(0.9999)


def test_fsdp_spec_picks_the_largest_divisible_axis():
  assert sharding.fsdp_spec((3, 3, 320, 640), 8, 1024) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((1280, 320), 8, 1024) == P("fsdp", None)
  assert sharding.fsdp_spec((3, 3, 5, 7), 8, 1) == P()
  assert sharding.fsdp_spec((16, 16), 8, 1024) == P()
  assert sharding.fsdp_spec((1280, 320), 1, 1024) == P()


def test_rules_match_paths_of_the_train_state():
  mesh = sharding.make_mesh(2, 4)
  params = {"conv_in": {"kernel": jnp.zeros((3, 3, 8, 320)), "bias": jnp.zeros(320)},
            "norm": {"scale": jnp.zeros(4096)}}
  state = step_lib.init_state(params, step_lib.make_optimizer(1e-4), 0)
  shardings = sharding.tree_shardings(state, mesh, min_size=1024)
  assert shardings.params["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")
  assert shardings.ema["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")
  assert shardings.opt_state[0].mu["conv_in"]["kernel"].spec == P(None, None, None, "fsdp")
  assert shardings.params["conv_in"]["bias"].spec == P()
  assert shardings.params["norm"]["scale"].spec == P()
  assert shardings.step.spec == P() and shardings.rng.spec == P()
  rules = ((r"conv_in\.kernel$", (None, None, "fsdp", None)), (r".*", "replicate"))
  explicit = sharding.tree_shardings(state, mesh, rules=rules)
  assert explicit.opt_state[0].nu["conv_in"]["kernel"].spec == P(None, None, "fsdp", None)


def test_sd15_train_state_fits_16gb_chips_with_fsdp8():
  """Parameters, EMA and the two AdamW moments of the SD 1.5 UNet: 13.8 GB in all. The EMA and the
  moments follow the parameters' rules (same path suffixes), so per device it is 4× the params'."""
  config = UNetConfig.from_dict(checkpoints.preset_configs("sd15", unet_in_channels=8)["unet"])
  params = nnx.state(abstract_module(lambda rngs: UNet2DCondition(config, rngs=rngs)), nnx.Param)
  total = 4 * sum(x.size * 4 for x in jax.tree.leaves(params))
  assert 13.0e9 < total < 14.5e9
  for fsdp in (1, 8):
    mesh = sharding.make_mesh(8 // fsdp, fsdp)
    shardings = sharding.tree_shardings(params, mesh)
    per_device = 4 * sum(
        x.size * 4 // np.prod([mesh.shape[a] for a in s.spec if a is not None])
        for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
    if fsdp == 1:
      assert per_device == total
    else:
      assert per_device < total / 8 * 1.02  # only biases and norms stay whole
      assert per_device < 1.8e9  # + frozen VAE and text encoder (0.83 GB): room to spare


def _small_state(mesh, seed=0):
  params = {"w": jax.random.normal(jax.random.key(seed), (64, 32)), "b": jnp.zeros(32)}
  state = step_lib.init_state(params, step_lib.make_optimizer(1e-3), seed)
  shardings = sharding.tree_shardings(state, mesh, min_size=64)
  return jax.device_put(state, shardings), shardings


def test_checkpoints_roundtrip_prune_and_force(tmp_path):
  mesh = sharding.make_mesh(2, 4)
  state, shardings = _small_state(mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=2, keep_every=4)
  for step in range(1, 7):
    state = state.replace(step=jnp.int32(step), params=jax.tree.map(lambda x: x + 1, state.params))
    ckpt.save(state, {"batches": step})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 6] and ckpt.last_saved == 6
  state = state.replace(step=jnp.int32(7))
  assert ckpt.save(state, {"batches": 7}, force=True)  # a preemption save, off the period
  ckpt.close()

  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=2, keep=2, keep_every=4)
  assert ckpt.latest_step() == 7 and 4 in ckpt.all_steps() and ckpt.last_saved is None
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  restored, position = ckpt.restore(abstract)
  assert position == {"batches": 7} and int(restored.step) == 7 and ckpt.last_saved == 7
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert restored.params["w"].sharding.spec == shardings.params["w"].spec
  _, position = ckpt.restore(abstract, step=4)
  assert position == {"batches": 4}
  ema = ckpt.restore_weights("ema", abstract.ema, step=6)
  assert set(ema) == {"w", "b"}
  ckpt.close()


def test_unfinished_checkpoints_are_ignored_and_removed(tmp_path):
  mesh = sharding.make_mesh(8, 1)
  state, _ = _small_state(mesh)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=1)
  ckpt.save(state.replace(step=jnp.int32(1)), 1)
  ckpt.close()
  # What a process killed mid-save leaves behind.
  partial = checkpointing.checkpoint_dir(str(tmp_path)) / "2.orbax-checkpoint-tmp-1700000000"
  (partial / "params").mkdir(parents=True)
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=1)
  assert ckpt.all_steps() == [1]
  ckpt.save(state.replace(step=jnp.int32(2)), 2)  # Removal finishes before the next save starts.
  ckpt.close()
  assert not partial.exists()
  assert ckpt.all_steps() == [1, 2]


def test_read_only_checkpoints_are_read_quietly_and_left_as_they_are(tmp_path, caplog):
  """Export and the demo open a run's checkpoints read-only: no file may change (not even the
  leftovers of a killed save, which a writing manager removes), and orbax may not warn."""
  state, shardings = _small_state(sharding.make_mesh(8, 1))
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=1)
  ckpt.save(state.replace(step=jnp.int32(1)), 1)
  ckpt.close()
  directory = pathlib.Path(str(checkpointing.checkpoint_dir(str(tmp_path))))
  (directory / "2.orbax-checkpoint-tmp-1700000000" / "params").mkdir(parents=True)
  listing = lambda: sorted((str(p), p.stat().st_mtime_ns) for p in directory.rglob("*"))
  before = listing()
  with caplog.at_level(logging.INFO):
    ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state.ema, shardings.ema)
    ema = ckpt.restore_weights("ema", abstract)
    np.testing.assert_array_equal(np.asarray(ema["w"]), np.asarray(state.ema["w"]))
    with pytest.raises(CheckpointError, match="opened read-only"):
      ckpt.save(state.replace(step=jnp.int32(2)), 2, force=True)
    ckpt.close()
  assert listing() == before
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_relative_workdir_saves_and_failed_saves_are_named(tmp_path, monkeypatch):
  """orbax refuses relative paths, and its background saves fail in a thread: a run with
  ``--workdir run`` must still checkpoint, and a failed save must stop the next one, named."""
  monkeypatch.chdir(tmp_path)
  state, _ = _small_state(sharding.make_mesh(8, 1))
  ckpt = checkpointing.Checkpointer("run", every_steps=1)
  assert ckpt.save(state.replace(step=jnp.int32(1)), 1)
  ckpt.wait()
  assert ckpt.all_steps() == [1] and (tmp_path / "run" / "checkpoints" / "1").is_dir()

  def failed():
    raise ValueError("disk full")
  monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed)
  with pytest.raises(CheckpointError, match=r"saving the checkpoint of step 1 under "
                     r".*run/checkpoints failed \(disk full\); .* rerun the same command to "
                     r"start again"):
    ckpt.save(state.replace(step=jnp.int32(2)), 2)
  monkeypatch.undo()
  ckpt.close()


def test_restore_errors_name_the_problem(tmp_path):
  with pytest.raises(Exception, match="no checkpoints in"):
    checkpointing.Checkpointer(str(tmp_path / "none"), read_only=True)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(Exception, match="no checkpoint in"):
    ckpt.resolve_step(None)
  ckpt.close()


def test_peak_flops_table_and_override():
  assert metrics.peak_flops("TPU v5 lite") == 197e12
  assert metrics.peak_flops("TPU v5") == 459e12
  assert metrics.peak_flops("TPU v6 lite") == 918e12
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops("cpu") is None
  assert metrics.peak_flops("cpu", override=1e12) == 1e12


def test_flops_and_mfu():
  a = jax.ShapeDtypeStruct((128, 256), jnp.float32)
  b = jax.ShapeDtypeStruct((256, 64), jnp.float32)
  assert metrics.cost_flops(jnp.matmul, a, b) == pytest.approx(2 * 128 * 256 * 64, rel=0.01)
  out = metrics.throughput(examples=64, steps=2, seconds=4.0, flops_per_step=8e12, num_devices=2,
                           peak=4e12)
  assert out == pytest.approx({"examples_per_sec": 16.0, "step_time_sec": 2.0,
                               "tflops_per_device": 2.0, "mfu": 0.5})
  assert "mfu" not in metrics.throughput(examples=1, steps=1, seconds=1.0, flops_per_step=1.0,
                                         num_devices=1, peak=None)


def test_metric_writer_only_on_process_zero(tmp_path):
  quiet = metrics.MetricWriter(str(tmp_path / "quiet"), enabled=False)
  quiet.scalars(1, {"loss": 1.0})
  quiet.close()
  assert not (tmp_path / "quiet").exists()


def test_metric_writer_names_a_log_it_cannot_write(tmp_path):
  """A full disk or a path taken by a folder: one `OutputError` line, not an OSError traceback."""
  (tmp_path / "metrics.jsonl").mkdir()
  writer = metrics.workdir_writer(str(tmp_path), enabled=True)
  with pytest.raises(OutputError, match=rf"cannot write the training logs \({tmp_path}/metrics"
                     r"\.jsonl\): Is a directory; .* rerun the same command to resume"):
    writer.scalars(1, {"loss": 1.0})
  writer.close()


class _Checkpointer:
  """What the step log reads of a checkpointer."""
  directory = "/runs/x/checkpoints"
  last_saved = None


def _metrics(loss: float, finite: bool = True) -> dict[str, np.ndarray]:
  return {"loss": np.float32(loss), "grad_norm": np.float32(2 * loss), "lr": np.float32(1e-3),
          "ema_decay": np.float32(0.5), "finite": np.bool_(finite)}


def test_step_log_averages_and_reads_finite_flags_one_step_late(tmp_path):
  config = config_lib.base_config()
  writer = metrics.MetricWriter(str(tmp_path / "tb"), jsonl=str(tmp_path / "metrics.jsonl"))
  saved = _Checkpointer()
  log = metrics.StepLog(config, writer, saved, lambda: 1e9)
  log.add(1, _metrics(1.0))
  log.add(2, _metrics(3.0))
  log.write(2)
  log.add(3, _metrics(float("nan"), finite=False))  # read with the next step
  saved.last_saved = 2
  with pytest.raises(Jip2pError, match=r"^non-finite loss at step 3 \(loss=nan, grad norm=nan\); "
                     r"the last good checkpoint is step 2 in /runs/x/checkpoints\. "):
    log.add(4, _metrics(1.0))
  writer.close()
  [record] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {k: record[k] for k in ("step", "loss", "grad_norm", "ema_decay", "skipped_steps")} == {
      "step": 2, "loss": 2.0, "grad_norm": 4.0, "ema_decay": 0.5, "skipped_steps": 0}
  assert log.loss == 2.0 and record["tflops_per_device"] > 0  # step 2 timed, step 1 not

  config.nonfinite = "skip"
  log = metrics.StepLog(config, metrics.MetricWriter(str(tmp_path / "quiet"), enabled=False),
                        saved, lambda: 0.0)
  for step in (1, 2, 3):
    log.add(step, _metrics(float("inf"), finite=step == 2))
  assert log.skipped == 1  # step 3 not read yet
  log.check(3)
  assert log.skipped == 2


def test_event_files_read_back_in_tensorflow(tmp_path):
  assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  writer = metrics.MetricWriter(str(tmp_path / "tb"))
  writer.scalars(3, {"loss": 0.25, "mfu": 0.5})
  grid = np.zeros((8, 12, 3), np.uint8)
  grid[:, 6:] = 200
  writer.images(5, {"grid": grid})
  writer.close()
  # TensorFlow reads the file in its own process (never next to torch).
  script = f"""
import glob, io, json, numpy as np, tensorflow as tf
from PIL import Image
out = []
for path in glob.glob({str(tmp_path / "tb")!r} + "/events.out.tfevents.*"):
  for e in tf.compat.v1.train.summary_iterator(path):
    for v in e.summary.value:
      if v.HasField("image"):
        im = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
        out.append([e.step, v.tag, int(im[0, 0, 0]), int(im[0, 11, 0]), v.image.width])
      else:
        out.append([e.step, v.tag, v.simple_value])
print(json.dumps(out))
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout.strip().splitlines()[-1]) == [
      [3, "loss", 0.25], [3, "mfu", 0.5], [5, "grid", 0, 200, 12]]
