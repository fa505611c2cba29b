"""Importers and `jip2p-import`, on parquet files and folder trees made here in the real layouts."""

import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import triplet_fixtures as fx  # noqa: E402

from jip2p.cli import import_data  # noqa: E402
from jip2p.data import importers, reader, writer  # noqa: E402

pytestmark = pytest.mark.tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_image(data):
  return None if data is None else {"bytes": data, "path": None}


def clip_filtered_rows(n_prompts=6, seeds=3):
  """Rows like timbrooks/instructpix2pix-clip-filtered: several image pairs per prompt."""
  rows = []
  for p in range(n_prompts):
    for s in range(seeds):
      i = 10 * p + s
      t = fx.triplet(i)
      rows.append({"original_prompt": f"a photo {p}", "original_image": hf_image(t.input_image),
                   "edit_prompt": f"edit {p}", "edited_prompt": f"an edited photo {p}",
                   "edited_image": hf_image(t.edited_image)})
  return rows


def write_parquet(path, rows, schema):
  table = pa.Table.from_pylist(rows, schema=schema)
  pq.write_table(table, path, row_group_size=4)


CLIP_FILTERED_SCHEMA = pa.schema([("original_prompt", pa.string()), ("original_image", HF_IMAGE),
                                  ("edit_prompt", pa.string()), ("edited_prompt", pa.string()),
                                  ("edited_image", HF_IMAGE)])


@pytest.fixture()
def clip_filtered(tmp_path):
  rows = clip_filtered_rows()
  rows[4]["edited_image"] = None  # Missing image.
  rows[7]["edit_prompt"] = ""  # Empty instruction.
  rows[11]["original_image"] = hf_image(rows[11]["original_image"]["bytes"][:200])  # Truncated.
  folder = tmp_path / "clip-filtered" / "data"
  folder.mkdir(parents=True)
  write_parquet(folder / "train-00000-of-00002.parquet", rows[:9], CLIP_FILTERED_SCHEMA)
  write_parquet(folder / "train-00001-of-00002.parquet", rows[9:], CLIP_FILTERED_SCHEMA)
  return tmp_path / "clip-filtered"


def test_clip_filtered_import_splits_by_prompt_and_reports_skips(clip_filtered, tmp_path, capsys):
  out = tmp_path / "out"
  code = import_data.main(["hf-parquet", str(clip_filtered), "--out", str(out),
                           "--val-fraction", "0.4", "--examples-per-shard", "4", "--workers", "2"])
  assert code == 0
  report = capsys.readouterr().out
  assert "missing edited image: 1" in report and "empty instruction: 1" in report
  assert "undecodable input image: 1" in report and "rows read: 18" in report
  manifest = writer.read_manifest(str(out))
  splits = {s: list(reader.iter_triplets(str(out), s)) for s in manifest["splits"]}
  assert set(splits) == {"train", "validation"}
  assert sum(map(len, splits.values())) == 15
  prompts = {s: {t.instruction for t in ts} for s, ts in splits.items()}
  assert not prompts["train"] & prompts["validation"]  # No prompt straddles the splits.
  for split, ts in splits.items():
    for t in ts:
      p = int(t.instruction.split()[-1])
      assert assignment(f"a photo {p}\x1fedit {p}\x1fan edited photo {p}") == split
      assert (t.input_caption, t.edited_caption) == (f"a photo {p}", f"an edited photo {p}")
      assert t.source == "clip-filtered" and t.source_id.startswith("train-0000")
  first = splits[assignment("a photo 0\x1fedit 0\x1fan edited photo 0")][0]
  assert first.input_image == fx.triplet(0).input_image  # Bytes passed through unchanged.


def assignment(group):
  return importers.assign_split(group, 0.4, 0)


def test_samples_1000_layout_and_store_resolution(tmp_path):
  schema = pa.schema([("input_image", HF_IMAGE), ("edit_prompt", pa.string()),
                      ("edited_image", HF_IMAGE)])
  rows = []
  for i in range(3):
    t = fx.triplet(i, size=512, fmt="png")
    rows.append({"input_image": hf_image(t.input_image), "edit_prompt": t.instruction,
                 "edited_image": hf_image(t.edited_image)})
  write_parquet(tmp_path / "samples.parquet", rows, schema)
  out = tmp_path / "out"
  assert import_data.main(["hf-parquet", str(tmp_path / "samples.parquet"), "--out", str(out),
                           "--store-resolution", "288"]) == 0
  triplets = list(reader.iter_triplets(str(out)))
  assert [t.instruction for t in triplets] == ["example 0", "example 1", "example 2"]
  for t in triplets:
    assert t.source == "instructpix2pix-1000-samples" and t.input_caption == ""
    for data in (t.input_image, t.edited_image):
      im = Image.open(io.BytesIO(data))
      assert im.format == "JPEG" and im.size == (288, 288)
  assert writer.read_manifest(str(out))["metadata"]["store_resolution"] == 288


def test_magicbrush_keeps_turns_and_takes_a_fixed_split(tmp_path):
  schema = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()),
                      ("source_img", HF_IMAGE), ("mask_img", HF_IMAGE),
                      ("instruction", pa.string()), ("target_img", HF_IMAGE)])
  rows = []
  for i in range(5):
    t = fx.triplet(i)
    rows.append({"img_id": f"{327726 + i // 2}", "turn_index": 1 + i % 2,
                 "source_img": hf_image(t.input_image), "mask_img": hf_image(t.input_image),
                 "instruction": t.instruction, "target_img": hf_image(t.edited_image)})
  write_parquet(tmp_path / "dev-00000-of-00001.parquet", rows, schema)
  out = tmp_path / "out"
  assert import_data.main(["magicbrush", str(tmp_path / "dev-00000-of-00001.parquet"), "--out",
                           str(out), "--split", "validation"]) == 0
  triplets = list(reader.iter_triplets(str(out), "validation"))
  assert [(t.source_id, t.turn_index) for t in triplets] == [
      ("327726/1", 1), ("327726/2", 2), ("327727/1", 1), ("327727/2", 2), ("327728/1", 1)]
  assert triplets[3].edited_image == fx.triplet(3).edited_image


def make_generator_folder(root, n_prompts=3):
  """The original generator's output: NNNNNNN/prompt.json, {seed}_0/1.jpg, metadata.jsonl."""
  seeds_json = []
  for p in range(n_prompts):
    folder = root / f"{p * 7:07d}"
    folder.mkdir(parents=True)
    key = "caption" if p == 1 else "input"  # The generator's known input/caption mix-up.
    (folder / "prompt.json").write_text(json.dumps(
        {key: f"a photo {p}", "edit": f"edit {p}", "output": f"a photo {p} edited"}))
    seeds = [str(1000 * p + s) for s in range(2)]
    with open(folder / "metadata.jsonl", "w") as f:
      for s, seed in enumerate(seeds):
        f.write(json.dumps({"seed": int(seed), "p2p_threshold": 0.3 + s / 10, "cfg_scale": 9.0,
                            "clip_sim_0": 0.21, "clip_sim_1": 0.22, "clip_sim_dir": 0.3 + p / 10,
                            "clip_sim_image": 0.8}) + "\n")
        t = fx.triplet(10 * p + s, fmt="jpeg")
        (folder / f"{seed}_0.jpg").write_bytes(t.input_image)
        (folder / f"{seed}_1.jpg").write_bytes(t.edited_image)
    seeds_json.append([folder.name, seeds])
  (root / f"{7:07d}" / "1001_1.jpg").unlink()  # A lost file.
  (root / "seeds.json").write_text(json.dumps(seeds_json))


def test_generator_folders_keep_every_seed_and_its_clip_scores(tmp_path):
  make_generator_folder(tmp_path / "gen")
  out = tmp_path / "out"
  rows = list(importers.iter_generator(str(tmp_path / "gen")))
  assert [r.skip_reason for r in rows] == [None, None, None, "missing edited image", None, None]
  with writer.DatasetWriter(str(out)) as w:
    report = importers.import_rows(rows, w)
  assert dict(report.written) == {"train": 5} and report.skipped == {"missing edited image": 1}
  triplets = list(reader.iter_triplets(str(out)))
  assert [(t.prompt_index, t.seed) for t in triplets] == [(0, 0), (0, 1), (7, 1000), (14, 2000),
                                                          (14, 2001)]
  t = triplets[2]
  assert (t.input_caption, t.instruction, t.edited_caption) == (
      "a photo 1", "edit 1", "a photo 1 edited")
  assert t.source_id == "0000007/1000" and t.source == "generator"
  assert (t.p2p_threshold, t.cfg_scale, t.clip_sim_0, t.clip_sim_1) == pytest.approx(
      (0.3, 9.0, 0.21, 0.22))
  assert (t.clip_sim_direction, t.clip_sim_image) == pytest.approx((0.4, 0.8))
  assert triplets[1].p2p_threshold == pytest.approx(0.4)


def kill_import(argv, at_write):
  """Runs ``jip2p-import argv`` in a subprocess killed (SIGKILL) at its ``at_write``-th triplet
  write; the dataset it leaves is incomplete."""
  script = f"""
import os, signal
from jip2p.data import writer
from jip2p.cli import import_data
write, calls = writer.DatasetWriter.write, []
def dying_write(self, *a, **k):
  calls.append(1)
  if len(calls) == {at_write}:
    os.kill(os.getpid(), signal.SIGKILL)
  write(self, *a, **k)
writer.DatasetWriter.write = dying_write
import_data.main({argv!r})
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
  out = argv[argv.index("--out") + 1]
  assert not writer.read_manifest(out)["complete"]


def test_killed_import_resumes_to_exactly_the_uninterrupted_result(clip_filtered, tmp_path):
  args = ["hf-parquet", str(clip_filtered), "--val-fraction", "0.4", "--examples-per-shard", "2"]
  assert import_data.main(args + ["--out", str(tmp_path / "straight")]) == 0
  killed = tmp_path / "killed"
  kill_import(args + ["--out", str(killed)], at_write=10)  # Mid-shard, both splits in progress.
  assert import_data.main(args + ["--out", str(killed)]) == 0
  straight = writer.read_manifest(str(tmp_path / "straight"))
  resumed = writer.read_manifest(str(killed))
  assert resumed["splits"] == straight["splits"]  # Same shards, byte for byte (sha256).
  for split in straight["splits"]:
    assert ([t.source_id for t in reader.iter_triplets(str(killed), split)]
            == [t.source_id for t in reader.iter_triplets(str(tmp_path / "straight"), split)])


def test_cli_reports_a_wrong_layout_without_a_traceback(tmp_path, capsys):
  write_parquet(tmp_path / "x.parquet", [{"a": "b"}], pa.schema([("a", pa.string())]))
  assert import_data.main(["hf-parquet", str(tmp_path / "x.parquet"), "--out",
                           str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "jip2p-import: error:" in err and "match neither the clip-filtered layout" in err
  assert import_data.main(["magicbrush", str(tmp_path / "nothing"), "--out",
                           str(tmp_path / "out")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_tfds_builder_imports_from_a_manual_dir(clip_filtered, tmp_path):
  import tensorflow_datasets as tfds
  from jip2p.data import schema, tfds as jip2p_tfds
  registered = tfds.builder("instruct_pix2pix/magicbrush", data_dir=str(tmp_path / "tfds"))
  assert set(registered.info.features) == {f.name for f in schema.FIELDS}
  config = jip2p_tfds.InstructPix2PixConfig(name="test", importer="hf_parquet",
                                            validation_fraction=0.4)
  builder = jip2p_tfds.InstructPix2Pix(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(clip_filtered)))
  splits = builder.info.splits
  assert splits["train"].num_examples + splits["validation"].num_examples == 15
  for split in ("train", "validation"):
    for e in builder.as_dataset(split=split).as_numpy_iterator():
      p = e["instruction"].decode().split()[-1]
      assert assignment(f"a photo {p}\x1fedit {p}\x1fan edited photo {p}") == split
      assert e["input_image"].shape == (64, 64, 3) and e["source"] == b"clip-filtered"
  # The jip2p reader takes a TFDS-built directory too (shards from dataset_info.json).
  config = reader.ReaderConfig(batch_size=1, num_epochs=1, include_text=True, resolution=32,
                               min_resize=32, max_resize=40)
  batches = list(reader.make_iterator(builder.data_dir, config, process_index=0,
                                      process_count=1))
  assert len(batches) == splits["train"].num_examples
  np.testing.assert_allclose(batches[0]["edited"], -batches[0]["input"], atol=1e-4)


def test_remote_parquet_reads_like_local(clip_filtered, tmp_path):
  """ram:// (TensorFlow's in-memory filesystem) takes the tf.io.gfile path that gs:// takes."""
  from jip2p.data.tf_setup import import_tf
  gfile = import_tf().io.gfile
  remote = f"ram://{tmp_path.name}/clip-filtered"
  for local in sorted((clip_filtered / "data").iterdir()):
    gfile.makedirs(f"{remote}/data")
    gfile.copy(str(local), f"{remote}/data/{local.name}")
  local_rows = list(importers.iter_hf_parquet(importers.list_parquet(str(clip_filtered))))
  remote_rows = list(importers.iter_hf_parquet(importers.list_parquet(remote)))
  assert len(remote_rows) == 18
  assert [(r.key, r.skip_reason, r.triplet) for r in remote_rows] == [
      (r.key, r.skip_reason, r.triplet) for r in local_rows]


def test_synthetic_world_import_is_exact_and_resumable(tmp_path, capsys):
  from jip2p.data import synthetic
  args = ["synthetic", "--num", "12", "--seed", "3", "--size", "32", "--wording", "heldout"]
  out = tmp_path / "world"
  assert import_data.main(args + ["--out", str(out), "--examples-per-shard", "5"]) == 0
  triplets = list(reader.iter_triplets(str(out), "train"))
  truth = list(synthetic.generate(12, seed=3, size=32, split="heldout"))
  assert [t.instruction for t in triplets] == [e.instruction for e in truth]
  assert [t.source_id for t in triplets] == [f"3/{i}" for i in range(12)]
  for t, e in zip(triplets, truth):
    assert t.input_caption == e.input_caption and t.edited_caption == e.edited_caption
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(t.input_image))),
                                  e.input_image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(t.edited_image))),
                                  e.edited_image)
  # A rerun finds every row stored and writes nothing twice.
  assert import_data.main(args + ["--out", str(out), "--examples-per-shard", "5"]) == 0
  assert "already stored (resumed): 12" in capsys.readouterr().out
  assert len(list(reader.iter_triplets(str(out), "train"))) == 12
  assert import_data.main(["synthetic", "--num", "0", "--out", str(tmp_path / "none")]) == 2
  assert "--num=0 must be at least 1" in capsys.readouterr().err


def test_synthetic_import_of_some_families(tmp_path, capsys):
  from jip2p.data import synthetic
  out = tmp_path / "world"
  assert import_data.main(["synthetic", "--num", "10", "--size", "32", "--families",
                           "background,swap", "--out", str(out)]) == 0
  truth = list(synthetic.generate(10, seed=0, size=32, families=("background", "swap")))
  assert {e.family for e in truth} == {"background", "swap"}
  assert [t.instruction for t in reader.iter_triplets(str(out), "train")] == [
      e.instruction for e in truth]
  capsys.readouterr()
  assert import_data.main(["synthetic", "--num", "3", "--families", "background,paint",
                           "--out", str(tmp_path / "bad")]) == 2
  err = capsys.readouterr().err
  assert "families must be a non-empty subset" in err and "paint" in err
  assert not (tmp_path / "bad").exists()
