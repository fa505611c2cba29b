"""`jip2p-eval --sdedit-model`: the SDEdit series beside InstructPix2Pix's in one run (tiny random
models on the procedural world, no CLIP: pixel and world metrics), and its refusals, each one
line, exit 2, before any edit. No torch, no TensorFlow."""

import csv
import json

import pytest

from jip2p.cli import eval as eval_cli
from tests.eval import parquet_fixtures as fx


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from jip2p.checkpoints import create_random_pipeline
  root = tmp_path_factory.mktemp("eval_sdedit")
  create_random_pipeline(str(root / "ip2p"), "tiny")
  create_random_pipeline(str(root / "t2i"), "tiny", unet_in_channels=4)
  return str(root / "ip2p"), str(root / "t2i")


def run_cli(argv, capsys) -> tuple[int, str]:
  code = eval_cli.main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, err.strip().splitlines()[-1]


def test_sdedit_series_in_one_run(models, tmp_path, capsys):
  ip2p, t2i = models
  out = tmp_path / "eval"
  argv = ["--model", ip2p, "--sdedit-model", t2i, "--set", "world", "--world-n", "2",
          "--steps", "2", "--strength-values", "0.5,1", "--output", str(out), "--no-progress"]
  assert eval_cli.main(argv) == 0
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  by_setting = {}
  for r in rows:
    by_setting.setdefault(r["setting"], []).append(r)
  assert sorted(by_setting) == ["sT7.5_sI1.5", "sdedit_strength0.5_s7.5",
                                "sdedit_strength1_s7.5"]
  assert all(len(v) == 2 for v in by_setting.values())
  assert [r["strength"] for r in by_setting["sdedit_strength1_s7.5"]] == [1.0, 1.0]
  assert [r["seed"] for r in by_setting["sdedit_strength0.5_s7.5"]] == [
      r["seed"] for r in by_setting["sT7.5_sI1.5"]]
  assert json.loads((out / "run.json").read_text())["sdedit_model"] == t2i
  with open(out / "summary.csv") as f:
    table = list(csv.DictReader(f))
  assert [(e["setting"], e["series"], e["strength"]) for e in table if e["group"] == "all"] == [
      ("sT7.5_sI1.5", "single", ""), ("sdedit_strength0.5_s7.5", "sdedit", "0.5"),
      ("sdedit_strength1_s7.5", "sdedit", "1.0")]
  # Resuming with another SDEdit model, or none, is refused.
  code, line = run_cli(argv[:2] + argv[4:], capsys)
  assert code == 2 and "sdedit_model" in line


def test_sdedit_refusals(models, tmp_path, capsys):
  ip2p, t2i = models
  base = ["--model", ip2p, "--set", "world", "--world-n", "2", "--steps", "2", "--no-progress"]
  code, line = run_cli(base + ["--sdedit-model", ip2p, "--output", str(tmp_path / "a")], capsys)
  assert code == 2 and "SDEdit needs a text-to-image model" in line
  code, line = run_cli(base + ["--sdedit-model", t2i, "--strength-values", "0.5,1.5",
                               "--output", str(tmp_path / "b")], capsys)
  assert code == 2 and "strength_values must be distinct values in (0, 1]" in line
  assert not (tmp_path / "b").exists()
  data = tmp_path / "mb.parquet"
  fx.write_magicbrush(str(data))  # no --captions: no output captions to prompt SDEdit with
  code, line = run_cli(["--model", ip2p, "--sdedit-model", t2i, "--set", "magicbrush", "--data",
                        str(data), "--output", str(tmp_path / "c")], capsys)
  assert code == 2 and "SDEdit edits towards each edit's output caption" in line
  assert not (tmp_path / "c").exists()
