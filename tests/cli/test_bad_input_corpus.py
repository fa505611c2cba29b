"""Every console script over one corpus of bad inputs: one named line, exit 2, nothing written.

Each tool's own tests check its cases in depth; this corpus checks the class across all of them,
as a new user meets it: a run in a fresh process (the installed console script), a mistake of the
user's (a non-image, an empty or truncated file, random bytes where weights should be, a path that
does not exist, an output that cannot be created), and then three things: exit status 2, no
Python traceback anywhere in the output, and no trace of the output at its path. The tests run as
root, which chmod does not stop, so an unwritable output is a path under a regular file.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The bad inputs, one good image and a tiny random model, in one folder."""
  root = tmp_path_factory.mktemp("corpus")
  png = io.BytesIO()
  Image.fromarray(np.full((32, 32, 3), 127, np.uint8)).save(png, format="PNG")
  files = {
      "good.png": png.getvalue(),
      "not_image.png": b"this is text, not an image\n",
      "empty.png": b"",
      "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
      "random.safetensors": np.random.default_rng(0).bytes(4096),
      "empty.ckpt": b"",
      "empty.parquet": b"",
      "not_utf8.jsonl": b'{"input": "a cat", "edit": "\xff\xfe", "output": "a dog"}\n',
      "a_file": b"a regular file where a folder is needed\n",
  }
  for name, data in files.items():
    (root / name).write_bytes(data)
  (root / "empty_dir").mkdir()
  subprocess.run([sys.executable, "-c", "import sys; from jip2p import checkpoints; "
                  "checkpoints.create_random_pipeline(sys.argv[1], 'tiny')", str(root / "model")],
                 check=True, env=_env(), timeout=600)
  return root


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def _cases(c, out) -> list[tuple[list[str], str | None]]:
  """(command line, the output path that must not appear: under ``out`` or ``c/a_file``)."""
  model, missing = str(c / "model"), str(c / "missing")
  good, under_file = str(c / "good.png"), str(c / "a_file")
  return [
      (["jip2p-edit", "--model", model, "--input", str(c / "not_image.png"), str(c / "empty.png"),
        str(c / "truncated.png"), "--instruction", "x", "--output", f"{out}/edit"], f"{out}/edit"),
      (["jip2p-edit", "--model", model, "--input", good, "--instruction", "x", "--output",
        f"{under_file}/edit"], f"{under_file}/edit"),
      (["jip2p-edit", "--model", str(c / "empty_dir"), "--input", good, "--instruction", "x",
        "--output", f"{out}/edit2"], f"{out}/edit2"),
      (["jip2p-convert", str(c / "random.safetensors"), f"{out}/conv"], f"{out}/conv"),
      (["jip2p-convert", str(c / "empty.ckpt"), f"{out}/conv2"], f"{out}/conv2"),
      (["jip2p-import", "hf-parquet", str(c / "empty.parquet"), "--out", f"{out}/imp"],
       f"{out}/imp"),
      (["jip2p-import", "generator", missing, "--out", f"{out}/imp2"], f"{out}/imp2"),
      (["jip2p-generate", "--config", f"configs/generate_tiny.py:model={missing}", "--prompts",
        str(c / "not_utf8.jsonl"), "--out", f"{out}/gen"], f"{out}/gen"),
      (["jip2p-prompts", "--captions", str(c / "not_utf8.jsonl"), "--model", "m", "--out",
        f"{out}/prompts.jsonl"], f"{out}/prompts.jsonl"),
      (["jip2p-eval", "--model", model, "--set", "tfrecords", "--data", missing, "--output",
        f"{out}/eval"], f"{out}/eval"),
      (["jip2p-clip-filter", missing, "--clip-weights", str(c / "empty.ckpt"), "--out",
        f"{out}/filter"], f"{out}/filter"),
      (["jip2p-cache-latents", "--data", missing, "--model", model, "--out", f"{out}/cache"],
       f"{out}/cache"),
      (["jip2p-train", f"--config={missing}.py", f"--workdir={out}/run"], f"{out}/run"),
      (["jip2p-train", "--config=configs/tiny.py", f"--workdir={under_file}/run"],
       f"{under_file}/run"),
      (["jip2p-export", "--workdir", missing, "--out", f"{out}/export"], f"{out}/export"),
      (["jip2p-demo", "--pretrained", missing, "--out", f"{out}/demo"], f"{out}/demo"),
      (["jip2p-app", "--model", str(c / "empty_dir"), "--port", "0"], None),
      (["jip2p-bench", "--cases", "not_a_case", "--json", f"{out}/bench.json"],
       f"{out}/bench.json"),
  ]


def test_every_console_script_names_a_bad_input_in_one_line(corpus, tmp_path):
  cases = _cases(corpus, tmp_path)
  declared = open(os.path.join(REPO, "pyproject.toml")).read()
  assert {line.split("=")[0].strip() for line in declared.splitlines()
          if line.startswith("jip2p-")} == {argv[0] for argv, _ in cases}, \
      "a console script is missing from the corpus"
  failures = []
  for argv, output in cases:
    script = os.path.join(os.path.dirname(sys.executable), argv[0])  # the venv's installed one
    done = subprocess.run([script, *argv[1:]], capture_output=True, text=True, env=_env(),
                          cwd=REPO, timeout=600)
    errors = [l for l in done.stderr.splitlines() if l.startswith(f"{argv[0]}: error:")]
    left = []
    if output is not None:
      parent, name = os.path.split(output)
      left = [p for p in (os.listdir(parent) if os.path.isdir(parent) else [])
              if p == name or p.startswith(f".tmp-{name}")]
    problem = (f"exit {done.returncode}" if done.returncode != 2 else
               "a traceback" if "Traceback" in done.stdout + done.stderr else
               f"{len(errors)} error lines" if len(errors) != 1 else
               f"left {left} in {parent}" if left else None)
    if problem:
      failures.append(f"{' '.join(argv)}: {problem}\n{done.stderr[-1500:]}")
  assert not failures, "\n\n".join(failures)
