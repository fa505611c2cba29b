"""`jip2p-eval`'s answers to bad input: one line naming the problem, exit status 2, no traceback,
and nothing written that was not there (the model is never loaded: each is found before); and
the size rule, which is the model's (the shipped world model is scored at its own 32 px). No
torch, no TensorFlow (the missing TFRecord folder is in test_sets_tf.py). The tests run as root,
for whom chmod does not make a folder unwritable: an output under a regular file stands for one
that cannot be written."""

import json
import os

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jip2p.cli import eval as eval_cli
from jip2p.demo_run import PRETRAINED
from tests.eval import parquet_fixtures as fx


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  from jip2p.checkpoints import create_random_pipeline
  folder = str(tmp_path_factory.mktemp("eval_errors") / "model")
  create_random_pipeline(folder, "tiny")
  return folder


def run_cli(argv, capsys) -> tuple[int, str]:
  code = eval_cli.main(argv)
  err = capsys.readouterr().err
  assert "Traceback" not in err
  return code, err.strip().splitlines()[-1]


def world(model, output, *extra):
  return ["--model", model, "--set", "world", "--world-n", "2", "--steps", "1",
          "--output", str(output), "--no-progress", *extra]


def test_an_output_under_a_regular_file(model, tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  code, line = run_cli(world(model, tmp_path / "a_file" / "eval"), capsys)
  assert code == 2
  assert line == (f"jip2p-eval: error: cannot create the output folder {tmp_path}/a_file/eval: "
                  f"{tmp_path}/a_file is not a folder")
  assert os.listdir(tmp_path) == ["a_file"]


def test_a_damaged_run_record_is_named_and_kept(model, tmp_path, capsys):
  (tmp_path / "run.json").write_text('{"set": ')
  code, line = run_cli(world(model, tmp_path), capsys)
  assert code == 2 and line.startswith(f"jip2p-eval: error: {tmp_path}/run.json is damaged (")
  assert (tmp_path / "run.json").read_text() == '{"set": ' and os.listdir(tmp_path) == ["run.json"]


def test_results_of_another_tool_are_left_alone(model, tmp_path, capsys):
  (tmp_path / "results.jsonl").write_text("[1, 2]\n")
  code, line = run_cli(world(model, tmp_path), capsys)
  assert code == 2 and line == (f"jip2p-eval: error: {tmp_path} holds results.jsonl but no "
                                "run.json: results of another tool or run; choose another "
                                "output folder")
  assert os.listdir(tmp_path) == ["results.jsonl"]


def test_an_empty_sweep_list(model, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    eval_cli.main(world(model, tmp_path / "out", "--sweep", "image", "--image-values", ","))
  err = capsys.readouterr().err
  assert e.value.code == 2 and "Traceback" not in err
  assert "argument --image-values: expected comma-separated numbers, got ','" in err
  assert not (tmp_path / "out").exists()


def test_parquet_columns_of_the_wrong_type(model, tmp_path, capsys):
  path = tmp_path / "emu.parquet"
  pq.write_table(pa.table({"instruction": [5], "image": ["not bytes"], "task": ["add"],
                           "input_caption": ["a"], "output_caption": ["b"]}), str(path))
  code, line = run_cli(["--model", model, "--set", "emu_edit", "--data", str(path),
                        "--output", str(tmp_path / "out")], capsys)
  assert code == 2 and line == (f"jip2p-eval: error: {path}: wrong column types (instruction is "
                                "int64, not text; image is string, not image)")
  assert not (tmp_path / "out").exists()


def test_captions_that_are_not_utf8(model, tmp_path, capsys):
  data = tmp_path / "mb.parquet"
  fx.write_magicbrush(str(data))
  captions = tmp_path / "captions.json"
  captions.write_bytes(json.dumps({"7": {"7-input.png": "x"}}).encode()[:-2] + b"\xff\"}}")
  code, line = run_cli(["--model", model, "--set", "magicbrush", "--data", str(data),
                        "--captions", str(captions), "--output", str(tmp_path / "out")], capsys)
  assert code == 2 and line == (f"jip2p-eval: error: {captions}: the captions file is not UTF-8 "
                                "text (byte 0xff on line 1)")
  assert not (tmp_path / "out").exists()


def test_the_shipped_world_model_is_scored_at_its_own_size(tmp_path, capsys):
  out = tmp_path / "eval"
  argv = ["--model", PRETRAINED, "--set", "world", "--world-n", "3", "--world-size", "32",
          "--steps", "2", "--batch-size", "3", "--output", str(out), "--no-progress"]
  assert eval_cli.main(argv) == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert len(rows) == 3 and len({r["session"] for r in rows}) == 3
  for row in rows:
    assert row["world_success"] in (0.0, 1.0) and math.isfinite(row["world_psnr"])
  assert json.loads((out / "run.json").read_text())["resolution"] == 32
  # Without --world-size the world is drawn at the model's size: the same run, so it resumes.
  assert eval_cli.main(argv[:6] + argv[8:]) == 0
  assert len((out / "results.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("extra,words", [
    (["--world-size", "30"], "--world-size must be a multiple of 4 (this model's size step"),
    (["--world-size", "32", "--resolution", "34"], "--resolution must be a multiple of 4 "),
])
def test_a_size_off_the_models_step_is_named(tmp_path, capsys, extra, words):
  code, line = run_cli(["--model", PRETRAINED, "--set", "world", "--world-n", "2", "--steps", "1",
                        "--output", str(tmp_path / "out"), *extra], capsys)
  assert code == 2 and line.startswith(f"jip2p-eval: error: {words}"), line
  assert not (tmp_path / "out").exists()
