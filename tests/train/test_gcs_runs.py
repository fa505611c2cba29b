"""Everything on gs://, against a local GCS emulator (gcp-storage-emulator, in memory, on
127.0.0.1; see gcs_emulator.py): a model saved to a bucket, a run trained from it with its work directory there
(config, checkpoints, samples, TensorBoard events, train.log), resumed, exported by jip2p-export
to the bucket, loaded back through the local model cache and evaluated by jip2p-eval with its
results in the bucket; and JAX's compilation cache kept there.

The programs reach the emulator as they would reach GCS: etils.epath through gcsfs (with
``EPATH_USE_TF=false``: TensorFlow's GCS client has no emulator endpoint), orbax's array data
through tensorstore. This test reads the bucket with its own client.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from gcsfs.core import GCSFileSystem
from safetensors.numpy import load as load_safetensors

from tests.train.helpers import REPO, free_port, train_command, trainer_env

BUCKET = "jip2p"
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's endpoint and the environment that sends a program's gs:// I/O to it."""
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  server = subprocess.Popen(
      [sys.executable, "-m", "tests.train.gcs_emulator", "start", "--host", "127.0.0.1",
       "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert time.time() < deadline and server.poll() is None, "the GCS emulator did not start"
      time.sleep(0.2)
  env = {
      "STORAGE_EMULATOR_HOST": url, "FSSPEC_GCS_TOKEN": "anon", "EPATH_USE_TF": "false",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      # Any credential lookup stays on this machine.
      "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9", "NO_GCE_CHECK": "True",
      "JIP2P_MODEL_CACHE": str(tmp_path_factory.mktemp("model_cache")),
  }
  yield url, env
  server.terminate()
  server.wait(timeout=30)


def _python(code: str, env: dict[str, str]) -> str:
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def test_train_resume_export_and_load_on_gs(gcs, micro_folder, compile_cache, tmp_path):
  url, gcs_env = gcs
  env = dict(trainer_env(8, compile_cache), **gcs_env)
  bucket = GCSFileSystem(token="anon", endpoint_url=url)
  model, run, out = (f"gs://{BUCKET}/models/micro", f"gs://{BUCKET}/runs/r",
                     f"gs://{BUCKET}/models/exported")

  _python("from jip2p import checkpoints as c; "
          f"c.save_pipeline(c.load_pipeline({micro_folder!r}), {model!r})", env)
  assert bucket.exists(f"{BUCKET}/models/micro/model_index.json")

  args = ("--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
          "--config.eval.every_steps=4", "--config.eval.num_steps=2", "--config.eval.num_images=2")
  for steps in (4, 6):  # the second start resumes from step 4
    result = subprocess.run(
        train_command(f"steps={steps},batch=16,accum=2,init={model}", run, *args), env=env,
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "resumed from the checkpoint of step 4" in result.stdout

  root = f"{BUCKET}/runs/r"
  assert json.loads(bucket.cat(f"{root}/config.json"))["model"]["init"] == model
  steps = sorted(int(p.rsplit("/", 1)[1]) for p in bucket.ls(f"{root}/checkpoints")
                 if p.rsplit("/", 1)[1].isdigit())
  assert steps == [4, 6]
  assert bucket.exists(f"{root}/samples/step_00000004.png")
  assert any("events.out.tfevents" in p for p in bucket.ls(f"{root}/tensorboard"))
  log = bucket.cat(f"{root}/train.log").decode()
  assert log.index("training steps 1..4") < log.index("resumed from the checkpoint of step 4")
  assert "step 6 " in log

  exported = subprocess.run([sys.executable, "-m", "jip2p.cli.export", f"--workdir={run}",
                             f"--out={out}"], env=env, capture_output=True, text=True,
                            timeout=600)
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert f"exported ema weights of step 6 to {out}" in exported.stdout
  ours = load_safetensors(bucket.cat(f"{BUCKET}/models/exported/{UNET}"))
  at_end = load_safetensors(bucket.cat(f"{root}/export/ema/{UNET}"))
  assert ours.keys() == at_end.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], at_end[key])

  check = (f"import json; from jip2p import checkpoints as c\n"
           f"p = c.load_pipeline({out!r}); c.load_pipeline({out!r})\n"
           f"bias = c.to_torch_state_dict(p.unet)['conv_out.bias']\n"
           f"print(p.folder, json.dumps(bias.tolist()))")
  folder, bias = _python(check, env).split(" ", 1)
  assert folder == out
  np.testing.assert_array_equal(json.loads(bias), ours["conv_out.bias"])
  # One local copy per model version: the micro model (read by both starts) and the export (read
  # twice), nothing half-downloaded.
  assert len(os.listdir(gcs_env["JIP2P_MODEL_CACHE"])) == 2

  # jip2p-eval of the exported model with its results on gs://, run twice: the second start finds
  # the stored results and has nothing left to edit.
  evaluation = f"gs://{BUCKET}/eval/world"
  command = [sys.executable, "-m", "jip2p.cli.eval", f"--model={out}", "--set=world",
             "--world-n=2", "--steps=2", "--no-progress", f"--output={evaluation}"]
  for start in (1, 2):
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"wrote {evaluation}/summary.csv" in result.stdout
    assert len(bucket.cat(f"{BUCKET}/eval/world/results.jsonl").decode().splitlines()) == 2
  assert json.loads(bucket.cat(f"{BUCKET}/eval/world/run.json"))["model"] == out
  assert bucket.cat(f"{BUCKET}/eval/world/summary.csv").decode().startswith("setting")
  assert not os.path.exists(tmp_path / "gs:")  # nothing written to a local folder named gs:


def test_compilation_cache_on_gs(gcs):
  """runtime.configure keeps a JAX_COMPILATION_CACHE_DIR on gs://: the first process stores its
  compiled programs there, a second one loads them (cache hits) instead of compiling."""
  url, gcs_env = gcs
  env = {k: v for k, v in os.environ.items() if k != "JIP2P_COMPILATION_CACHE"}
  env.update(gcs_env, JAX_COMPILATION_CACHE_DIR=f"gs://{BUCKET}/jax-cache")
  code = ("from jax._src import monitoring\n"
          "hits = []\n"
          "monitoring.register_event_listener(lambda event, **_: hits.append(event))\n"
          "from jip2p import runtime\n"
          "settings = runtime.configure(xla_flags=False, min_compile_seconds=0)\n"
          "import jax, jax.numpy as jnp\n"
          "jax.jit(lambda x: jnp.tanh(x @ x.T) * 3)(jnp.ones((8, 8))).block_until_ready()\n"
          "print(settings['compilation_cache'], hits.count('/jax/compilation_cache/cache_hits'))")
  bucket = GCSFileSystem(token="anon", endpoint_url=url)
  assert _python(code, env).split() == [f"gs://{BUCKET}/jax-cache", "0"]
  stored = len(bucket.ls(f"{BUCKET}/jax-cache"))
  assert stored > 0
  folder, hits = _python(code, env).split()
  assert folder == f"gs://{BUCKET}/jax-cache" and int(hits) > 0
  assert len(bucket.ls(f"{BUCKET}/jax-cache", refresh=True)) == stored  # nothing compiled again
