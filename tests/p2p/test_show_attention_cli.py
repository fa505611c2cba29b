"""`jip2p-generate --show-attention PROMPT` through the console entry point, on a tiny random
(JAX-written) model folder: the per-token heat maps, and an empty prompt refused."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from jip2p.cli import generate as generate_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  from jip2p.checkpoints import create_random_pipeline
  folder = tmp_path_factory.mktemp("show_attention") / "sd"
  create_random_pipeline(str(folder), "tiny", unet_in_channels=4)
  return f"{ROOT}/configs/generate_tiny.py:model={folder},steps=2"


def test_show_attention_writes_a_heat_map_per_token(config, tmp_path, capsys):
  argv = ["--config", config, "--show-attention", "a red car", "--out", str(tmp_path)]
  assert generate_cli.main(argv) == 0
  out = tmp_path / "attention"
  assert f"wrote 7 images to {out}" in capsys.readouterr().out
  tokens = ["00_startoftext", "01_a", "02_red", "03_car", "04_endoftext"]
  assert sorted(p.stem for p in out.iterdir()) == sorted(["image", "attention", *tokens])
  heat = [np.asarray(Image.open(out / f"{t}.png"), np.int64) for t in tokens]
  assert all(h.shape == (32, 32, 3) for h in heat)  # the config's 32 px
  assert all(h.std() > 1 for h in heat)  # an image, not a flat colour
  assert max(np.abs(heat[0] - h).max() for h in heat[1:]) > 20  # tokens attend differently
  assert Image.open(out / "attention.png").size == (5 * 32, 32 + 14)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(config, tmp_path, capsys, prompt):
  argv = ["--config", config, "--show-attention", prompt, "--out", str(tmp_path)]
  assert generate_cli.main(argv) == 2
  assert "the prompt to show attention for is empty" in capsys.readouterr().err
  assert not (tmp_path / "attention").exists()


def test_an_output_under_a_regular_file_is_refused_before_generating(config, tmp_path, capsys):
  # As root, chmod does not make a folder unwritable: a regular file stands for one that is not.
  (tmp_path / "a_file").write_text("x")
  out = tmp_path / "a_file" / "maps"
  argv = ["--config", config, "--show-attention", "a red car", "--out", str(out)]
  assert generate_cli.main(argv) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == (f"jip2p-generate: error: cannot create the output "
                                          f"folder {out}/attention: {tmp_path}/a_file is not a "
                                          "folder")
  assert os.listdir(tmp_path) == ["a_file"]
