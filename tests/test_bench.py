"""`jip2p-bench` end to end on CPU at the tiny preset: both sides run in their own processes and the
run ends in a well-formed table and JSON with the figures of every case; `bench/baseline.py`
runs the PyTorch side's cases."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from jip2p.bench import cases, report
from jip2p.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
CASES = "train_full_32_b2,edit_64_s1_b1,p2p_64_s1_k1"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # The sides run on one CPU device, as on one GPU.
  done = subprocess.run(
      [sys.executable, "-m", "jip2p.cli.bench", "--preset", "tiny", "--cases", CASES,
       "--dtype", "float32", "--warmup", "0", "--iters", "2", "--torch-compile", "none",
       "--json", str(out / "bench.json"), "--markdown", str(out / "bench.md")],
      capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout, json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_every_case_has_figures_from_both_sides(bench):
  _, doc, _ = bench
  rows = {(r["case"], r["side"]): r for r in doc["records"]}
  assert set(rows) == {("train_full_32_b2", "jax"), ("train_full_32_b2", "torch"),
                       ("edit_64_s1_b1", "jax"), ("edit_64_s1_b1", "torch"),
                       ("p2p_64_s1_k1", "jax")}
  for r in rows.values():
    assert "error" not in r, r
    assert r["iters"] == 2 and len(r["times"]) == 2 and r["time_s"] in r["times"]
    assert r["first_s"] > 0 and r["items_per_s"] == pytest.approx(r["items"] / r["time_s"])
    # A CPU reports no device memory: both sides give their process's resident high-water mark,
    # which the table's peak column shows.
    assert r["peak_gib"] is None and 0.1 < r["peak_rss_gib"] < 20
  assert rows["train_full_32_b2", "torch"]["variant"] == "eager"
  assert rows["train_full_32_b2", "torch"]["ema"] is True
  for case in ("train_full_32_b2", "edit_64_s1_b1"):
    jax_row, torch_row = rows[case, "jax"], rows[case, "torch"]
    assert torch_row["speedup"] == pytest.approx(jax_row["items_per_s"] / torch_row["items_per_s"])
  env = doc["environment"]
  assert env["jax"]["versions"]["jax"] and env["torch"]["versions"]["torch"]
  assert env["jax"]["platform"] == "cpu" and env["torch"]["platform"] == "cpu"


def test_flops_agree_between_the_two_counts(bench):
  """PyTorch's FlopCounterMode (the baseline's definition) and XLA's cost analysis count the same
  UNet training FLOPs to within a few percent; TFLOP/s use PyTorch's count on both sides."""
  _, doc, _ = bench
  torch_flops = doc["torch_unet_flops_per_image"]["32"]
  train = [r for r in doc["records"] if r["case"] == "train_full_32_b2"]
  jax_row = next(r for r in train if r["side"] == "jax")
  assert jax_row["xla_unet_flops_per_image"] == pytest.approx(torch_flops, rel=0.05)
  for r in train:
    assert r["flops_per_image"] == torch_flops and r["flops_source"] == "torch FlopCounterMode"
    assert r["tflops"] == pytest.approx(r["items_per_s"] * torch_flops / 1e12)
    assert r["mfu"] is None  # no known peak for a CPU


def test_second_start_compiles_from_the_persistent_cache(bench):
  _, doc, _ = bench
  first = next(r["first_s"] for r in doc["records"]
               if r["case"] == "train_full_32_b2" and r["side"] == "jax")
  second = doc["second_start_s"]["train_full_32_b2"]
  assert 0 < second < first / 2


def test_markdown_table_is_well_formed(bench):
  stdout, doc, md = bench
  assert md.strip() in stdout
  for title in ("### Train step", "### Edit latency", "### P2P paired generation"):
    assert title in md
  tables = [block.splitlines() for block in md.split("###")[1:]]
  for lines in tables:
    rows = [l for l in lines if l.startswith("|")]
    widths = {l.count("|") for l in rows}
    assert len(widths) == 1, rows  # every row has the header's columns
    assert len(rows) >= 3
  assert "| train_full_32_b2 | JAX (float32, xla) |" in md
  assert "| train_full_32_b2 | PyTorch eager |" in md
  assert "| edit_64_s1_b1 | PyTorch float32 |" in md
  rss = next(r["peak_rss_gib"] for r in doc["records"] if r["case"] == "edit_64_s1_b1"
             and r["side"] == "torch")
  assert "| edit_64_s1_b1 | PyTorch float32 | " in md and f"| {rss:.1f} |" in md


def test_sdxl_cases_run_on_both_sides(tmp_path, capsys):
  """--preset tiny-sdxl: the UNet-only train step with SDXL's conditioning (states of both
  encoders, pooled text, time ids) and the SDXL edit run on both sides, the two FLOP counts
  agree; train_full is refused in one line before any process starts."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  done = subprocess.run(
      [sys.executable, "-m", "jip2p.cli.bench", "--preset", "tiny-sdxl", "--cases",
       "train_unet_32_b2,edit_64_s1_b1", "--dtype", "float32", "--warmup", "0", "--iters", "1",
       "--torch-compile", "none", "--second-start", "none", "--json", str(tmp_path / "b.json")],
      capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  records = json.loads((tmp_path / "b.json").read_text())["records"]
  rows = {(r["case"], r["side"]): r for r in records}
  assert set(rows) == {(case, side) for case in ("train_unet_32_b2", "edit_64_s1_b1")
                       for side in ("jax", "torch")}
  for r in rows.values():
    assert "error" not in r, r
    assert r["time_s"] > 0 and r["items_per_s"] > 0
  jax_train, torch_train = rows["train_unet_32_b2", "jax"], rows["train_unet_32_b2", "torch"]
  assert 0 < jax_train["loss"] < 10 and 0 < torch_train["loss"] < 10
  # Within 10% at these tiny widths (6% measured): XLA also counts the element-wise work, a larger
  # share of a tiny UNet's than of SDXL's.
  assert jax_train["xla_unet_flops_per_image"] == pytest.approx(
      torch_train["torch_unet_flops_per_image"], rel=0.1)

  from jip2p.cli import bench as bench_cli
  from tests import cli_errors
  code = bench_cli.main(["--preset", "tiny-sdxl", "--cases", "train_full_32_b2,edit_64_s1_b1"])
  line = cli_errors.named_error(capsys.readouterr().err, code, "jip2p-bench")
  assert "train_full_32_b2: SDXL models run train_unet_<res>_b<batch>" in line
  assert [c.name for c in cases.parse_list(",".join(cases.SDXL_CASES))] == list(cases.SDXL_CASES)


def test_case_names():
  case = cases.parse("train_unet_256_b64")
  assert (case.kind, case.res, case.batch, case.full) == ("train", 256, 64, False)
  assert (case.warmup, case.iters) == (3, 10)
  case = cases.parse("edit_512_s100_b8", iters=1)
  assert (case.kind, case.steps, case.batch, case.iters) == ("edit", 100, 8, 1)
  assert [c.name for c in cases.parse_list("p2p_512_s100_k8,p2p_512_s100_k8")] == [
      "p2p_512_s100_k8"]
  assert all(cases.parse(name) for name in cases.DEFAULT_CASES)
  with pytest.raises(ConfigError, match="train_full_256"):
    cases.parse("train_full_256")


def _row(case, side, variant, **figures):
  return dict(side=side, variant=variant, case=case, kind="train", items=64, first_s=60.0,
              device="NVIDIA H100 80GB HBM3", iters=10, **figures)


def test_failed_process_becomes_a_failed_row():
  records = report.derive([
      _row("train_full_256_b128", "jax", "jax", time_s=0.5),
      _row("train_unet_256_b64", "torch", "eager", time_s=0.4, torch_unet_flops_per_image=541.7e9),
      {"side": "torch", "variant": "eager", "case": "train_full_256_b128", "kind": "train",
       "error": "out of memory: CUDA out of memory"}])
  # The FLOP count of any PyTorch eager row at 256 px serves every row at 256 px.
  assert records[0]["mfu"] == pytest.approx(64 / 0.5 * 541.7e9 / 989e12)
  assert records[0]["flops_source"] == "torch FlopCounterMode"
  md = report.table(records)
  assert "failed: out of memory" in md
  rows = [l for l in md.splitlines() if l.startswith("|")]
  assert len({l.count("|") for l in rows}) == 1


def test_the_baseline_script_runs_the_torch_side_without_ema(monkeypatch, capfd):
  """`bench/baseline.py`: every figure is a case `jip2p-bench` knows, run by the PyTorch
  side in its own process with EMA off (here at the tiny preset's size, on the CPU)."""
  spec = importlib.util.spec_from_file_location("baseline",
                                                REPO / "bench/baseline.py")
  baseline = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(baseline)
  named = [f[1] for group in baseline.GROUPS.values() for f in group if f[0] == "--case"]
  assert {cases.parse(name).kind for name in named} == {"train", "edit"}
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  monkeypatch.setitem(baseline.GROUPS, "train", [["--case", "train_full_32_b2"]])
  assert baseline.main(["--preset", "tiny", "--warmup", "0", "--iters", "1", "train"]) == 0
  records = [json.loads(line[len("BENCH "):]) for line in capfd.readouterr().out.splitlines()
             if line.startswith("BENCH ")]
  [train] = records
  assert train["torch_unet_flops_per_image"] > 0
  assert (train["case"], train["ema"], train["iters"]) == ("train_full_32_b2", False, 1)
  assert baseline.main(["--preset", "nonsense", "train"]) == 2
  with pytest.raises(SystemExit) as exit_:
    baseline.main(["nonsense"])
  assert exit_.value.code == 2
  assert "unknown group(s) nonsense" in capfd.readouterr().err


def test_table_keeps_cases_together_when_torch_compile_runs_last():
  records = report.derive([
      _row("train_unet_256_b64", "jax", "jax", time_s=0.3),
      _row("train_unet_256_b64", "torch", "eager", time_s=0.6),
      _row("train_full_256_b64", "jax", "jax", time_s=0.5),
      {"side": "torch", "variant": "eager", "case": "train_full_256_b64", "kind": "train",
       "error": "the run's 420 s budget was spent", "not_run": True},
      _row("train_unet_256_b64", "torch", "compile", time_s=0.4)])
  rows = [l for l in report.table(records).splitlines() if l.startswith("| train")]
  assert [r.split(" | ")[:2] for r in rows] == [
      ["| train_unet_256_b64", "JAX"], ["| train_unet_256_b64", "PyTorch eager"],
      ["| train_unet_256_b64", "PyTorch compile"], ["| train_full_256_b64", "JAX"],
      ["| train_full_256_b64", "PyTorch eager"]]
  assert "| not run: the run's 420 s budget was spent |" in rows[-1]
  assert records[4]["speedup"] == pytest.approx(0.4 / 0.3)


def test_case_time_budgets():
  unet, edit = cases.parse_list("train_unet_256_b64@150,edit_512_s20_b1")
  assert (unet.name, unet.limit_s, edit.limit_s) == ("train_unet_256_b64", 150.0, None)
  for bad in ("train_unet_256_b64@", "train_unet_256_b64@0", "train_unet_256_b64@soon"):
    with pytest.raises(ConfigError, match="seconds > 0"):
      cases.parse_list(bad)


def test_nothing_starts_once_the_budget_is_spent(tmp_path):
  """Under 10 s of --budget left no process starts: every row says so, and the files are
  written."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  done = subprocess.run(
      [sys.executable, "-m", "jip2p.cli.bench", "--preset", "tiny", "--cases",
       "train_full_32_b2,p2p_64_s1_k1", "--budget", "5", "--json", str(tmp_path / "b.json"),
       "--markdown", str(tmp_path / "b.md")],
      capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  records = json.loads((tmp_path / "b.json").read_text())["records"]
  assert [(r["case"], r["side"]) for r in records] == [
      ("train_full_32_b2", "jax"), ("train_full_32_b2", "torch"), ("p2p_64_s1_k1", "jax")]
  assert all(r["not_run"] and "5 s budget" in r["error"] for r in records)
  assert (tmp_path / "b.md").read_text().count("| not run: the run's 5 s budget was spent") == 3


def test_outputs_and_model_configs_that_cannot_be_used_are_named_before_any_case(tmp_path,
                                                                                 capsys):
  """--json/--markdown were first written after a case had run (or the memory analysis: many
  minutes), and a --model-configs file that is missing or not JSON was a traceback."""
  from jip2p.cli import bench as bench_cli
  from tests import cli_errors
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  (tmp_path / "not.json").write_text("{not json")
  (tmp_path / "list.json").write_text("[1]")
  cases_ = [  # (arguments, what the line says)
      (["--memory", f"{REPO}/configs/tiny.py", "--json", f"{a_file}/x.json"],
       f"the folder of --json {a_file} is not a folder"),
      (["--cases", "train_full_32_b2", "--markdown", f"{a_file}/sub/x.md"],
       f"cannot create the folder of --markdown {a_file}/sub: {a_file} is not a folder"),
      (["--cases", "train_full_32_b2", "--json", str(tmp_path)],
       f"--json {tmp_path} is a folder; name a file"),
      (["--cases", "train_full_32_b2", "--model-configs", str(tmp_path / "none.json")],
       f"{tmp_path}/none.json: cannot read the model configs file (No such file or directory)"),
      (["--cases", "train_full_32_b2", "--model-configs", str(tmp_path / "not.json")],
       f"{tmp_path}/not.json: the model configs file is not JSON (Expecting property name"),
      (["--cases", "train_full_32_b2", "--model-configs", str(tmp_path / "list.json")],
       f"{tmp_path}/list.json: expected a JSON object of component configs"),
  ]
  for args, says in cases_:
    code = bench_cli.main(args)
    line = cli_errors.named_error(capsys.readouterr().err, code, "jip2p-bench")
    assert says in line, (args, line)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "list.json", "not.json"]


def test_a_report_that_cannot_be_written_is_named_and_leaves_no_temporary_file(tmp_path):
  from jip2p.errors import OutputError
  (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a folder
  with pytest.raises(OutputError, match=f"cannot write {tmp_path}/taken: Is a directory"):
    report.write_text(str(tmp_path / "taken"), "table")
  assert os.listdir(tmp_path) == ["taken"] and os.listdir(tmp_path / "taken") == []
  report.write_text(str(tmp_path / "new" / "b.md"), "table")
  assert (tmp_path / "new" / "b.md").read_text() == "table"
