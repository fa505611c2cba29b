"""jip2p-convert on bad input: one named line, exit 2, no traceback, nothing half-written.

Most cases run the console script's `main` in this process (each spawn of a torch + JAX process
costs seconds); `convert_single_file` checks that the child's named line comes back to the parent.
The tests run as root, for whom chmod does not make a folder read-only: an unwritable output is a
path under a regular file, and a full disk is an OSError raised while the weights are written.
"""

import errno
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from jip2p import checkpoints
from jip2p.checkpoints import folders
from jip2p.cli import convert as convert_cli
from jip2p.errors import CheckpointError
from tests import cli_errors
from tests.checkpoints.test_open_clip_text import tiny_config, write_model
from tests.checkpoints.test_convert import ldm_state


def named_error(capsys, code: int) -> str:
  return cli_errors.named_error(capsys.readouterr().err, code, "jip2p-convert")


def listing(folder):
  return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def state():
  return ldm_state()[0]


def _save_ckpt(obj):
  return lambda path: torch.save(obj, path)


def _truncated_safetensors(path):
  save_file({"model.diffusion_model.x": torch.zeros(64, 64)}, str(path))
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _truncated_ckpt(path):
  torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(64, 64)}}, path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


UNREADABLE = {
    # name: (file name, how to make it, what the line must say)
    "empty safetensors": ("a.safetensors", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "random safetensors": ("a.safetensors", lambda p: p.write_bytes(os.urandom(4096)),
                           "is not a readable .safetensors file"),
    "truncated safetensors": ("a.safetensors", _truncated_safetensors,
                              "is not a readable .safetensors file"),
    "empty ckpt": ("a.ckpt", lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "random ckpt": ("a.ckpt", lambda p: p.write_bytes(os.urandom(4096)),
                    "is not a readable PyTorch checkpoint"),
    "truncated ckpt": ("a.ckpt", _truncated_ckpt, "is not a readable PyTorch checkpoint"),
    "list pickle": ("a.ckpt", _save_ckpt([torch.zeros(2)]), "holds a list, not a dict"),
    "tensor pickle": ("a.ckpt", _save_ckpt(torch.zeros(2)), "holds a Tensor, not a dict"),
    "state_dict not a dict": ("a.ckpt", _save_ckpt({"state_dict": [1, 2]}),
                              "it has no UNet weights"),
    "wrong extension": ("a.txt", lambda p: p.write_text("weights"), "not a single-file checkpoint"),
    "a folder": ("a.ckpt", lambda p: p.mkdir(), "is a folder"),
    "missing": ("a.ckpt", lambda p: None, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_source_is_named(case, tmp_path, capsys):
  name, make, says = UNREADABLE[case]
  src = tmp_path / name
  make(src)
  before = listing(tmp_path)
  line = named_error(capsys, convert_cli.main([str(src), str(tmp_path / "out")]))
  assert str(src) in line and says in line
  # torch's own advice would be to unpickle code: never passed on.
  assert "weights_only" not in line and "likely succeed" not in line
  assert listing(tmp_path) == before  # no output, no temporary folder


def _without(prefix):
  return lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)}


INCOMPLETE = {
    "no UNet": (_without("model.diffusion_model."), "it has no UNet weights"),
    "no VAE": (_without("first_stage_model."), "it has no VAE weights"),
    "no text encoder": (_without("cond_stage_model."), "it has no text encoder weights"),
    "no conv_in": (_without("model.diffusion_model.input_blocks.0.0.weight"),
                   "the weight 'model.diffusion_model.input_blocks.0.0.weight' is missing"),
    "one attention": (_without("model.diffusion_model.middle_block.1.proj_in"),
                      "mid_block.attentions.0.proj_in.bias"),
}


@pytest.mark.parametrize("case", sorted(INCOMPLETE))
def test_checkpoint_missing_weights_is_named(case, state, tmp_path, capsys):
  drop, says = INCOMPLETE[case]
  src = tmp_path / "sd.safetensors"
  save_file({k: v.contiguous() for k, v in drop(state).items()}, str(src))
  code = convert_cli.main([str(src), str(tmp_path / "out"), "--preset", "tiny"])
  line = named_error(capsys, code)
  assert says in line
  assert listing(tmp_path) == ["sd.safetensors"]


@pytest.fixture()
def good_file(state, tmp_path):
  src = tmp_path / "sd.safetensors"
  save_file({k: v.contiguous() for k, v in state.items()}, str(src))
  return src


def test_unusable_output_folder_is_named_before_the_file_is_read(good_file, tmp_path, capsys,
                                                                 monkeypatch):
  def never_read(path):
    raise AssertionError("the checkpoint was read before the output folder was checked")

  monkeypatch.setattr(checkpoints.convert, "read_single_file", never_read)
  a_file = tmp_path / "a_file"
  a_file.write_text("not a folder")
  other = tmp_path / "photos"
  other.mkdir()
  (other / "holiday.jpg").write_bytes(b"jpeg")
  cases = [  # (dst, extra args, what the line says)
      (a_file, [], "exists and is a file, not a folder"),
      # Root writes through chmod: a parent that is a regular file stands in for a read-only one.
      (a_file / "model", [], f"{a_file} is a file, not a folder"),
      (other, [], "exists; pass overwrite=True (--overwrite)"),
      (other, ["--overwrite"], "holds files but no model_index.json"),
  ]
  for dst, extra, says in cases:
    line = named_error(capsys, convert_cli.main([str(good_file), str(dst), *extra]))
    assert says in line, (dst, extra, line)
  assert a_file.read_text() == "not a folder"
  assert listing(other) == ["holiday.jpg"]
  assert listing(tmp_path) == ["a_file", "photos", "sd.safetensors"]
  line = named_error(capsys, convert_cli.main([str(good_file), str(tmp_path / "m"),
                                               "--expand-conv-in", "0"]))
  assert "--expand-conv-in=0" in line


def test_full_disk_leaves_nothing_and_a_rerun_finishes(good_file, tmp_path, capsys, monkeypatch):
  real_save = folders.save_component

  def disk_fills_at_the_vae(model, folder, **kwargs):
    if folder.endswith("vae"):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), folder)
    real_save(model, folder, **kwargs)

  monkeypatch.setattr(folders, "save_component", disk_fills_at_the_vae)
  dst = tmp_path / "model"
  args = [str(good_file), str(dst), "--preset", "tiny"]
  line = named_error(capsys, convert_cli.main(args))
  assert f"cannot write {dst}: No space left on device" in line
  assert listing(tmp_path) == ["sd.safetensors"]  # neither dst nor its temporary sibling
  monkeypatch.setattr(folders, "save_component", real_save)
  assert convert_cli.main(args) == 0
  assert checkpoints.load_pipeline(str(dst)).unet.config.in_channels == 8


def test_child_errors_reach_the_parent_as_the_same_line(tmp_path, capsys, monkeypatch):
  src = tmp_path / "weights.ckpt"
  torch.save([torch.zeros(2)], src)
  with pytest.raises(CheckpointError) as caught:
    checkpoints.convert_single_file(str(src), str(tmp_path / "out"))
  child = named_error(capsys, convert_cli.main([str(src), str(tmp_path / "out")]))
  assert child == f"jip2p-convert: error: {caught.value}"
  assert "\n" not in str(caught.value)

  def no_child(*args, **kwargs):
    raise AssertionError("a child was started for paths the parent can check")

  monkeypatch.setattr(checkpoints.convert.subprocess, "run", no_child)
  (tmp_path / "empty.safetensors").write_bytes(b"")
  with pytest.raises(CheckpointError, match="is empty"):
    checkpoints.convert_single_file(str(tmp_path / "empty.safetensors"), str(tmp_path / "out"))
  with pytest.raises(CheckpointError, match="is a file, not a folder"):
    checkpoints.convert_single_file(str(src), str(src / "out"))
  assert listing(tmp_path) == ["empty.safetensors", "weights.ckpt"]


@pytest.mark.parametrize("open_clip", [False, True], ids=["pipeline", "open-clip text"])
def test_weights_the_file_system_refuses_are_named_and_leave_nothing(good_file, tmp_path,
                                                                    open_clip):
  if open_clip:  # 6 MiB of token embeddings (safetensors' write error was a traceback, exit 1)
    _, weights, config = write_model(tmp_path, tiny_config())
    args = ["--open-clip-config", config, weights]
  else:
    args = [str(good_file), "--preset", "tiny"]
  before = listing(tmp_path)
  script = os.path.join(os.path.dirname(sys.executable), "jip2p-convert")
  # A write past 1 MiB fails as on a full disk, inside safetensors' own writer.
  done = subprocess.run(cli_errors.file_size_limited([script, *args, str(tmp_path / "out")],
                                                     1 << 20),
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  line = cli_errors.named_error(done.stderr, done.returncode, "jip2p-convert")
  assert line == f"jip2p-convert: error: cannot write {tmp_path / 'out'}: File too large"
  assert listing(tmp_path) == before  # neither out nor its temporary sibling


def test_an_open_clip_folder_replaced_where_nothing_can_be_written(tmp_path, capsys, monkeypatch):
  _, weights, config = write_model(tmp_path, tiny_config())
  dst = tmp_path / "text"
  assert convert_cli.main(["--open-clip-config", config, weights, str(dst)]) == 0
  real_access = os.access
  monkeypatch.setattr(convert_cli.os, "access",  # root writes through chmod: as if read-only
                      lambda path, mode: path != str(tmp_path) and real_access(path, mode))
  monkeypatch.setattr(checkpoints.convert, "convert_open_clip_text",
                      lambda *a: pytest.fail("converted before the output was checked"))
  line = named_error(capsys, convert_cli.main(["--open-clip-config", config, weights, str(dst),
                                               "--overwrite"]))
  assert f"cannot replace {dst}: the folder it is in is not writable" in line
  assert listing(dst) == ["text_encoder", "tokenizer"]
