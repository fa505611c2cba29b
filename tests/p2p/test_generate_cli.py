"""`jip2p-generate` and `jip2p-clip-filter` end to end: a tiny random SD folder (JAX-written), a
tiny random open_clip model (written by a helper process: torch never enters this one), 3 good
prompts among bad lines, 4 candidates, 3 steps at 32 px.

The kill -9 test runs the generator as a subprocess, kills it once a record is committed, reruns
it and compares with an uninterrupted run. JAX's persistent compilation cache (a temporary
folder) spares the repeated compilations. About 2–3 minutes of CPU.
"""

import dataclasses
import io
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


def test_sdxl_folder_end_to_end_in_p2p_mode(assets, uninterrupted, tmp_path):
  """A tiny-sdxl text-to-image folder (JAX-written) through the same command, sidecar and
  prompts, with Prompt-to-Prompt (a word swap, refinements): the same prompts and seeds, every
  kept pair a 32 px image pair of its own, none of them the SD model's."""
  from PIL import Image

  from jip2p.checkpoints import create_random_pipeline
  root, spec, prompts, _ = assets
  sdxl = create_random_pipeline(str(tmp_path / "sdxl"), "tiny-sdxl", unet_in_channels=4)
  out = tmp_path / "gen"
  config = spec.replace(f"model={root / 'sd'},", f"model={sdxl},") + ",shard=1,mode=p2p"
  assert generate_cli.main(["--config", config, "--prompts", prompts, "--out", str(out)]) == 0
  records = _records(out)
  assert [r[0] for r in records] == [0, 0, 2, 2, 5, 5]
  manifest = read_manifest(str(out))
  assert manifest["complete"] and manifest["metadata"]["config"]["model"] == sdxl
  sd_images = {image for r in _records(uninterrupted) for image in r[3:5]}
  for record in records:
    pair = [np.asarray(Image.open(io.BytesIO(image))) for image in record[3:5]]
    assert pair[0].shape == pair[1].shape == (32, 32, 3) and pair[0].std() > 1
    assert not np.array_equal(pair[0], pair[1])
    assert not set(record[3:5]) & sd_images


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


def test_generate_and_clip_filter_on_a_non_local_filesystem(assets, uninterrupted, monkeypatch):
  """--out (and the clip filter's input) on TensorFlow's in-memory ram:// filesystem, which takes
  the tf.io.gfile path that gs:// takes: the records and scores of a local run. The TFDS metadata
  files are written through etils.epath, which knows gs:// but not ram://: recorded here, not
  written."""
  from jip2p.data import tfds
  from jip2p.data.tf_setup import import_tf
  gfile = import_tf().io.gfile
  metadata = []
  monkeypatch.setattr(tfds, "write_metadata", lambda directory, _: metadata.append(directory))
  root, spec, prompts, _ = assets
  gen, filtered = "ram://jip2p-generate-test/gen", "ram://jip2p-generate-test/filtered"
  assert generate_cli.main(["--config", spec + ",shard=1", "--prompts", prompts,
                            "--out", gen]) == 0
  assert _records(gen) == _records(uninterrupted)
  with gfile.GFile(f"{gen}/candidates.jsonl") as f:
    assert f.read() == (uninterrupted / "candidates.jsonl").read_text()
  argv = [gen, "--out", filtered, "--clip-weights", str(root / "tiny_clip.pt"),
          "--clip-config", str(root / "tiny_clip.json"), "--device", "cpu",
          "--min-sim-image", "-1", "--min-sim-0", "-1", "--min-sim-1", "-1",
          "--min-sim-direction", "-1", "--top-k", "1"]
  assert clip_filter_cli.main(argv) == 0
  assert [r[0] for r in _records(filtered)] == [0, 2, 5]
  with gfile.GFile(f"{filtered}/scores.jsonl") as f:
    assert len(f.read().splitlines()) == 6
  assert metadata == [gen, filtered]


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


# ------------------------------------------------------------------ bad input: one line, exit 2
# The tests run as root, for whom chmod does not make a folder unwritable: an output under a
# regular file stands for every folder that cannot be written.


def run_cli(cli, argv, capsys) -> tuple[int, str]:
  """(exit status, the last line of stderr); no traceback."""
  code = cli.main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, err.strip().splitlines()[-1]


def one_prompt(tmp_path) -> str:
  path = tmp_path / "one.jsonl"
  path.write_text(PROMPTS[0] + "\n")
  return str(path)


@pytest.mark.parametrize("content,words", [
    (PROMPTS[0].encode() + b"\n" + '{"input": "caf\xe9"}'.encode("latin-1") + b"\n",
     "the prompts file is not UTF-8 text (byte 0xe9 on line 2)"),
    (b"", "no usable prompt (0 lines)"),
    (b"not json\n\n[1]\n", "no usable prompt (3 lines, skipped 1 (malformed JSON: lines 1), "
                           "skipped 1 (not a JSON object: lines 3))"),
])
def test_a_prompts_file_with_nothing_to_generate(assets, tmp_path, capsys, content, words):
  _, spec, _, _ = assets
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_bytes(content)
  code, line = run_cli(generate_cli, ["--config", spec, "--prompts", str(prompts), "--out",
                                      str(tmp_path / "out")], capsys)
  assert code == 2 and line == f"jip2p-generate: error: {prompts}: {words}"
  assert os.listdir(tmp_path) == ["prompts.jsonl"]


def test_outputs_and_models_that_cannot_be_used(assets, uninterrupted, tmp_path, capsys):
  root, spec, prompts, _ = assets
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "empty_model").mkdir()
  prog = "jip2p-generate: error:"
  cases = [
      (spec, ["--out", str(tmp_path / "a_file" / "out")],
       f"{prog} cannot create the output folder {tmp_path}/a_file/out: {tmp_path}/a_file is not a "
       "folder"),
      (spec, ["--out", str(tmp_path / "out"), "--partition", "1", "--num-partitions", "9"],
       f"{prog} partition 1 of 9 gets none of the 3 usable prompts (line number mod 9); use "
       "fewer partitions"),
      (spec.replace(str(root / "sd"), str(tmp_path / "empty_model")),
       ["--out", str(tmp_path / "out")],
       f"{prog} tokenizer file '{tmp_path}/empty_model/vocab.json' is missing (nor is there a "
       "tokenizer.json)"),
  ]
  for config, extra, want in cases:
    code, line = run_cli(generate_cli, ["--config", config, "--prompts", prompts, *extra], capsys)
    assert code == 2 and line == want
  assert sorted(os.listdir(tmp_path)) == ["a_file", "empty_model"]
  # A dataset another tool wrote is refused before it is touched (a writer would mark it
  # incomplete).
  other = tmp_path / "imported"
  from jip2p.data.writer import DatasetWriter
  from tests.data import triplet_fixtures as fx
  with DatasetWriter(str(other), examples_per_shard=1) as w:
    w.write(fx.triplet(0, size=32))
  before = {p.name: p.read_bytes() for p in other.iterdir()}
  code, line = run_cli(generate_cli, ["--config", spec, "--prompts", prompts, "--out",
                                      str(other)], capsys)
  assert code == 2 and line == (f"{prog} {other} holds a dataset that jip2p-generate did not "
                                "write; choose another output folder")
  assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_no_candidate_passing_the_filter_exits_2_and_keeps_the_scores(assets, tmp_path, capsys):
  root, spec, _, _ = assets
  config = tmp_path / "strict.py"
  config.write_text("import runpy\n\n\ndef get_config(arg=None):\n"
                    f"  c = runpy.run_path({str(ROOT / 'configs/generate_tiny.py')!r})"
                    "['get_config'](arg)\n  c.filter.min_sim_image = 2.0\n  return c\n")
  out = tmp_path / "out"
  argv = ["--config", f"{config}:" + spec.partition(":")[2], "--prompts", one_prompt(tmp_path),
          "--out", str(out)]
  code, line = run_cli(generate_cli, argv, capsys)
  assert code == 2 and line.startswith("jip2p-generate: error: no candidate of the 1 prompts "
                                       "passed the CLIP filter (")
  assert line.endswith(f"every score is in {out}/candidates.jsonl: lower config.filter's "
                       "thresholds and run again")
  # No dataset is left (no manifest: training cannot take the folder for one), only the scores.
  assert sorted(os.listdir(out)) == ["candidates.jsonl"]
  [row] = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
  assert row["prompt_index"] == 0 and len(row["sim_image"]) == 4 and row["kept"] == []


def test_reopened_scores_keep_the_lines_before_the_resume_point(tmp_path):
  from jip2p.p2p import dataset
  path = tmp_path / "candidates.jsonl"
  path.write_text('{"prompt_index": 0}\n{"prompt_index": 2}\n[3]\n{"prompt_index": 1}\n'
                  '{"prompt_index": 4}\n{"prompt_in')
  with dataset.reopen_scores(str(path), 2, "prompt_index") as f:
    f.write('{"prompt_index": 2, "again": true}\n')
  assert path.read_text() == ('{"prompt_index": 0}\n{"prompt_index": 1}\n'
                              '{"prompt_index": 2, "again": true}\n')
  with dataset.reopen_scores(str(path), -1, "prompt_index"):  # a fresh start keeps nothing
    pass
  assert path.read_text() == "" and os.listdir(tmp_path) == ["candidates.jsonl"]


@pytest.mark.parametrize("case", ["missing input", "no such split", "output under a file",
                                  "output is the input", "output of another tool", "no batch"])
def test_clip_filter_checks_before_the_sidecar_starts(case, assets, uninterrupted, tmp_path,
                                                      capsys, monkeypatch):
  import jip2p.sidecar
  monkeypatch.setattr(jip2p.sidecar, "ClipScorer", lambda *_, **__: pytest.fail("it started"))
  (tmp_path / "a_file").write_text("x")
  data, out, extra = [str(uninterrupted)], tmp_path / "out", []
  if case == "missing input":
    data, words = [*data, str(tmp_path / "nope")], f"{tmp_path}/nope does not exist"
  elif case == "no such split":
    extra, words = ["--split", "test"], "has no split 'test' (it has ['train'])"
  elif case == "output under a file":
    out = tmp_path / "a_file" / "out"
    words = f"cannot create the output folder {out}: {tmp_path}/a_file is not a folder"
  elif case == "no batch":
    extra, words = ["--batch-size", "0"], "--batch-size must be ≥ 1, got 0"
  elif case == "output is the input":
    out, words = uninterrupted, f"--out {uninterrupted} is one of the input datasets"
  else:
    from jip2p.data.writer import DatasetWriter
    with DatasetWriter(str(tmp_path / "a_dataset"), examples_per_shard=1):
      pass
    out = tmp_path / "a_dataset"
    words = f"{out} holds a dataset that jip2p-clip-filter did not write"
  listing = sorted(os.listdir(tmp_path))
  code, line = run_cli(clip_filter_cli, [*data, "--out", str(out), "--clip-weights", "w.pt",
                                         *extra], capsys)
  assert code == 2 and line.startswith("jip2p-clip-filter: error: ") and words in line
  assert sorted(os.listdir(tmp_path)) == listing


def test_clip_filter_keeping_nothing_or_meeting_a_bad_image(assets, uninterrupted, tmp_path,
                                                           capsys):
  root, _, _, _ = assets
  clip = ["--clip-weights", str(root / "tiny_clip.pt"), "--clip-config",
          str(root / "tiny_clip.json"), "--device", "cpu"]
  out = tmp_path / "none_kept"
  code, line = run_cli(clip_filter_cli, [str(uninterrupted), "--out", str(out), *clip,
                                         "--min-sim-image", "2"], capsys)
  assert code == 2 and line == ("jip2p-clip-filter: error: no record passed the thresholds; "
                                f"every score is in {out}/scores.jsonl: choose lower ones and "
                                "run again")
  assert sorted(os.listdir(out)) == ["scores.jsonl"]  # no dataset left, only the scores
  assert len((out / "scores.jsonl").read_text().splitlines()) == 6
  # A PNG cut short is named by its position in the input.
  from jip2p.data.writer import DatasetWriter
  from tests.data import triplet_fixtures as fx
  data = tmp_path / "cut"
  with DatasetWriter(str(data)) as w:
    w.write(fx.triplet(0, size=32))
    good = fx.triplet(1, size=32)
    w.write(dataclasses.replace(good, edited_image=good.edited_image[:200]))
  code, line = run_cli(clip_filter_cli, [str(data), "--out", str(tmp_path / "out"), *clip],
                       capsys)
  assert code == 2
  assert line.startswith("jip2p-clip-filter: error: input record 1 edited_image: not a readable "
                         "image (")
