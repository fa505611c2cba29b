"""Writer: round trip of every field, manifest and checksums, TFDS loading, crash and resume."""

import dataclasses
import hashlib
import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import triplet_fixtures as fx  # noqa: E402

from jip2p.data import reader, schema, writer  # noqa: E402
from jip2p.errors import ConfigError, InputError  # noqa: E402

pytestmark = pytest.mark.tf


def assert_same_triplet(a: schema.Triplet, b: schema.Triplet):
  for f in dataclasses.fields(schema.Triplet):
    x, y = getattr(a, f.name), getattr(b, f.name)
    if isinstance(x, float):
      assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6), f.name
    else:
      assert x == y, f.name


def write_dataset(directory, n, *, per_shard=4, fmt="png", split_of=lambda i: "train"):
  with writer.DatasetWriter(str(directory), examples_per_shard=per_shard) as w:
    for i in range(n):
      w.write(fx.triplet(i, fmt=fmt), split_of(i), cursor=i)
  return writer.read_manifest(str(directory))


def test_round_trip_preserves_every_field(tmp_path):
  manifest = write_dataset(tmp_path, 10, fmt="jpeg", split_of=lambda i: "validation" if i % 4 == 0
                           else "train")
  assert manifest["complete"]
  assert {s: v["num_examples"] for s, v in manifest["splits"].items()} == {
      "train": 7, "validation": 3}
  for split, ids in (("train", [1, 2, 3, 5, 6, 7, 9]), ("validation", [0, 4, 8])):
    got = list(reader.iter_triplets(str(tmp_path), split))
    assert len(got) == len(ids)
    for triplet, i in zip(got, ids):
      assert_same_triplet(triplet, fx.triplet(i, fmt="jpeg"))  # Image bytes are kept verbatim.


def test_manifest_lists_deterministic_shards_with_checksums(tmp_path):
  manifest = write_dataset(tmp_path, 10, per_shard=4)
  shards = manifest["splits"]["train"]["shards"]
  assert [s["file"] for s in shards] == [writer.shard_filename("jip2p_triplets", "train", i)
                                         for i in range(3)]
  assert [s["num_examples"] for s in shards] == [4, 4, 2]
  assert [s["last_cursor"] for s in shards] == [3, 7, 9]
  for s in shards:
    data = (tmp_path / s["file"]).read_bytes()
    assert len(data) == s["num_bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
  assert manifest["schema_version"] == schema.SCHEMA_VERSION
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".incomplete")]


def test_tfds_reads_what_the_writer_wrote(tmp_path):
  import tensorflow_datasets as tfds
  directory = tmp_path / "jip2p_triplets" / "1.0.0"  # The layout tfds.load looks for.
  write_dataset(directory, 6, per_shard=4)
  builder = tfds.builder_from_directory(str(directory))
  assert builder.info.splits["train"].num_examples == 6
  assert builder.info.splits["train"].shard_lengths == [4, 2]
  assert set(builder.info.features) == {f.name for f in schema.FIELDS}
  examples = list(builder.as_dataset(split="train").as_numpy_iterator())
  assert [e["instruction"] for e in examples] == [f"example {i}".encode() for i in range(6)]
  np.testing.assert_array_equal(examples[2]["input_image"], fx.pattern(2, 64, 64))
  np.testing.assert_array_equal(examples[2]["edited_image"], 255 - fx.pattern(2, 64, 64))
  assert examples[3]["seed"] == 1003 and examples[3]["turn_index"] == 0
  assert examples[3]["input_height"] == 64 and examples[3]["source_id"] == b"id-3"
  loaded = tfds.load("jip2p_triplets", data_dir=str(tmp_path), split="train[:2]")
  assert [e["instruction"] for e in loaded.as_numpy_iterator()] == [b"example 0", b"example 1"]


def test_reopened_writer_resumes_after_an_abandoned_run(tmp_path):
  full, partial = tmp_path / "full", tmp_path / "partial"
  write_dataset(full, 11, per_shard=3)
  w = writer.DatasetWriter(str(partial), examples_per_shard=3)
  for i in range(8):  # Shards 0 and 1 complete, shard 2 half written, then a "crash".
    w.write(fx.triplet(i), cursor=i)
  w.abandon()
  assert any(p.endswith(".incomplete") for p in os.listdir(partial))
  w = writer.DatasetWriter(str(partial), examples_per_shard=3)
  assert (w.committed("train"), w.cursor("train"), w.cursor("validation")) == (6, 5, None)
  with w:
    for i in range(w.cursor("train") + 1, 11):
      w.write(fx.triplet(i), cursor=i)
  a, b = writer.read_manifest(str(full)), writer.read_manifest(str(partial))
  assert a["splits"] == b["splits"]  # Same shards, counts and checksums: identical bytes.
  assert not [p for p in os.listdir(partial) if p.endswith(".incomplete")]


def test_commit_interrupted_between_manifest_and_rename_is_finished(tmp_path):
  write_dataset(tmp_path, 6, per_shard=3)
  last = tmp_path / writer.shard_filename("jip2p_triplets", "train", 1)
  os.rename(last, str(last) + ".incomplete")  # Listed in the manifest, not yet renamed.
  w = writer.DatasetWriter(str(tmp_path), examples_per_shard=3)
  assert last.exists() and w.committed("train") == 6
  w.close()
  (tmp_path / writer.shard_filename("jip2p_triplets", "train", 0)).unlink()
  with pytest.raises(InputError, match="is missing"):
    writer.DatasetWriter(str(tmp_path), examples_per_shard=3)


def test_writer_rejects_bad_input_by_name(tmp_path):
  with pytest.raises(ConfigError, match="examples_per_shard"):
    writer.DatasetWriter(str(tmp_path), examples_per_shard=0)
  with pytest.raises(ConfigError, match="snake_case"):
    writer.DatasetWriter(str(tmp_path), name="My-Data")
  w = writer.DatasetWriter(str(tmp_path), examples_per_shard=2)
  with pytest.raises(InputError, match="input_image is not PNG or JPEG"):
    w.write(fx.triplet(0, input_image=b"GIF89a not supported"))
  with pytest.raises(InputError, match="'instruction' is empty"):
    w.write(fx.triplet(0, instruction=""))
  with pytest.raises(ConfigError, match="split name"):
    w.write(fx.triplet(0), split="Train-1")
  w.close()
  with pytest.raises(ConfigError, match="examples_per_shard=2"):
    writer.DatasetWriter(str(tmp_path), examples_per_shard=5)
  manifest = json.loads((tmp_path / writer.MANIFEST).read_text())
  assert manifest["splits"] == {}


def test_non_local_paths_go_through_gfile(tmp_path):
  """TensorFlow's in-memory filesystem stands in for gs://: same tf.io.gfile code path."""
  directory = f"ram://{tmp_path.name}/ds"
  w = writer.DatasetWriter(directory, examples_per_shard=3, tfds_metadata=False)
  for i in range(7):
    w.write(fx.triplet(i), cursor=i)
  w.abandon()
  w = writer.DatasetWriter(directory, examples_per_shard=3, tfds_metadata=False)
  assert (w.committed("train"), w.cursor("train")) == (6, 5)
  with w:
    w.write(fx.triplet(6), cursor=6)
  assert [t.instruction for t in reader.iter_triplets(directory)] == [
      f"example {i}" for i in range(7)]
  config = reader.ReaderConfig(batch_size=7, num_epochs=1, include_text=True, resolution=32,
                               min_resize=32, max_resize=40)
  (batch,) = reader.make_iterator(directory, config, process_index=0, process_count=1)
  assert sorted(fx.example_ids(batch["instruction"])) == list(range(7))


def test_inspection_reader_names_a_damaged_record(tmp_path):
  write_dataset(tmp_path, 3, per_shard=3)
  shard = tmp_path / writer.shard_filename("jip2p_triplets", "train", 0)
  data = bytearray(shard.read_bytes())
  data[len(data) // 2] ^= 0xFF  # Corrupts the second record: its checksum no longer matches.
  shard.write_bytes(bytes(data))
  got = reader.iter_triplets(str(tmp_path))
  assert next(got).instruction == "example 0"
  with pytest.raises(InputError, match=r"tfrecord-00000, record 1: .*corrupted record"):
    next(got)
