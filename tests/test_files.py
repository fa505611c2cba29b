"""jip2p.files: the user's text files read with one named error, output folders checked before
work, files replaced whole. The tests run as root, for whom chmod does not make a folder
unwritable: an output under a regular file stands for every folder that cannot be written."""

import os

import numpy as np
import pytest
from PIL import Image

from jip2p import files
from jip2p.errors import InputError, OutputError


def test_read_lines_splits_at_line_feeds_only(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes('{"a": "x\u2028y"}\r\n\n{"b": 1}\n'.encode())
  assert files.read_lines(str(path), "prompts file") == ['{"a": "x\u2028y"}\r', "", '{"b": 1}']
  path.write_bytes(b"")
  assert files.read_lines(str(path), "prompts file") == []


@pytest.mark.parametrize("make,words", [
    (lambda p: None, "cannot read the prompts file (No such file or directory)"),
    (lambda p: p.mkdir(), "cannot read the prompts file (Is a directory)"),
    (lambda p: p.write_bytes(b'{"ok": 1}\n{"caf\xe9": 2}\n'),
     "the prompts file is not UTF-8 text (byte 0xe9 on line 2)"),
])
def test_unreadable_text_is_named(tmp_path, make, words):
  path = tmp_path / "p.jsonl"
  make(path)
  with pytest.raises(InputError) as e:
    files.read_text(str(path), "prompts file")
  assert str(e.value) == f"{path}: {words}"


def test_output_dir_checks_create_nothing(tmp_path):
  regular = tmp_path / "a_file"
  regular.write_text("x")
  files.check_output_dir(str(tmp_path / "new" / "deeper"))
  files.check_output_dir(str(tmp_path))
  files.check_output_dir("gs://bucket/never/checked")
  with pytest.raises(OutputError, match=f"the output folder {regular} is not a folder"):
    files.check_output_dir(str(regular))
  with pytest.raises(OutputError, match=f"cannot create the cache folder {regular}/x/y: "
                                        f"{regular} is not a folder"):
    files.check_output_dir(str(regular / "x" / "y"), "cache folder")
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_replacing_keeps_the_old_file_when_writing_fails(tmp_path):
  path = tmp_path / "summary.csv"
  path.write_text("old")
  with pytest.raises(RuntimeError):
    with files.replacing(str(path)) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.csv"]
  with files.replacing(str(path)) as tmp:
    with open(tmp, "w") as f:
      f.write("new")
  assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.csv"]


def test_replacing_names_a_write_that_fails(tmp_path):
  (tmp_path / "a_file").write_text("x")
  target = tmp_path / "a_file" / "image.png"
  with pytest.raises(OutputError, match=f"cannot write {target}: Not a directory"):
    files.save_png(np.zeros((4, 4, 3), np.uint8), str(target))
  assert os.listdir(tmp_path) == ["a_file"]


def test_save_png_writes_the_pixels_and_text(tmp_path):
  pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  files.save_png(pixels, str(tmp_path / "x.png"), {"seed": "3"})
  with Image.open(tmp_path / "x.png") as image:
    assert image.format == "PNG" and image.text == {"seed": "3"}
    np.testing.assert_array_equal(np.asarray(image), pixels)
  assert os.listdir(tmp_path) == ["x.png"]
