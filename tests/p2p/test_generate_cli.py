"""`jip2p-generate` and `jip2p-clip-filter` end to end: a tiny random SD folder (JAX-written), a
tiny random open_clip model (written by a helper process: torch never enters this one), 3 good
prompts among bad lines, 4 candidates, 3 steps at 32 px.

The kill -9 test runs the generator as a subprocess, kills it once a record is committed, reruns
it and compares with an uninterrupted run. JAX's persistent compilation cache (a temporary
folder) spares the repeated compilations. About 2–3 minutes of CPU.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jip2p.cli import clip_filter as clip_filter_cli
from jip2p.cli import generate as generate_cli
from jip2p.data.reader import iter_triplets
from jip2p.data.writer import read_manifest

pytestmark = pytest.mark.tf

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = [
    '{"input": "a photo of a cat", "edit": "make it a dog", "output": "a photo of a dog"}',
    'not json at all',
    '{"caption": "a red house", "edit": "add snow", "output": "a red house in snow"}',
    '{"input": "a tree", "edit": "", "output": "a tree at night"}',
    '{"input": "a car", "output": "a blue car"}',
    json.dumps({"input": "a painting of a boat " + "very " * 90, "edit": "make it night",
                "output": "a painting of a boat at night"}),
]
GOOD_LINES = [0, 2, 5]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """(folder, config spec without the shard size, prompts path, compilation cache dir)."""
  root = tmp_path_factory.mktemp("generate_cli")
  code = ("import sys; sys.path.insert(0, '.'); from tests.sidecar.tiny_clip import "
          f"write_tiny_clip; write_tiny_clip({str(root)!r}, suffix='.pt')")
  clip = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
  from jip2p.checkpoints import create_random_pipeline
  create_random_pipeline(str(root / "sd"), "tiny", unet_in_channels=4)
  assert clip.wait() == 0
  (root / "prompts.jsonl").write_text("\n".join(PROMPTS) + "\n")
  spec = (f"{ROOT}/configs/generate_tiny.py:model={root / 'sd'},clip={root / 'tiny_clip.pt'},"
          f"clip_config={root / 'tiny_clip.json'},batch=2")
  cache = root / "jax_cache"
  old = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir",
                                           "jax_persistent_cache_min_compile_time_secs",
                                           "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield root, spec, str(root / "prompts.jsonl"), cache
  for k, v in old.items():
    jax.config.update(k, v)


def _records(directory):
  return [(t.prompt_index, t.seed, t.instruction, t.input_image, t.edited_image,
           t.clip_sim_direction, t.p2p_threshold, t.cfg_scale)
          for t in iter_triplets(str(directory), "train")]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
  root, spec, prompts, _ = assets
  out = tmp_path_factory.mktemp("gen") / "full"
  argv = ["--config", spec + ",shard=1", "--prompts", prompts, "--out", str(out)]
  assert generate_cli.main(argv) == 0
  return out


def test_end_to_end(uninterrupted):
  records = _records(uninterrupted)
  assert len(records) == 6  # 3 good prompts × top_k 2 (every candidate passes)
  assert [r[0] for r in records] == [0, 0, 2, 2, 5, 5]
  assert records[0][2] == "make it a dog"
  assert all(0.1 <= r[6] <= 0.9 and 7.5 <= r[7] <= 15 for r in records)
  manifest = read_manifest(str(uninterrupted))
  assert manifest["complete"] and manifest["metadata"]["config"]["candidates"] == 4
  rows = [json.loads(line) for line in (uninterrupted / "candidates.jsonl").read_text().splitlines()]
  assert [r["prompt_index"] for r in rows] == GOOD_LINES
  for row in rows:
    assert len(row["seed"]) == len(row["sim_direction"]) == 4 and len(row["kept"]) == 2
    best = np.argsort(-np.asarray(row["sim_direction"]), kind="stable")[:2]
    np.testing.assert_array_equal(row["kept"], best)
  kept_seeds = [rows[i // 2]["seed"][rows[i // 2]["kept"][i % 2]] for i in range(6)]
  assert [r[1] for r in records] == kept_seeds


def test_kill_and_resume_gives_the_uninterrupted_records(assets, uninterrupted, tmp_path):
  root, spec, prompts, cache = assets
  out = tmp_path / "killed"
  argv = ["--config", spec + ",shard=1", "--prompts", prompts, "--out", str(out)]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  process = subprocess.Popen([sys.executable, "-m", "jip2p.cli.generate", *argv], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  manifest = out / "manifest.json"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if manifest.exists() and json.loads(manifest.read_text())["splits"]:
      break
    time.sleep(0.01)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  stored = json.loads(manifest.read_text())
  assert not stored["complete"]
  assert 1 <= stored["splits"]["train"]["num_examples"] < 6
  assert generate_cli.main(argv) == 0
  assert _records(out) == _records(uninterrupted)
  assert ((out / "candidates.jsonl").read_text()
          == (uninterrupted / "candidates.jsonl").read_text())


def test_missing_clip_weights_fail_before_generating(assets, tmp_path, capsys):
  root, spec, prompts, _ = assets
  missing = tmp_path / "nope.pt"
  out = tmp_path / "never"
  bad = spec.replace(str(root / "tiny_clip.pt"), str(missing))
  assert generate_cli.main(["--config", bad, "--prompts", prompts, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert f"CLIP weights file not found: {missing}" in err
  assert not out.exists()
  # The prompts file is checked (and its bad lines reported) before that.
  assert "malformed JSON: lines 2" in err
  assert "empty caption or edit: lines 4" in err
  assert "missing edit: lines 5" in err
  assert "truncated 1 captions to 77 tokens (lines 6)" in err


def test_clip_filter_rescores_and_keeps_the_subset(assets, uninterrupted, tmp_path):
  root, _, _, _ = assets
  out = tmp_path / "filtered"
  argv = [str(uninterrupted), "--out", str(out), "--clip-weights", str(root / "tiny_clip.pt"),
          "--clip-config", str(root / "tiny_clip.json"), "--device", "cpu",
          "--min-sim-image", "-1", "--min-sim-0", "-1", "--min-sim-1", "-1",
          "--min-sim-direction", "-1", "--top-k", "1"]
  assert clip_filter_cli.main(argv) == 0
  source = _records(uninterrupted)
  kept = _records(out)
  # The best of each prompt's two stored pairs by rescored direction; rescoring the stored PNGs
  # gives the generator's scores again.
  assert [r[0] for r in kept] == [0, 2, 5]
  for record in kept:
    pair = [r for r in source if r[0] == record[0]]
    assert record[:5] == max(pair, key=lambda r: r[5])[:5]
    np.testing.assert_allclose(record[5], max(r[5] for r in pair), atol=1e-5)
  scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
  assert len(scores) == 6 and {"sim_0", "sim_1", "sim_direction", "sim_image"} <= set(scores[0])


def test_prompts_partitions_and_seeds():
  from jip2p.p2p import dataset
  from jip2p.tokenizer import CLIPTokenizer
  prompts, report = dataset.read_prompts(PROMPTS + ["", "[1, 2]"], CLIPTokenizer.default())
  assert [p.index for p in prompts] == GOOD_LINES and prompts[1].input == "a red house"
  assert report.skipped["not a JSON object"] == [8] and report.truncated == [6]
  parts = [dataset.partition(prompts, k, 2) for k in range(2)]
  assert [p.index for p in parts[0]] == [0, 2] and [p.index for p in parts[1]] == [5]
  seeds = dataset.prompt_seeds(0, 5, 4)
  assert seeds.dtype == np.uint32 and len(set(seeds.tolist())) == 4
  np.testing.assert_array_equal(seeds, dataset.prompt_seeds(0, 5, 4))
  assert not np.array_equal(seeds, dataset.prompt_seeds(0, 2, 4))
  assert not np.array_equal(seeds, dataset.prompt_seeds(1, 5, 4))
  assert dataset.resume_point(None) == (-1, 0)
  assert dataset.resume_point({"prompt": 5, "written": 1, "of": 2}) == (5, 1)
  assert dataset.resume_point({"prompt": 5, "written": 2, "of": 2}) == (6, 0)


def test_p2p_mode_checks_options_before_generating(assets, tmp_path, capsys):
  root, spec, _, _ = assets
  prompts = tmp_path / "p2p.jsonl"
  line = json.loads(PROMPTS[0])
  prompts.write_text("\n".join([
      json.dumps(line), json.dumps({**line, "p2p": {"edit": "swap"}}),
      json.dumps({**line, "p2p": {"reweight": {"dog": 2}, "cross_replace_steps": [0.1, 0.5]}}),
      json.dumps({**line, "p2p": {"edit": "replace", "blend_words": [["cat"], ["horse"]]}}),
  ]) + "\n")
  missing = tmp_path / "nope.pt"
  p2p_spec = spec.replace(str(root / "tiny_clip.pt"), str(missing)) + ",mode=p2p"
  argv = ["--config", p2p_spec, "--prompts", str(prompts), "--out", str(tmp_path / "never")]
  assert generate_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "4 lines, skipped 1 (bad p2p object: lines 2; line 2: unknown Prompt-to-Prompt edit" in err
  assert "skipped 1 (p2p options do not fit the captions: lines 4; line 4: blend word" in err
  assert f"CLIP weights file not found: {missing}" in err
  # A bad value in config.p2p is a configuration error naming the key, before the prompts.
  config = tmp_path / "bad_p2p.py"
  config.write_text("import runpy\n\n\ndef get_config(arg=None):\n"
                    f"  c = runpy.run_path({str(ROOT / 'configs/generate_tiny.py')!r})"
                    "['get_config'](arg)\n  c.p2p.cross_replace_steps = (0.5, 2.0)\n  return c\n")
  argv[1] = f"{config}:" + p2p_spec.partition(":")[2]
  assert generate_cli.main(argv) == 2
  assert ("error: config.p2p: cross_replace_steps=(0.5, 2.0) must be a fraction"
          in capsys.readouterr().err)
