"""Helpers of the training tests: a micro model folder and trainer subprocesses.

The micro model (a one-block UNet of 32 channels; a VAE of 16/16 channels; a one-layer text encoder)
has the structure of Stable Diffusion at a size that compiles quickly on two CPU cores. Its random
weights are written straight into an abstract model (no eager initialisers: those compile one
program per parameter shape), then saved as an ordinary diffusers-format folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def micro_configs() -> dict[str, dict]:
  from jip2p import checkpoints
  c = checkpoints.preset_configs("tiny", unet_in_channels=4)
  c["unet"].update(block_out_channels=[32], down_block_types=["CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D"], layers_per_block=1, norm_num_groups=8,
                   attention_head_dim=2, cross_attention_dim=16)
  c["vae"].update(block_out_channels=[16, 16], norm_num_groups=8)
  c["text_encoder"].update(hidden_size=16, intermediate_size=24, num_attention_heads=2,
                           num_hidden_layers=1, projection_dim=16)
  return c


def write_micro_folder(folder: str, seed: int = 0) -> str:
  """Writes the micro pipeline (UNet with 4 input channels, like SD) to ``folder``."""
  import jax.numpy as jnp
  from flax import nnx

  from jip2p.checkpoints import Pipeline, save_pipeline
  from jip2p.checkpoints.folders import build_component
  from jip2p.tokenizer import CLIPTokenizer
  configs = micro_configs()
  rng = np.random.default_rng(seed)
  models = {}
  for name in ("unet", "vae", "text_encoder"):
    model = build_component(configs[name], abstract=True)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      shape, leaf = var.get_value().shape, path[-1]
      if leaf == "bias":
        value = np.zeros(shape)
      elif leaf == "scale":
        value = np.ones(shape)
      elif leaf == "embedding":
        value = rng.standard_normal(shape) * 0.02
      else:  # kernels: HWIO or [in, out]
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
      var.set_value(jnp.asarray(value, jnp.float32))
    models[name] = model
  save_pipeline(Pipeline(unet=models["unet"], vae=models["vae"],
                         text_encoder=models["text_encoder"], tokenizer=CLIPTokenizer.default(),
                         scheduler_config=configs["scheduler"]), folder, overwrite=True)
  return folder


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (for a coordinator or a local server)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def trainer_env(devices: int, cache_dir: str) -> dict[str, str]:
  """Environment of a trainer subprocess: ``devices`` CPU devices and a compilation cache shared
  by the runs of a session (runs of one config compile once)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_COMPILATION_CACHE_DIR"] = env["JIP2P_COMPILATION_CACHE"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def train_command(config_arg: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "jip2p.cli.train", f"--config={REPO}/configs/tiny.py:{config_arg}",
          f"--workdir={workdir}", *overrides]


def run_trainer(config_arg: str, workdir: str, *overrides: str, devices: int = 8,
                cache_dir: str, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(config_arg, workdir, *overrides),
                        env=trainer_env(devices, cache_dir), capture_output=True, text=True,
                        timeout=timeout)


def losses(workdir: str) -> dict[int, float]:
  """step → loss from metrics.jsonl (a step logged twice, before and after a resume: the last)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out[record["step"]] = record["loss"]
  return out


def wait_for_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
  """Blocks until ``step`` is logged (the trainer logs every step in these tests)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()}")
    if os.path.exists(path) and max(losses(workdir), default=0) >= step:
      return
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  raise AssertionError(f"step {step} not reached in {timeout} s")


def write_world_shards(directory: str, *, n: int, seed: int, size: int,
                       examples_per_shard: int) -> str:
  """Writes ``n`` examples of the procedural world (instructions only) as triplet shards."""
  import io

  from PIL import Image

  from jip2p.data import schema, synthetic, writer

  def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()

  with writer.DatasetWriter(directory, examples_per_shard=examples_per_shard) as w:
    for e in synthetic.generate(n, seed=seed, size=size):
      w.write(schema.Triplet(input_image=png(e.input_image), edited_image=png(e.edited_image),
                             instruction=e.instruction))
  return directory
