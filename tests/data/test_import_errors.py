"""jip2p-import on bad input: one named line, exit 2, no traceback, no dataset left half-written.

`jip2p-import`'s `main` runs in this process (the importers and the writer use TensorFlow). The
tests run as root, for whom chmod does not make a folder read-only: an unwritable output is a
path under a regular file, and a full disk is an OSError raised while a shard is written.
"""

import errno
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jip2p.cli import import_data
from jip2p.data import reader, writer
from tests import cli_errors
from tests.data.test_data_importers import (CLIP_FILTERED_SCHEMA, HF_IMAGE, clip_filtered_rows,
                                            hf_image, make_generator_folder, write_parquet)

pytestmark = pytest.mark.tf

SAMPLES_SCHEMA = pa.schema([("input_image", HF_IMAGE), ("edit_prompt", pa.string()),
                            ("edited_image", HF_IMAGE)])
MAGICBRUSH_SCHEMA = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()),
                               ("source_img", HF_IMAGE), ("instruction", pa.string()),
                               ("target_img", HF_IMAGE)])


def named_error(capsys, code: int) -> str:
  return cli_errors.named_error(capsys.readouterr().err, code, "jip2p-import")


def good_parquet(path, n=6):
  write_parquet(path, clip_filtered_rows(n_prompts=n, seeds=1), CLIP_FILTERED_SCHEMA)
  return path


def _truncated(path):
  data = good_parquet(path).read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _damaged_footer(path):
  data = good_parquet(path).read_bytes()
  path.write_bytes(data[:-12] + bytes(8) + data[-4:])  # footer length zeroed, magic kept


UNREADABLE = {
    "empty": lambda p: p.write_bytes(b""),
    "truncated": _truncated,
    "damaged footer": _damaged_footer,
    "random bytes": lambda p: p.write_bytes(os.urandom(4096)),
}


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_parquet_is_named_before_anything_is_written(case, tmp_path, capsys):
  src = tmp_path / "train-00000.parquet"
  UNREADABLE[case](src)
  out = tmp_path / "out"
  line = named_error(capsys, import_data.main(["hf-parquet", str(src), "--out", str(out)]))
  assert f"{src} is not a readable parquet file" in line
  assert not out.exists()


WRONG_TYPES = {  # (importer, schema, row, the column named)
    "image as int": ("hf-parquet", [("input_image", pa.int64()), ("edit_prompt", pa.string()),
                                    ("edited_image", HF_IMAGE)],
                     {"input_image": 3, "edit_prompt": "x", "edited_image": None}, "input_image"),
    "image as text": ("hf-parquet", [("input_image", HF_IMAGE), ("edit_prompt", pa.string()),
                                     ("edited_image", pa.string())],
                      {"input_image": None, "edit_prompt": "x", "edited_image": "a.png"},
                      "edited_image"),
    "instruction as int": ("hf-parquet", [("input_image", HF_IMAGE), ("edit_prompt", pa.int64()),
                                          ("edited_image", HF_IMAGE)],
                           {"input_image": None, "edit_prompt": 5, "edited_image": None},
                           "edit_prompt"),
    "turn as text": ("magicbrush", [("img_id", pa.string()), ("turn_index", pa.string()),
                                    ("source_img", HF_IMAGE), ("instruction", pa.string()),
                                    ("target_img", HF_IMAGE)],
                     {"img_id": "1", "turn_index": "first", "source_img": None,
                      "instruction": "x", "target_img": None}, "turn_index"),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_wrong_column_types_are_named(case, tmp_path, capsys):
  importer, fields, row, column = WRONG_TYPES[case]
  src = tmp_path / "data.parquet"
  write_parquet(src, [row], pa.schema(fields))
  out = tmp_path / "out"
  line = named_error(capsys, import_data.main([importer, str(src), "--out", str(out)]))
  assert f"column '{column}' holds" in line and "expected" in line
  assert not out.exists()


def test_missing_or_malformed_sources_are_named_before_anything_is_written(tmp_path, capsys):
  (tmp_path / "empty_folder").mkdir()
  a_file = good_parquet(tmp_path / "a.parquet")
  bad_utf8, not_a_list, bad_entry = (tmp_path / n for n in ("gen1", "gen2", "gen3"))
  for folder, seeds in ((bad_utf8, b"\xff\xfe[["), (not_a_list, b'{"a": 1}'),
                        (bad_entry, b'[["0000000", ["12", "x"]]]')):
    folder.mkdir()
    (folder / "seeds.json").write_bytes(seeds)
  cases = [
      (["hf-parquet", str(tmp_path / "nothing.parquet")], "does not exist"),
      (["magicbrush", str(tmp_path / "empty_folder")], "no parquet files in"),
      (["hf-parquet", str(tmp_path / "*.parquets")], "no parquet files in"),
      (["generator", str(tmp_path / "no_such_folder")], "does not exist"),
      (["generator", str(a_file)], "is not a folder"),
      (["generator", str(bad_utf8)], "seeds.json is not UTF-8 JSON"),
      (["generator", str(not_a_list)], "seeds.json holds a JSON dict, not a list"),
      (["generator", str(bad_entry)], 'entry 0 is ["0000000", ["12", "x"]]'),
      # A file system TensorFlow does not know (a mistyped gs://): named, not a traceback.
      (["hf-parquet", "nosuchfs://bucket/a.parquet"], "cannot read nosuchfs://bucket/a.parquet"),
      (["generator", "nosuchfs://bucket/gen"], "cannot read nosuchfs://bucket/gen"),
  ]
  out = tmp_path / "out"
  for args, says in cases:
    line = named_error(capsys, import_data.main(args + ["--out", str(out)]))
    assert says in line, (args, line)
    assert not out.exists(), args  # not even a manifest


def _all_undecodable(tmp_path):
  rows = [{"input_image": hf_image(b"not an image"), "edit_prompt": f"edit {i}",
           "edited_image": hf_image(b"nor this")} for i in range(3)]
  write_parquet(tmp_path / "bad.parquet", rows, SAMPLES_SCHEMA)
  return ["hf-parquet", str(tmp_path / "bad.parquet")], "no row of", "3 undecodable input image"


def _magicbrush_undecodable(tmp_path):
  rows = [{"img_id": "1", "turn_index": 1, "source_img": hf_image(b"x"), "instruction": "x",
           "target_img": hf_image(b"y")}]
  write_parquet(tmp_path / "mb.parquet", rows, MAGICBRUSH_SCHEMA)
  return ["magicbrush", str(tmp_path / "mb.parquet")], "no row of", "1 undecodable input image"


def _no_rows(tmp_path):
  write_parquet(tmp_path / "none.parquet", [], SAMPLES_SCHEMA)
  return ["hf-parquet", str(tmp_path / "none.parquet")], "holds no rows", ""


def _generator_without_prompts(tmp_path):
  make_generator_folder(tmp_path / "gen")
  for prompt in (tmp_path / "gen").glob("*/prompt.json"):
    prompt.write_text("[]")  # JSON, but not an object
  return ["generator", str(tmp_path / "gen")], "no row of", "unreadable prompt.json"


NOTHING_IMPORTED = {"undecodable images": _all_undecodable,
                    "magicbrush undecodable": _magicbrush_undecodable,
                    "no rows": _no_rows, "generator prompts unreadable": _generator_without_prompts}


@pytest.mark.parametrize("case", sorted(NOTHING_IMPORTED))
def test_nothing_importable_exits_2_and_leaves_no_dataset(case, tmp_path, capsys):
  args, says, reasons = NOTHING_IMPORTED[case](tmp_path)
  out = tmp_path / "new" / "out"
  line = named_error(capsys, import_data.main(args + ["--out", str(out)]))
  assert says in line and reasons in line and "nothing was written" in line
  assert not (tmp_path / "new").exists()  # the folders it made are gone, and no manifest
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  named_error(capsys, import_data.main(args + ["--out", str(existing)]))
  assert os.listdir(existing) == ["notes.txt"]  # a folder it did not make keeps what it held


def test_bad_options_are_named_before_anything_is_written(tmp_path, capsys):
  src = str(good_parquet(tmp_path / "a.parquet"))
  out = tmp_path / "out"
  cases = [(["--workers", "0"], "workers=0"), (["--jpeg-quality", "300"], "jpeg_quality=300"),
           (["--split", "Dev-1"], "split name 'Dev-1'"), (["--val-fraction", "1"], "[0, 1)"),
           (["--store-resolution", "0"], "store_resolution=0"),
           (["--examples-per-shard", "0"], "examples_per_shard=0"),
           (["--name", "My-Data"], "snake_case")]
  for extra, says in cases:
    line = named_error(capsys, import_data.main(["hf-parquet", src, "--out", str(out), *extra]))
    assert says in line, (extra, line)
    assert not out.exists(), extra


def test_unwritable_output_is_named(tmp_path, capsys):
  src = str(good_parquet(tmp_path / "a.parquet"))
  a_file = tmp_path / "a_file"
  a_file.write_text("mine")
  # Root writes through chmod: a parent that is a regular file stands in for a read-only one.
  for out in (a_file, a_file / "dataset"):
    line = named_error(capsys, import_data.main(["hf-parquet", src, "--out", str(out)]))
    assert f"cannot write the dataset {out}" in line and "not a directory" in line
  assert a_file.read_text() == "mine"
  line = named_error(capsys, import_data.main(["hf-parquet", src, "--out", "nosuchfs://b/out"]))
  assert "cannot write the dataset nosuchfs://b/out: File system scheme 'nosuchfs'" in line


def test_full_disk_is_named_and_a_rerun_finishes_the_import(tmp_path, capsys, monkeypatch):
  src = str(good_parquet(tmp_path / "a.parquet", n=10))
  args = ["hf-parquet", src, "--examples-per-shard", "3", "--workers", "1"]
  assert import_data.main(args + ["--out", str(tmp_path / "straight")]) == 0
  real_write = writer._OpenShard.write

  def disk_full_after(n):
    calls = []

    def write(self, data, cursor):
      calls.append(cursor)
      if len(calls) > n:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      real_write(self, data, cursor)
    return write

  out = tmp_path / "out"
  monkeypatch.setattr(writer._OpenShard, "write", disk_full_after(2))  # before the first commit
  line = named_error(capsys, import_data.main(args + ["--out", str(out)]))
  assert line == f"jip2p-import: error: cannot write the dataset {out}: No space left on device"
  assert not out.exists()
  monkeypatch.setattr(writer._OpenShard, "write", disk_full_after(7))  # two shards committed
  named_error(capsys, import_data.main(args + ["--out", str(out)]))
  manifest = writer.read_manifest(str(out))
  assert not manifest["complete"] and manifest["splits"]["train"]["num_examples"] == 6
  monkeypatch.setattr(writer._OpenShard, "write", real_write)
  assert import_data.main(args + ["--out", str(out)]) == 0
  assert "already stored (resumed): 6" in capsys.readouterr().out
  straight = writer.read_manifest(str(tmp_path / "straight"))
  assert writer.read_manifest(str(out))["splits"] == straight["splits"]  # same bytes (sha256)


def test_a_last_shard_the_disk_refuses_at_close_leaves_no_dataset(tmp_path):
  """TFRecordWriter buffers: the shard's bytes met the full disk only when the writer closed it,
  and that failure left manifest.json and the shard's temporary file of a dataset with no row
  (the monkeypatched test above fails earlier, in write). A write past 8 KiB fails here (EFBIG,
  as ENOSPC on a full disk), in a fresh process."""
  out = tmp_path / "out"
  script = os.path.join(os.path.dirname(sys.executable), "jip2p-import")
  done = subprocess.run(cli_errors.file_size_limited(
      [script, "synthetic", "--num", "8", "--size", "32", "--out", str(out)], 8 << 10),
      capture_output=True, text=True, timeout=600)
  line = cli_errors.named_error(done.stderr, done.returncode, "jip2p-import")
  assert line.startswith(f"jip2p-import: error: cannot write the dataset {out}: ")
  assert line.endswith("File too large")
  assert os.listdir(tmp_path) == []


def test_a_damaged_row_group_is_skipped_and_counted(tmp_path, capsys):
  src = tmp_path / "a.parquet"
  rows = clip_filtered_rows(n_prompts=12, seeds=1)
  pq.write_table(pa.Table.from_pylist(rows, schema=CLIP_FILTERED_SCHEMA), src, row_group_size=4)
  column = pq.ParquetFile(src).metadata.row_group(1).column(0)
  data = bytearray(src.read_bytes())
  for i in range(column.data_page_offset, column.data_page_offset + 60):
    data[i] ^= 0x5A  # the second row group's first page header
  src.write_bytes(bytes(data))
  out = tmp_path / "out"
  assert import_data.main(["hf-parquet", str(src), "--out", str(out)]) == 0
  report = capsys.readouterr().out
  assert "unreadable parquet data: 4" in report and "written: train=8" in report
  assert [t.instruction for t in reader.iter_triplets(str(out))] == [
      f"edit {p}" for p in (0, 1, 2, 3, 8, 9, 10, 11)]  # later rows keep their numbers


def test_bad_generator_entries_are_skipped_and_counted(tmp_path, capsys):
  make_generator_folder(tmp_path / "gen")
  folders = sorted(p for p in (tmp_path / "gen").iterdir() if p.is_dir())
  (folders[0] / "prompt.json").write_text(json.dumps(["not", "an object"]))
  (folders[1] / "prompt.json").write_text(json.dumps({"input": "a", "edit": "b", "output": 5}))
  with open(folders[2] / "metadata.jsonl", "a") as f:
    f.write(json.dumps({"seed": 2000, "cfg_scale": "high"}) + "\n")
  out = tmp_path / "out"
  assert import_data.main(["generator", str(tmp_path / "gen"), "--out", str(out)]) == 0
  report = capsys.readouterr().out
  assert "unreadable prompt.json (ValueError): 2" in report
  assert "edited caption is not text: 1" in report  # one of its two seeds lost its image first
  triplets = list(reader.iter_triplets(str(out)))
  assert [t.seed for t in triplets] == [2000, 2001]
  assert all(t.cfg_scale != t.cfg_scale for t in triplets)  # NaN: the metadata was unreadable


def test_a_rerun_that_is_not_the_same_import_is_refused(tmp_path, capsys):
  """Resuming skips rows by number: other inputs or split options would mix two imports."""
  a, b = good_parquet(tmp_path / "a.parquet"), good_parquet(tmp_path / "b.parquet", n=3)
  out = tmp_path / "out"
  assert import_data.main(["hf-parquet", str(a), "--out", str(out)]) == 0
  before = writer.read_manifest(str(out))
  for extra, says in ((["--val-fraction", "0.5"], "val_fraction=0.0; this run has "
                                                  "val_fraction=0.5"),
                      (["--split", "validation"], "split=None; this run has split='validation'")):
    line = named_error(capsys, import_data.main(["hf-parquet", str(a), "--out", str(out), *extra]))
    assert says in line
  line = named_error(capsys, import_data.main(["hf-parquet", str(b), "--out", str(out)]))
  assert f"inputs=[{str(a)!r}]" in line and "rerun the same command" in line
  assert writer.read_manifest(str(out)) == before
  assert import_data.main(["hf-parquet", str(a), "--out", str(out)]) == 0  # the same: resumes
  assert "already stored (resumed): 6" in capsys.readouterr().out
