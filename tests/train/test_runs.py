"""jip2p-train end to end, in subprocesses: resume after SIGTERM and kill -9, two processes against
one, learning on a fixed tiny dataset, non-finite losses, the validation grid, and export into
diffusers' InstructPix2Pix pipeline.

Every run trains the micro model on the procedural edit world at 32 px and logs each step to
<workdir>/metrics.jsonl. Runs of one configuration share a compilation cache, so only the first
compiles.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from jip2p.train import checkpointing
from tests.train.helpers import (free_port, losses, run_trainer, train_command, trainer_env,
                                 wait_for_step)

STEPS = 8
# 16 examples per step in 2 micro-batches of 8: one per device on 8 devices.
ARG = "steps={steps},batch=16,accum=2,init={init}"
COMMON = ("--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
          "--config.eval.every_steps=0", "--config.export.at_end=")


def _check(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


@pytest.fixture(scope="module")
def reference(micro_folder, compile_cache, tmp_path_factory):
  """One uninterrupted run on 8 devices, exporting EMA and raw weights at the end."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  _check(run_trainer(ARG.format(steps=STEPS, init=micro_folder), workdir, *COMMON,
                     "--config.export.at_end=ema,raw", "--config.profile.steps=2",
                     "--config.profile.skip=1", cache_dir=compile_cache))
  return workdir


def test_reference_run_logs_checkpoints_and_exports(reference):
  found = losses(reference)
  assert sorted(found) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v) for v in found.values())
  ckpt = checkpointing.Checkpointer(reference, read_only=True)
  assert ckpt.all_steps() == [6, 8]  # every 2 steps, the newest 2 kept
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{reference}/tensorboard"))
  for which in ("ema", "raw"):
    assert os.path.isfile(f"{reference}/export/{which}/unet/diffusion_pytorch_model.safetensors")
  # --config.profile.steps=2: a jax.profiler trace of steps 3-4 (after skip=1 step of warm-up).
  assert glob.glob(f"{reference}/profile/plugins/profile/*/*.xplane.pb")


def test_preempted_and_killed_runs_resume_identically(reference, micro_folder, compile_cache,
                                                      tmp_path):
  """SIGTERM after step 3: save and exit 0. Resume; kill -9 after step 5. Resume from the last
  complete checkpoint to the end: every step's loss equals the uninterrupted run's, bit for bit,
  and no unfinished checkpoint is left."""
  workdir = str(tmp_path / "run")
  command = train_command(ARG.format(steps=STEPS, init=micro_folder), workdir, *COMMON)
  env = trainer_env(8, compile_cache)
  start = lambda: subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  latest = lambda: checkpointing.Checkpointer(workdir, read_only=True).latest_step()

  proc = start()
  wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = latest()
  assert f"preempted: saved step {saved}" in out and 3 <= saved < 5

  proc = start()
  wait_for_step(workdir, 5, proc)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate(timeout=60)
  assert f"resumed from the checkpoint of step {saved}" in out
  complete = latest()
  assert complete in (saved, 4, 6)  # a save still in flight at the kill is not complete

  out = _check(subprocess.run(command, env=env, capture_output=True, text=True, timeout=600))
  assert f"resumed from the checkpoint of step {complete}" in out
  assert losses(workdir) == losses(reference)
  assert not [f for f in os.listdir(checkpointing.checkpoint_dir(workdir)) if "tmp" in f]
  # train.log keeps every start, the killed one's lines too.
  log = open(os.path.join(workdir, "train.log")).read()
  marks = ["training steps 1..8", f"preempted: saved step {saved}",
           f"resumed from the checkpoint of step {saved}",
           f"resumed from the checkpoint of step {complete}", "step 8 "]
  assert all(m in log for m in marks), log[-3000:]
  assert [log.index(m) for m in marks[:3]] == sorted(log.index(m) for m in marks[:3])
  assert log.rindex(marks[3]) > log.index(marks[2]) and log.rindex(marks[4]) > log.rindex(marks[3])


def test_two_processes_agree_with_one(reference, micro_folder, compile_cache, tmp_path):
  """jax.distributed over localhost with CPU collectives: 2 processes × 4 devices = 8."""
  workdir = str(tmp_path / "run")
  port = free_port()
  procs = [subprocess.Popen(
      train_command(ARG.format(steps=4, init=micro_folder), workdir, *COMMON,
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}"),
      env=trainer_env(4, compile_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es), 8 device(s)" in outputs[0][0]
  assert "step 1 " not in outputs[1][0]  # only process 0 logs
  got, want = losses(workdir), losses(reference)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                             rtol=1e-5)
  assert checkpointing.Checkpointer(workdir, read_only=True).latest_step() == 4


def test_sigterm_to_one_of_two_processes_saves_both(micro_folder, tmp_path):
  """A preemption notice that reaches one host only: JAX's preemption service (started with the
  distributed client) makes both processes save the same step and exit 0.

  A fresh compilation cache: both processes compile, so that on a loaded machine neither reaches
  the first collective long before the other (gloo waits 30 s for a peer; with the shared cache
  one process was seen to load its programs while the other still compiled)."""
  workdir = str(tmp_path / "run")
  port = free_port()
  procs = [subprocess.Popen(
      train_command(ARG.format(steps=1000, init=micro_folder), workdir, *COMMON,
                    "--config.checkpoint.every_steps=1000",
                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}"),
      env=trainer_env(4, str(tmp_path / "cache")), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  wait_for_step(workdir, 2, procs[0])
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  saved = checkpointing.Checkpointer(workdir, read_only=True).latest_step()
  assert f"preempted: saved step {saved}" in outputs[0][0] and 2 <= saved < 1000


LEARN_ARG = "steps={steps},batch=4,init={init}"
LEARN = ("--config.log_every_steps=1", "--config.checkpoint.every_steps=1000",
         "--config.eval.every_steps=0", "--config.export.at_end=")


def test_loss_falls_on_a_fixed_tiny_dataset(micro_folder, compile_cache, tmp_path):
  """8 fixed pairs at 32 px, one device: ε-MSE far below both its start and the 1.0 of
  predicting zero noise. At the end, the validation grid edits 2 pairs with the EMA weights."""
  workdir = str(tmp_path / "run")
  _check(run_trainer(LEARN_ARG.format(steps=60, init=micro_folder), workdir, *LEARN,
                     "--config.eval.every_steps=60", "--config.eval.num_steps=2",
                     "--config.eval.num_images=2", devices=1, cache_dir=compile_cache))
  found = losses(workdir)
  start = np.mean([found[s] for s in (1, 2, 3)])
  end = np.mean([found[s] for s in range(51, 61)])
  assert start > 0.8 and end < 0.35 and end < 0.3 * start
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_00000060.png")))
  assert grid.shape == (2 * 32, 3 * 32, 3)  # 2 examples × (input | target | output)
  assert grid[:, 64:].std() > 0  # the model's edits are images, not a blank


def _poisoned(micro_folder: str, tmp_path) -> str:
  """A copy of the micro model whose UNet output bias holds a NaN (a corrupt checkpoint)."""
  folder = str(tmp_path / "poisoned")
  shutil.copytree(micro_folder, folder)
  path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
  weights = load_file(path)
  weights["conv_out.bias"] = np.full_like(weights["conv_out.bias"], np.nan)
  save_file(weights, path, metadata={"format": "pt"})
  return folder


def test_non_finite_loss_stops_naming_the_step_or_is_skipped(micro_folder, compile_cache,
                                                             tmp_path):
  folder = _poisoned(micro_folder, tmp_path)
  result = run_trainer(LEARN_ARG.format(steps=3, init=folder), str(tmp_path / "stop"), *LEARN,
                       devices=1, cache_dir=compile_cache)
  assert result.returncode == 2
  assert "jip2p-train: error: non-finite loss at step 1 (loss=nan" in result.stderr
  assert "no checkpoint was saved" in result.stderr and "Traceback" not in result.stderr
  assert checkpointing.Checkpointer(str(tmp_path / "stop"), read_only=True).all_steps() == []

  workdir = str(tmp_path / "skip")
  out = _check(run_trainer(LEARN_ARG.format(steps=3, init=folder), workdir, *LEARN,
                           "--config.nonfinite=skip", devices=1, cache_dir=compile_cache))
  assert "step 1: non-finite loss (nan), update skipped" in out
  assert "skipped_steps=3" in out


def test_export_runs_in_diffusers_instruct_pix2pix(reference, tmp_path):
  out = str(tmp_path / "exported")
  env = trainer_env(1, str(tmp_path / "cache"))
  result = subprocess.run([sys.executable, "-m", "jip2p.cli.export", f"--workdir={reference}",
                           f"--out={out}", "--weights=ema"], env=env, capture_output=True,
                          text=True, timeout=600)
  _check(result)
  assert "exported ema weights of step 8" in result.stdout
  name = "unet/diffusion_pytorch_model.safetensors"
  ours, at_end = load_file(f"{out}/{name}"), load_file(f"{reference}/export/ema/{name}")
  assert ours.keys() == at_end.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], at_end[key])
  raw = load_file(f"{reference}/export/raw/{name}")
  assert any(not np.array_equal(raw[k], ours[k]) for k in ours)  # EMA ≠ raw weights
  result = subprocess.run([sys.executable, "-m", "jip2p.cli.export", f"--workdir={reference}",
                           f"--out={out}-fp16", "--dtype=float16"], env=env, capture_output=True,
                          text=True, timeout=600)
  _check(result)
  assert "exported ema weights of step 8" in result.stdout and "(float16)" in result.stdout
  half = load_file(f"{out}-fp16/{name}")
  for key in ours:
    np.testing.assert_array_equal(half[key], ours[key].astype(np.float16))
  # diffusers and torch only in their own process.
  script = f"""
import numpy as np, torch, diffusers
from PIL import Image
pipe = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained({out!r})
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
result = pipe("make it blue", image=image, num_inference_steps=2, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
print(type(pipe).__name__, pipe.unet.config.in_channels, result.shape,
      bool(np.isfinite(result).all()))
"""
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == (
      "StableDiffusionInstructPix2PixPipeline 8 (1, 32, 32, 3) True")
