"""``jip2p-edit`` end to end on scikit-image's photos, and every refusal: exit status 2, the
culprit named, nothing written. Uses torch (to build the model folder), never TensorFlow."""

import errno
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from jip2p import checkpoints, edit
from jip2p.cli.edit import main
from tests.cli_errors import named_error
from tests.reference import save_torch_pipeline
from tests.test_edit import bad_files, nan_weights

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = {"astronaut": skdata.astronaut, "chelsea": skdata.chelsea, "coffee": skdata.coffee,
          "rocket": skdata.rocket}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return save_torch_pipeline(str(tmp_path_factory.mktemp("model") / "pipe"), "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """The four photos as files: two PNGs and two JPEGs."""
  folder = tmp_path_factory.mktemp("photos")
  for i, (name, load) in enumerate(PHOTOS.items()):
    Image.fromarray(load()).save(folder / f"{name}.{'png' if i % 2 else 'jpg'}")
  (folder / "README.txt").write_text("not an image, and not listed: folders yield image files\n")
  return folder


def test_edits_a_folder_of_photos(model, photos, tmp_path):
  out = tmp_path / "edits"
  cmd = [sys.executable, "-m", "jip2p.cli.edit", "--model", model, "--input", str(photos),
         "--instruction", "make it look like winter", "--output", str(out), "--steps", "2",
         "--resolution", "64", "--batch-size", "3", "--text-guidance", "5", "--image-guidance",
         "1.25"]
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stderr
  seed = int(re.search(r"seed (\d+)", result.stdout).group(1))
  assert "4/4" in result.stderr  # the progress bar
  assert sorted(os.listdir(out)) == sorted(f"{name}.png" for name in PHOTOS)
  for j, name in enumerate(sorted(PHOTOS)):  # the folder is read in sorted order
    with Image.open(out / f"{name}.png") as image:
      meta = dict(image.text)
      pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 1
    assert meta["instruction"] == "make it look like winter"
    assert int(meta["seed"]) == seed + j
    assert float(meta["text_guidance"]) == 5 and float(meta["image_guidance"]) == 1.25
    assert meta["steps"] == "2" and meta["sampler"] == "euler_ancestral"
    assert meta["model"] == os.path.abspath(model)
  # A second run refuses to overwrite, and leaves the edits as they were.
  before = {f: (out / f).read_bytes() for f in os.listdir(out)}
  assert main(cmd[3:]) == 2
  assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_jsonl_pairs_and_empty_instructions(model, photos, tmp_path, capsys):
  """Image paths relative to the JSONL file; an empty instruction writes the resized input;
  repeated stems get the edit's index; --overwrite replaces."""
  lines = [{"image": "photos/chelsea.png", "instruction": ""},
           {"image": "photos/chelsea.png", "instruction": ""},
           {"image": str(photos / "astronaut.jpg"), "instruction": ""}]
  os.symlink(photos, tmp_path / "photos")
  jsonl = tmp_path / "edits.jsonl"
  jsonl.write_text("\n".join(json.dumps(l) for l in lines) + "\n\n")
  out = tmp_path / "out"
  args = ["--model", model, "--jsonl", str(jsonl), "--output", str(out), "--resolution", "128",
          "--seed", "7"]
  assert main(args) == 0
  assert sorted(os.listdir(out)) == ["astronaut.png", "chelsea-0.png", "chelsea-1.png"]
  chelsea = edit.preprocess(edit.load_image(photos / "chelsea.png"), 128)
  with Image.open(out / "chelsea-1.png") as image:
    np.testing.assert_array_equal(np.asarray(image), np.asarray(chelsea))
    assert image.text["seed"] == "8" and image.text["instruction"] == ""
  assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
  assert main(args + ["--overwrite"]) == 0


def test_sdedit_with_a_text_to_image_model(model, photos, tmp_path, capsys):
  """--method sdedit: the Editor's SDEdit with the same seed, its settings in the PNG; each
  method refuses the other's model, and a strength outside (0, 1] is refused before loading."""
  t2i = save_torch_pipeline(str(tmp_path / "t2i"), "tiny", unet_in_channels=4)
  out = tmp_path / "sdedit.png"
  args = ["--model", t2i, "--input", str(photos / "chelsea.png"), "--instruction",
          "a photo of a tiger", "--output", str(out), "--steps", "4", "--resolution", "64",
          "--seed", "3", "--method", "sdedit", "--strength", "0.5", "--sampler", "ddim"]
  assert main(args) == 0
  with Image.open(out) as image:
    meta, pixels = dict(image.text), np.asarray(image.convert("RGB"))
  assert meta["method"] == "sdedit" and meta["strength"] == "0.5"
  [expected] = edit.Editor.from_pretrained(t2i)(
      [photos / "chelsea.png"], "a photo of a tiger", method="sdedit", strength=0.5, steps=4,
      resolution=64, seed=3, sampler="ddim")
  assert np.abs(pixels.astype(int) - np.asarray(expected).astype(int)).max() <= 1
  for extra, model_dir, message in (
      (["--method", "sdedit"], model, "SDEdit needs a text-to-image model"),
      ([], t2i, "edit with it by SDEdit"),
      (["--method", "sdedit", "--strength", "0"], str(tmp_path / "missing"),
       "strength must be in (0, 1]")):
    code, err = run_cli(["--model", model_dir, "--input", str(photos / "chelsea.png"),
                         "--instruction", "x", "--output", str(tmp_path / "no.png"), "--steps",
                         "2", "--resolution", "64", *extra], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "no.png").exists()


def run_cli(args, capsys):
  code = main(args)
  return code, capsys.readouterr().err


def test_each_bad_image_is_named_and_nothing_is_written(model, photos, tmp_path, capsys):
  out = tmp_path / "out"
  bad = tmp_path / "bad"
  bad.mkdir()
  for what, (path, words) in bad_files(bad).items():
    code, err = run_cli(["--model", model, "--input", str(photos / "astronaut.jpg"), str(path),
                         "--instruction", "x", "--output", str(out), "--steps", "2"], capsys)
    assert code == 2, what
    assert err.startswith("jip2p-edit: error: ") and str(path) in err and words in err, (what, err)
    assert "Traceback" not in err and not out.exists(), what


@pytest.fixture
def no_model(monkeypatch):
  """Fails the test if the model is loaded: the refusals under test come before it."""
  def load(*args, **kwargs):
    raise AssertionError("the model was loaded")
  monkeypatch.setattr(edit.Editor, "from_pretrained", load)


def test_every_bad_file_in_a_folder_is_named_and_none_is_edited(model, photos, tmp_path, capsys,
                                                                no_model):
  folder = tmp_path / "mixed"
  folder.mkdir()
  Image.fromarray(skdata.coffee()).save(folder / "a_good.png")
  (folder / "b_truncated.jpg").write_bytes((photos / "astronaut.jpg").read_bytes()[:3000])
  (folder / "c_text.png").write_text("not an image\n")
  Image.fromarray(skdata.rocket()).save(folder / "d_good.png")
  out = tmp_path / "out"
  code, err = run_cli(["--model", model, "--input", str(folder), "--instruction", "x",
                       "--output", str(out)], capsys)
  assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
  assert "2 of 4 images cannot be used, nothing was edited" in err
  assert f"{folder / 'b_truncated.jpg'}: not a readable image" in err
  assert f"{folder / 'c_text.png'}: not a readable image" in err
  assert not out.exists()


def test_every_bad_jsonl_line_is_named(model, tmp_path, capsys, no_model):
  Image.fromarray(skdata.rocket()).save(tmp_path / "photo.png")
  jsonl = tmp_path / "edits.jsonl"
  jsonl.write_text('{"image": "photo.png", "instruction": 5}\n'
                   '{"image": "photo.png", "instruction": "fine"}\n{"image": "photo.png"\n')
  code, err = run_cli(["--model", model, "--jsonl", str(jsonl), "--output",
                       str(tmp_path / "out")], capsys)
  assert code == 2 and len(err.splitlines()) == 1 and "2 of 3 lines cannot be used" in err, err
  assert f"{jsonl}:1: the instruction must be text" in err and f"{jsonl}:3: not JSON" in err
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("output", ["{file}/edits", "{file}/deeper/edits", "{file}/one.png"])
def test_an_output_under_a_regular_file_is_refused_before_the_model_loads(
    model, photos, tmp_path, capsys, no_model, output):
  """Root ignores chmod, so the unwritable folder here is one whose parent is a regular file."""
  (tmp_path / "file").write_text("a regular file\n")
  output = output.format(file=tmp_path / "file")
  code, err = run_cli(["--model", model, "--input", str(photos / "rocket.png"), "--instruction",
                       "x", "--output", output], capsys)
  assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
  assert f"cannot be created: {tmp_path / 'file'} is a file, not a folder" in err
  assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_full_disk_leaves_whole_edits_and_a_rerun_finishes_the_run(model, photos, tmp_path,
                                                                     capsys, monkeypatch):
  """The full disk is injected in-process: the second PNG's write puts a few bytes down and then
  fails with ENOSPC, as a real full disk does (mounting a tmpfs needs privileges tests lack)."""
  real_save, saved = Image.Image.save, []

  def full_disk(self, fp, *args, **kwargs):
    saved.append(fp)
    if len(saved) == 2:
      with open(fp, "wb") as f:
        f.write(b"\x89PNG\r\n")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, fp, *args, **kwargs)

  out, whole = tmp_path / "out", tmp_path / "whole"
  args = ["--model", model, "--input", str(photos), "--instruction", "make it snowy", "--steps",
          "1", "--resolution", "64", "--seed", "3"]
  monkeypatch.setattr(Image.Image, "save", full_disk)
  code, err = run_cli(args + ["--output", str(out)], capsys)
  monkeypatch.setattr(Image.Image, "save", real_save)
  assert code == 2 and "Traceback" not in err, err
  [line] = [l for l in err.splitlines() if "error" in l]
  assert f"cannot write {out / 'chelsea.png'}: No space left on device" in line
  assert "1 of 4 edits are written" in line and "--skip-existing --seed 3" in line
  assert os.listdir(out) == ["astronaut.png"]  # whole, and no temporary file left
  first = (out / "astronaut.png").read_bytes()

  assert main(args + ["--output", str(out)]) == 2  # refuses the existing edit by default
  assert "--skip-existing" in capsys.readouterr().err
  assert main(args + ["--output", str(out), "--skip-existing"]) == 0
  assert main(args + ["--output", str(whole)]) == 0  # the same run, uninterrupted
  assert sorted(os.listdir(out)) == sorted(os.listdir(whole)) == sorted(
      f"{name}.png" for name in PHOTOS)
  assert (out / "astronaut.png").read_bytes() == first
  for name in os.listdir(whole):
    with Image.open(out / name) as a, Image.open(whole / name) as b:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert main(args + ["--output", str(out), "--skip-existing"]) == 0
  assert "all 4 edits exist" in capsys.readouterr().out


def test_a_model_with_nan_weights_stops_naming_the_unet(model, photos, tmp_path, capsys):
  pipeline = checkpoints.load_pipeline(model)
  nan_weights(pipeline.unet)
  broken = str(tmp_path / "nan-model")
  checkpoints.save_pipeline(pipeline, broken)
  out = tmp_path / "out"
  code, err = run_cli(["--model", broken, "--input", str(photos / "rocket.png"),
                       "--instruction", "x", "--output", str(out), "--steps", "1",
                       "--resolution", "64"], capsys)
  assert code == 2 and "Traceback" not in err, err
  assert f"{broken}: the UNet/sampler produced NaN or inf (editing {photos / 'rocket.png'})" in err
  assert not out.exists()


def test_cut_instructions_and_animated_images_warn_once_each(model, photos, tmp_path, capsys):
  frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (40, 200)]
  frames[0].save(tmp_path / "blink.gif", save_all=True, append_images=frames[1:])
  long = "make it " + "very " * 80 + "snowy"
  code, err = run_cli(["--model", model, "--input", str(tmp_path / "blink.gif"),
                       str(photos / "rocket.png"), "--instruction", long, "--output",
                       str(tmp_path / "out"), "--steps", "1", "--resolution", "64"], capsys)
  assert code == 0 and "Traceback" not in err, err
  warned = [l for l in err.splitlines() if l.startswith("jip2p-edit: warning: ")]
  assert len(warned) == 2, err
  assert warned[0].endswith(f"{tmp_path / 'blink.gif'}: an animated image of 2 frames; editing "
                            "its first frame")
  assert "the text encoder reads the first 75, the rest is ignored" in warned[1]
  assert sorted(os.listdir(tmp_path / "out")) == ["blink.png", "rocket.png"]


@pytest.mark.parametrize("line,words", [
    ('{"image": "photo.png", "instruction": 5}', "instruction must be text"),
    ('{"image": "photo.png", "instruction": null}', "instruction must be text"),
    ('{"image": "photo.png", "instruction": ["a"]}', "instruction must be text"),
    ('{"image": "photo.png"}', '"instruction"'),
    ('{"image": "photo.png", "instruction": "x"', "not JSON"),
    ('["photo.png", "x"]', '"image" and "instruction"'),
])
def test_bad_jsonl_lines_are_named(model, tmp_path, capsys, line, words):
  Image.fromarray(skdata.rocket()).save(tmp_path / "photo.png")
  jsonl = tmp_path / "edits.jsonl"
  jsonl.write_text('{"image": "photo.png", "instruction": "fine"}\n' + line + "\n")
  out = tmp_path / "out"
  code, err = run_cli(["--model", model, "--jsonl", str(jsonl), "--output", str(out)], capsys)
  assert code == 2 and f"{jsonl}:2" in err and words in err and not out.exists(), err


def test_text_to_image_model_folder_is_refused(photos, tmp_path, capsys):
  model = save_torch_pipeline(str(tmp_path / "sd"), "tiny", unet_in_channels=4)
  out = tmp_path / "out"
  code, err = run_cli(["--model", model, "--input", str(photos / "rocket.png"), "--instruction",
                       "x", "--output", str(out / "rocket.png")], capsys)
  assert code == 2 and "expand_conv_in" in err and "not an InstructPix2Pix model" in err
  assert not out.exists()


@pytest.mark.parametrize("extra,words", [
    (["--output", "{tmp}/one.png"], "one file but there are 4 edits"),
    (["--output", "{tmp}/edit.jpg"], "written as PNG"),
    (["--output", "{tmp}/out", "--steps", "0"], "--steps must be ≥ 1"),
    (["--output", "{tmp}/out", "--resolution", "32"], "--resolution must be a multiple of 64"),
    (["--output", "{tmp}/out", "--seed", str(2 ** 32 - 2)], "--seed must be in"),
    (["--output", "{tmp}/out", "--model", "{tmp}/nowhere"], "nowhere"),
])
def test_bad_settings_are_named(model, photos, tmp_path, capsys, extra, words):
  args = ["--model", model, "--input", str(photos), "--instruction", "x"]
  args += [a.format(tmp=tmp_path) for a in extra]
  code, err = run_cli(args, capsys)
  assert code == 2 and words in err, err
  assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def _other_vae(model, folder):
  """Another random VAE of ``model``'s VAE's shape, saved alone in ``folder`` (a VAE folder,
  force_upcast false as the fp16-fix VAE ships)."""
  import diffusers
  import torch
  config = {k: v for k, v in json.load(open(os.path.join(model, "vae", "config.json"))).items()
            if not k.startswith("_")}
  torch.manual_seed(11)
  diffusers.AutoencoderKL(**{**config, "force_upcast": False}).save_pretrained(folder)
  return folder


def test_vae_option_edits_with_that_vae(model, photos, tmp_path, capsys):
  """--vae DIR edits as the model folder with DIR in its vae/ would, not as the model's own."""
  import shutil
  vae = _other_vae(model, str(tmp_path / "vae"))
  swapped = tmp_path / "swapped"
  shutil.copytree(model, swapped)
  shutil.rmtree(swapped / "vae")
  shutil.copytree(vae, swapped / "vae")
  outputs = {}
  for name, args in (("own", ["--model", model]), ("option", ["--model", model, "--vae", vae]),
                     ("swapped", ["--model", str(swapped)])):
    out = tmp_path / f"{name}.png"
    code, err = run_cli([*args, "--input", str(photos / "rocket.png"), "--instruction", "x",
                         "--output", str(out), "--steps", "2", "--resolution", "64", "--seed",
                         "0"], capsys)
    assert code == 0, err
    outputs[name] = np.asarray(Image.open(out).convert("RGB"))
  np.testing.assert_array_equal(outputs["option"], outputs["swapped"])
  assert not np.array_equal(outputs["option"], outputs["own"])


def test_vae_option_refuses_a_folder_that_is_not_a_vae(model, photos, tmp_path, capsys):
  out = tmp_path / "out.png"
  code, err = run_cli(["--model", model, "--vae", os.path.join(model, "unet"), "--input",
                       str(photos / "rocket.png"), "--instruction", "x", "--output", str(out)],
                      capsys)
  line = named_error(err, code, "jip2p-edit")
  assert "is not a VAE folder" in line and "UNet2DConditionModel" in line and not out.exists()


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
  return checkpoints.create_random_pipeline(str(tmp_path_factory.mktemp("sdxl") / "pipe"),
                                            "tiny-sdxl")


def test_sdxl_folder_edits_with_micro_conditioning(sdxl_model, photos, tmp_path, capsys):
  """An SDXL folder edits as the Editor does; the micro-conditioning options reach it and the
  PNG's metadata (the Editor's parity with diffusers is tests/test_edit_sdxl.py's)."""
  common = ["--model", sdxl_model, "--input", str(photos / "rocket.png"), "--instruction",
            "make it night", "--steps", "2", "--resolution", "128", "--seed", "3"]
  outputs = {}
  for name, extra in (("default", []), ("micro", ["--original-size", "400", "600",
                                                  "--crops-coords-top-left", "8", "4"])):
    out = tmp_path / f"{name}.png"
    code, err = run_cli([*common, *extra, "--output", str(out)], capsys)
    assert code == 0, err
    outputs[name] = Image.open(out)
  assert outputs["micro"].text["original_size"] == "400 600"
  assert outputs["micro"].text["crops_coords_top_left"] == "8 4"
  assert "original_size" not in outputs["default"].text
  rocket = Image.open(photos / "rocket.png")
  editor = edit.Editor.from_pretrained(sdxl_model)
  [want] = editor([rocket], "make it night", steps=2, resolution=128, seed=3)
  got = np.asarray(outputs["default"].convert("RGB"))
  np.testing.assert_array_equal(got, np.asarray(want))
  assert np.abs(got.astype(int) - np.asarray(outputs["micro"].convert("RGB"))).max() > 4


@pytest.mark.parametrize("extra,words", [
    (["--original-size", "512"], "--original-size must be (height, width): two integers ≥ 0, "
                                 "got [512]"),
    (["--target-size", "1", "2", "3"], "--target-size must be (height, width)"),
    (["--crops-coords-top-left", "0", "-8"], "--crops-coords-top-left must be (top, left)"),
])
def test_wrong_micro_conditioning_is_one_named_line(sdxl_model, photos, tmp_path, capsys, extra,
                                                    words):
  out = tmp_path / "out.png"
  code, err = run_cli(["--model", sdxl_model, "--input", str(photos / "rocket.png"),
                       "--instruction", "x", "--output", str(out), *extra], capsys)
  line = named_error(err, code, "jip2p-edit")
  assert words in line and not out.exists()


def test_micro_conditioning_of_an_sd_model_is_refused(model, photos, tmp_path, capsys):
  out = tmp_path / "out.png"
  code, err = run_cli(["--model", model, "--input", str(photos / "rocket.png"), "--instruction",
                       "x", "--output", str(out), "--target-size", "64", "64"], capsys)
  line = named_error(err, code, "jip2p-edit")
  assert "--target-size: micro-conditioning is for SDXL models" in line and not out.exists()
