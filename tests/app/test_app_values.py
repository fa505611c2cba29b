"""The web editor's values and examples without a browser: randomized seed and guidance as the
original app draws them, the checks on typed values, the examples, and ``jip2p-app``'s errors."""

import os
import random
import socket

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from jip2p import app as web
from jip2p import checkpoints, edit, runtime
from jip2p.cli import app as app_cli
from jip2p.demo_run import PRETRAINED
from jip2p.errors import CheckpointError
from tests.test_edit import nan_weights


def test_fixed_values_pass_through():
  values = web.choose_values(42, 7.5, 1.5, 20, False, False, random.Random(0))
  assert values == web.Values(42, 7.5, 1.5, 20)
  assert values.describe(3, (512, 384)) == ("Turn 3: seed 42 · s_T 7.5 · s_I 1.5 · 20 steps · "
                                            "512×384")


def test_randomized_values_follow_the_original_app():
  rng = random.Random(1)
  drawn = [web.choose_values(42, 7.5, 1.5, 20, True, True, rng) for _ in range(300)]
  seeds = {v.seed for v in drawn}
  assert len(seeds) > 250 and all(0 <= s <= web.MAX_RANDOM_SEED for s in seeds)
  text = np.array([v.text_guidance for v in drawn])
  image = np.array([v.image_guidance for v in drawn])
  assert text.min() >= 6.0 and text.max() <= 9.0 and image.min() >= 1.2 and image.max() <= 1.8
  assert text.max() - text.min() > 2.5 and image.max() - image.min() > 0.5  # spread over U(a, b)
  np.testing.assert_array_equal(text, np.round(text, 2))  # rounded to 2 decimals
  only_seed = web.choose_values(42, 7.5, 1.5, 20, True, False, rng)
  assert (only_seed.text_guidance, only_seed.image_guidance) == (7.5, 1.5)


@pytest.mark.parametrize("seed,steps,text,match", [
    (-1, 20, 7.5, "seed must be a whole number"), (1.5, 20, 7.5, "seed must be a whole number"),
    (None, 20, 7.5, "seed must be"), (1, 0, 7.5, "Steps must be"),
    (1, 20, float("nan"), "Text guidance must be a number")])
def test_bad_values_are_refused_with_a_message(seed, steps, text, match):
  with pytest.raises(gr.Error, match=match):
    web.choose_values(seed, text, 1.5, steps, False, False, random.Random(0))


def test_examples_are_photos_then_world_scenes(tmp_path):
  examples = web.write_examples(str(tmp_path))
  assert len(examples) == len(web.PHOTOS) + web.WORLD_SCENES
  assert examples[1][1] == "turn the cat into a tiger"
  for path, instruction in examples:
    with Image.open(path) as image:
      assert image.mode == "RGB" and min(image.size) >= 256 and instruction
  with Image.open(examples[-1][0]) as scene:
    assert scene.size == (256, 256)


def test_cli_reports_problems_in_one_line(tmp_path, capsys):
  # The size rule is the model's: the shipped world model steps by 4 px (codec 1 × 2 ** 2).
  assert app_cli.main(["--model", PRETRAINED, "--resolution", "30"]) == 2
  err = capsys.readouterr().err
  assert err.splitlines() == ["jip2p-app: error: --resolution must be a multiple of 4 (this "
                              "model's size step: VAE downscale × UNet downsampling), got 30"]
  assert app_cli.main(["--model", str(tmp_path), "--resolution", "32"]) == 2
  assert "not a diffusers pipeline folder" in capsys.readouterr().err
  assert app_cli.main(["--model", str(tmp_path / "missing")]) == 2
  assert "jip2p-app: error:" in capsys.readouterr().err


def test_cli_refuses_an_address_in_use_before_loading_the_model(tmp_path, capsys):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert app_cli.main(["--model", str(tmp_path / "missing"), "--port", str(port)]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "Traceback" not in err, err
  assert f"jip2p-app: error: cannot listen on 127.0.0.1:{port}" in err and "--port" in err
  assert app_cli.main(["--model", str(tmp_path), "--host", "no-such-host.invalid"]) == 2
  assert "cannot listen on no-such-host.invalid:7860" in capsys.readouterr().err
  assert app_cli.main(["--model", str(tmp_path), "--port", "70000"]) == 2
  assert "--port must be ≤ 65535" in capsys.readouterr().err


def test_cli_serves_the_shipped_model_at_its_own_size(monkeypatch, capsys):
  """No --model: the world editor in data/synthetic-ip2p, at its 32 px unless told a multiple of
  its step; the model loader gets that folder (stopped there: no server, no browser)."""
  args = app_cli.parse_args([])
  assert args.model == PRETRAINED and args.resolution is None
  assert PRETRAINED.endswith(os.path.join("data", "synthetic-ip2p"))
  assert os.path.isfile(os.path.join(PRETRAINED, "model_index.json"))
  assert app_cli.resolution(PRETRAINED, None) == 32  # its own size
  assert app_cli.resolution(PRETRAINED, 32) == 32 and app_cli.resolution(PRETRAINED, 48) == 48
  loaded = []

  def loader(path, **kwargs):
    loaded.append(path)
    raise CheckpointError("stop here")

  monkeypatch.setattr(edit.Editor, "from_pretrained", loader)
  assert app_cli.main([]) == 2 and loaded == [PRETRAINED]
  assert app_cli.main(["--resolution", "32"]) == 2 and loaded == [PRETRAINED] * 2
  assert "stop here" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    app_cli.parse_args(["--help"])
  assert "data/synthetic-ip2p" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  return checkpoints.create_random_pipeline(str(tmp_path_factory.mktemp("model") / "m"), "tiny")


def test_an_animated_upload_and_a_long_instruction_show_warnings(tiny_folder, tmp_path,
                                                                 monkeypatch):
  shown = []
  monkeypatch.setattr(gr, "Warning", shown.append)
  frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (40, 200)]
  frames[0].save(tmp_path / "blink.gif", save_all=True, append_images=frames[1:])
  editor = edit.Editor.from_pretrained(tiny_folder)
  result = web.edit_one(editor, str(tmp_path / "blink.gif"), "make it " + "very " * 80 + "red",
                        web.Values(1, 7.5, 1.5, 1), 64)
  assert result.size == (64, 64) and len(shown) == 2, shown
  assert "an animated image of 2 frames; editing its first frame" in shown[0]
  assert "the text encoder reads the first 75" in shown[1]


def test_a_model_giving_nan_shows_a_message_naming_the_stage(tiny_folder, tmp_path):
  pipeline = checkpoints.load_pipeline(tiny_folder)
  nan_weights(pipeline.vae.decoder)
  Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "grey.png")
  with pytest.raises(gr.Error, match="the VAE decoder produced NaN or inf"):
    web.edit_one(edit.Editor(pipeline), str(tmp_path / "grey.png"), "x",
                 web.Values(1, 7.5, 1.5, 1), 64)


def test_cli_keeps_programs_on_disk_and_buckets_uploads(monkeypatch, capsys):
  """The persistent compilation cache is on before the model loads, and uploads are bucketed
  into 2 · 4 − 1 shapes unless --size-buckets 0 asks for the reference's rule."""
  events = []
  monkeypatch.setattr(runtime, "configure", lambda **kwargs: events.append("cache"))

  def loader(path, **kwargs):
    events.append("load")
    raise CheckpointError("stop here")

  monkeypatch.setattr(edit.Editor, "from_pretrained", loader)
  assert app_cli.main([]) == 2 and events == ["cache", "load"]
  assert app_cli.parse_args([]).size_buckets == web.SIZE_BUCKETS == 4
  assert app_cli.main(["--size-buckets", "-1"]) == 2
  assert "--size-buckets must be ≥ 0, got -1" in capsys.readouterr().err


def test_an_sdxl_model_edits_in_the_app(tmp_path):
  """jip2p-app edits through the Editor, so an SDXL folder edits there too (the Editor's parity
  with diffusers' SDXL pipeline is tests/test_edit_sdxl.py's)."""
  folder = checkpoints.create_random_pipeline(str(tmp_path / "sdxl"), "tiny-sdxl")
  editor = edit.Editor.from_pretrained(folder)
  Image.fromarray(skdata.rocket()).save(tmp_path / "photo.png")
  result = web.edit_one(editor, str(tmp_path / "photo.png"), "make it night",
                         web.Values(3, 7.5, 1.5, 2), 64)
  assert editor.sdxl and result.size == (64, 64)
  [direct] = editor([edit.load_image(tmp_path / "photo.png")], "make it night", steps=2,
                    seed=3, resolution=64, size_buckets=web.SIZE_BUCKETS)
  np.testing.assert_array_equal(np.asarray(result), np.asarray(direct))
