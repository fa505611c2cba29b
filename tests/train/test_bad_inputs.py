"""Bad input to jip2p-train and jip2p-export: one line naming the problem, exit 2, no traceback,
and nothing left in the work directory or at --out."""

from __future__ import annotations

import glob
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from jip2p.cli import export as export_cli
from jip2p.cli import train as train_cli
from tests import cli_errors
from tests.train.helpers import run_trainer, train_command, trainer_env

TINY = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py")


def _one_line_error(code: int, err: str, *needles: str) -> None:
  assert code == 2, err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  for needle in needles:
    assert needle in err, err


def test_help_lists_flags_configs_and_how_to_show_a_config(capsys):
  assert train_cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  for needle in ("--workdir", "--config", "--show_config", "tiny.py: A tiny random",
                 "ip2p_sd15.py: InstructPix2Pix as in the paper"):
    assert needle in out
  assert "generate_tiny.py" not in out  # a generation config, not a training one
  assert train_cli.main([f"--config={TINY}:steps=3", "--config.optimizer.lr=0.5",
                         "--show_config"]) == 0
  out = capsys.readouterr().out
  assert "total_steps: 3" in out and "lr: 0.5" in out


@pytest.mark.parametrize("args, needle", [
    ([f"--config={TINY}/nope.py"], "config file not found"),
    ([f"--config={os.path.dirname(TINY)}"], "configs is a folder: give a config .py file"),
    ([f"--config={os.path.dirname(os.path.dirname(TINY))}/pyproject.toml:steps=1"],
     "pyproject.toml is not a Python file: a config is a .py file with get_config()"),
    ([f"--config={TINY}:stpes=4"], "unknown config argument 'stpes'"),
    ([f"--config={TINY}", "--config.optimizer.lrr=1"],
     "--config.optimizer.lrr: the config has no key 'lrr'; did you mean 'lr'?"),
    ([f"--config={TINY}", "--config.optimizer.lr=abc"], "could not convert string to float"),
    ([f"--config={TINY}", "--config.data.res=7"], "config.data.res=7 must be a multiple of 4"),
])
def test_config_errors_are_one_line_and_write_nothing(args, needle, tmp_path, capsys):
  workdir = tmp_path / "run"
  code = train_cli.main([*args, f"--workdir={workdir}"])
  _one_line_error(code, capsys.readouterr().err, needle)
  assert not workdir.exists()


@pytest.fixture(scope="module")
def sdxl_folders(tmp_path_factory) -> dict[str, str]:
  """A tiny-sdxl folder, and a copy of it without text_encoder_2/."""
  from jip2p import checkpoints
  root = tmp_path_factory.mktemp("sdxl_folders")
  sdxl = checkpoints.create_random_pipeline(str(root / "sdxl"), "tiny-sdxl")
  shutil.copytree(sdxl, root / "no_te2")
  shutil.rmtree(root / "no_te2" / "text_encoder_2")
  return {"sdxl": sdxl, "no_te2": str(root / "no_te2")}


@pytest.mark.parametrize("config, model, needle", [
    ("ip2p_sdxl.py", "sd", "is a Stable Diffusion 1.x/2.x model, but this config trains an SDXL "
     "model (config.model.family='sdxl'): use configs/ip2p_sd15.py"),
    ("ip2p_sd15.py", "sdxl", "is an SDXL model, but this config trains a Stable Diffusion 1.x/2.x "
     "model (config.model.family='sd'): use configs/ip2p_sdxl.py"),
    ("ip2p_sdxl.py", "no_te2", "is not a complete SDXL folder: its UNet takes SDXL's text_time "
     "conditioning but it has no text_encoder_2/"),
])
def test_a_model_of_the_wrong_family_is_one_line(config, model, needle, micro_folder,
                                                 sdxl_folders, tmp_path, capsys):
  """An SD folder given to the SDXL config, an SDXL folder to an SD config, an SDXL folder
  without its second text encoder: named before any data is read or anything written."""
  init = micro_folder if model == "sd" else sdxl_folders[model]
  workdir = tmp_path / "run"
  code = train_cli.main([f"--config={os.path.dirname(TINY)}/{config}:init={init},"
                         f"data={tmp_path}/no_data,fsdp=1,accum=1,batch=8",
                         f"--workdir={workdir}"])
  _one_line_error(code, capsys.readouterr().err, needle)
  assert not workdir.exists()


def test_work_dir_that_cannot_be_created(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  for workdir in (blocker, blocker / "run"):
    code = train_cli.main([f"--config={TINY}", f"--workdir={workdir}"])
    _one_line_error(code, capsys.readouterr().err, f"{blocker} is a file, not a folder")
  assert blocker.read_text() == "" and os.listdir(tmp_path) == ["file"]


@pytest.fixture(scope="module")
def intact_run(micro_folder, compile_cache, tmp_path_factory) -> str:
  """A 2-step run with checkpoints 1 and 2 (tests leave it as it is)."""
  workdir = str(tmp_path_factory.mktemp("intact") / "run")
  result = run_trainer(f"steps=2,batch=8,init={micro_folder}", workdir,
                       "--config.checkpoint.every_steps=1", "--config.eval.every_steps=0",
                       "--config.export.at_end=", cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def corrupt_run(intact_run, tmp_path_factory) -> str:
  """`intact_run`'s copy, the weights of step 2 then truncated."""
  workdir = str(tmp_path_factory.mktemp("corrupt") / "run")
  shutil.copytree(intact_run, workdir)
  files = glob.glob(f"{workdir}/checkpoints/2/params/**/d/*", recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(10)
  return workdir


def test_resume_from_a_corrupt_checkpoint_names_step_file_and_way_out(corrupt_run, micro_folder,
                                                                      compile_cache):
  result = run_trainer(f"steps=3,batch=8,init={micro_folder}", corrupt_run,
                       "--config.checkpoint.every_steps=1", "--config.eval.every_steps=0",
                       "--config.export.at_end=", cache_dir=compile_cache)
  _one_line_error(result.returncode, result.stderr, "the checkpoint of step 2 cannot be read",
                  f"{corrupt_run}/checkpoints/2/params", "to resume training from step 1")
  assert "Event loop is closed" not in result.stderr
  assert sorted(os.listdir(f"{corrupt_run}/checkpoints")) == ["1", "2"]


def _listing(folder: str) -> dict[str, bytes | None]:
  """Every path under ``folder`` → its bytes (None for a folder)."""
  return {os.path.relpath(p, folder): None if os.path.isdir(p) else pathlib.Path(p).read_bytes()
          for p in glob.glob(f"{folder}/**", recursive=True)}


def test_resume_with_another_model_or_data_is_named_and_leaves_the_run_as_it_was(
    intact_run, micro_folder, compile_cache, tmp_path):
  """Not a damaged checkpoint (moving one out of the way would not help): the config's model or
  data is not the run's. Named before anything is written; config.json, what jip2p-export reads,
  stays the run's."""
  data = tmp_path / "triplets"
  script = os.path.join(os.path.dirname(sys.executable), "jip2p-import")
  subprocess.run([script, "synthetic", "--num=8", "--size=32", f"--out={data}"], check=True,
                 capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
  before = _listing(intact_run)
  cases = [  # (config argument, overrides, what the line says)
      ("steps=3,batch=8,init=random:tiny", [],
       "the checkpoints in {run}/checkpoints are of another model than this config's ("),
      (f"steps=3,batch=8,init={micro_folder}",
       ["--config.data.source=tfrecord", f"--config.data.path={data}"],
       "the checkpoints in {run} were written reading other data than this config's (a data "
       "position 2): resume with the config the run was started with ({run}/config.json"),
  ]
  for config_arg, overrides, says in cases:
    result = run_trainer(config_arg, intact_run, "--config.checkpoint.every_steps=1",
                         "--config.eval.every_steps=0", "--config.export.at_end=", *overrides,
                         cache_dir=compile_cache)
    _one_line_error(result.returncode, result.stderr, says.format(run=intact_run))
    assert _listing(intact_run) == before


def test_a_checkpoint_the_disk_refuses_is_one_line_and_a_rerun_finishes(
    intact_run, micro_folder, compile_cache, tmp_path):
  """orbax's failing background writes each printed a traceback (hundreds of lines, exit 1);
  now the one line names the step and the way out. Same config as `intact_run`: its compiled
  programs are cached, so no cache entry is written (their failures would warn)."""
  workdir = str(tmp_path / "run")
  command = train_command(f"steps=2,batch=8,init={micro_folder}", workdir,
                          "--config.checkpoint.every_steps=1", "--config.eval.every_steps=0",
                          "--config.export.at_end=")
  # A write past 16 KiB fails as on a full disk; orbax's background save meets it in its threads.
  result = subprocess.run(cli_errors.file_size_limited(command, 16 << 10),
                          env=trainer_env(8, compile_cache), capture_output=True, text=True,
                          timeout=600)
  _one_line_error(result.returncode, result.stderr,
                  f"jip2p-train: error: saving the checkpoint of step 1 under {workdir}/checkpoints "
                  "failed (", "File too large", "rerun the same command to start again")
  assert not glob.glob(f"{workdir}/checkpoints/[0-9]")  # only orbax's temporary folder
  result = run_trainer(f"steps=2,batch=8,init={micro_folder}", workdir,
                       "--config.checkpoint.every_steps=1", "--config.eval.every_steps=0",
                       "--config.export.at_end=", cache_dir=compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["1", "2"]


def test_export_errors_are_one_line_and_write_nothing(corrupt_run, tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("")
  out = tmp_path / "out"
  cases = [
      ([f"--workdir={tmp_path}/missing"], f"the work directory {tmp_path}/missing does not exist"),
      ([f"--workdir={blocker}"], f"the work directory {blocker} is not a folder"),
      ([f"--workdir={tmp_path}"], f"{tmp_path}/config.json does not exist"),
      ([f"--workdir={corrupt_run}", "--step=7"], "no checkpoint for step 7"),
      ([f"--workdir={corrupt_run}", "--step=2", "--weights=raw"],
       "the checkpoint of step 2 cannot be read"),
  ]
  for args, needle in cases:
    code = export_cli.main([*args, f"--out={out}"])
    _one_line_error(code, capsys.readouterr().err.replace(
        "WARNING:absl:Given directory is read only", "").strip(), needle)
  code = export_cli.main([f"--workdir={corrupt_run}", f"--out={blocker}/model"])
  _one_line_error(code, capsys.readouterr().err, f"{blocker} is a file, not a folder")
  assert sorted(os.listdir(tmp_path)) == ["file"]
  assert export_cli.main([f"--workdir={corrupt_run}", f"--out={out}", "--step=1"]) == 0
  assert (out / "model_index.json").is_file()
