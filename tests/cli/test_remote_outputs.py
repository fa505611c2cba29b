"""Tools that write their output with local files only refuse a gs:// output in one line (exit 2)
before any work, instead of writing it into a folder named ``gs:`` in the working directory and
losing it with the machine.

The tools that do write to gs:// are tested against a GCS emulator (tests/train/test_gcs_runs.py:
jip2p-train, jip2p-export, jip2p-eval, models, the compilation cache) or TensorFlow's ram://
filesystem (tests/data: jip2p-import, the dataset writer and reader, jip2p-cache-latents;
tests/p2p/test_generate_cli.py: jip2p-generate and jip2p-clip-filter).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, "data", "synthetic-ip2p")


def _cases(tmp) -> list[tuple[list[str], str]]:
  image, src, config = str(tmp / "in.png"), str(tmp / "src.safetensors"), str(tmp / "clip.json")
  return [
      (["jip2p.cli.edit", "--model", MODEL, "--input", image, "--instruction", "x",
        "--output", "gs://bucket/out.png"], "--output gs://bucket/out.png"),
      (["jip2p.cli.generate", "--config", f"{REPO}/configs/generate_world.py:model={MODEL}",
        "--out", "gs://bucket/gen", "--show-attention", "a red circle"],
       "--out (with --show-attention) gs://bucket/gen"),
      (["jip2p.cli.convert", src, "gs://bucket/clip", "--open-clip-config", config],
       "dst (with --open-clip-config) gs://bucket/clip"),
      (["jip2p.cli.demo", "--out", "gs://bucket/demo"], "--out gs://bucket/demo"),
      (["jip2p.cli.bench", "--json", "gs://bucket/bench.json"], "--json gs://bucket/bench.json"),
  ]


@pytest.mark.parametrize("case", range(5), ids=["edit", "generate-show-attention",
                                                "convert-open-clip", "demo", "bench"])
def test_a_local_only_output_on_gs_is_refused(case, tmp_path):
  Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
  (tmp_path / "src.safetensors").write_bytes(b"\0" * 64)
  (tmp_path / "clip.json").write_text("{}")
  argv, named = _cases(tmp_path)[case]
  work = tmp_path / "cwd"
  work.mkdir()
  result = subprocess.run([sys.executable, "-m", *argv], cwd=work, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"error: {named}: this tool writes local files only" in result.stderr
  assert "Traceback" not in result.stderr
  assert os.listdir(work) == []  # no ./gs:/bucket/…
