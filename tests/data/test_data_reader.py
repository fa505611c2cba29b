"""Reader: paired augmentation, hosts, determinism, resume, tokens, bad data."""

import json
import os
import re
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import triplet_fixtures as fx  # noqa: E402

from jip2p.data import reader, schema, writer  # noqa: E402
from jip2p.data.tf_setup import import_tf  # noqa: E402
from jip2p.errors import ConfigError, InputError  # noqa: E402
from jip2p.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.tf

SMALL = dict(resolution=32, min_resize=32, max_resize=48)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """40 PNG examples (64 px) in shards of 6."""
  directory = tmp_path_factory.mktemp("reader") / "ds"
  with writer.DatasetWriter(str(directory), examples_per_shard=6) as w:
    for i in range(40):
      w.write(fx.triplet(i))
  return str(directory)


def read_ids(directory, config, **kwargs):
  it = reader.make_iterator(directory, config, process_index=kwargs.pop("process_index", 0),
                            process_count=kwargs.pop("process_count", 1), **kwargs)
  return [fx.example_ids(b["instruction"]) for b in it]


def test_augmentation_crops_and_flips_both_images_alike(dataset):
  config = reader.ReaderConfig(batch_size=8, num_epochs=2, include_text=True, **SMALL)
  batches = list(reader.make_iterator(dataset, config, process_index=0, process_count=1))
  assert len(batches) == 10
  flips, scales = [], []
  for b in batches:
    assert b["input"].shape == b["edited"].shape == (8, 32, 32, 3)
    assert b["input"].dtype == np.float32 and np.abs(b["input"]).max() <= 1.0
    # edited is the negative of input: any crop or flip not shared would break this everywhere.
    np.testing.assert_allclose(b["edited"], -b["input"], atol=1e-4)
    ramp = b["input"][:, 16, :, 1]  # The green channel rises with x unless flipped.
    step = np.diff(ramp, axis=1).mean(axis=1)
    flips += list(step < 0)
    # Ramp step per output pixel: (2 / 63) * 64 / side, so the side is 128 / (63 * |step|).
    scales += list(128 / (63 * np.abs(step)))
  assert 0.3 < np.mean(flips) < 0.7
  assert min(scales) > 32 - 1 and max(scales) < 48 + 1 and max(scales) - min(scales) > 8


def test_no_augmentation_resizes_to_the_resolution(dataset):
  config = reader.ReaderConfig(batch_size=40, num_epochs=1, shuffle=False, augment=False,
                               cycle_length=1, include_text=True, **SMALL)
  (batch,) = reader.make_iterator(dataset, config, process_index=0, process_count=1)
  assert fx.example_ids(batch["instruction"]) == list(range(40))
  tf = import_tf()
  want = tf.image.resize(fx.pattern(7, 64, 64), (32, 32), method="area").numpy() / 127.5 - 1
  np.testing.assert_allclose(batch["input"][7], want, atol=1e-5)


def test_same_seed_same_order_other_seed_other_order(dataset):
  config = reader.ReaderConfig(batch_size=5, num_epochs=2, include_text=True, shuffle_buffer=16,
                               cycle_length=3, **SMALL)
  first, again = read_ids(dataset, config), read_ids(dataset, config)
  other = read_ids(dataset, reader.ReaderConfig(**{**config.__dict__, "seed": 1}))
  assert first == again and first != other
  flat = sum(first, [])
  assert sorted(flat[:40]) == sorted(flat[40:]) == list(range(40))  # Each epoch: each once.
  assert flat[:40] != flat[40:]  # Reshuffled per epoch.
  assert flat[:40] != list(range(40))


@pytest.mark.parametrize("count", [2, 3])
def test_simulated_hosts_read_disjoint_parts_covering_the_data(dataset, count):
  config = reader.ReaderConfig(batch_size=1, num_epochs=1, include_text=True,
                               drop_remainder=False, **SMALL)
  parts = [sum(read_ids(dataset, config, process_index=i, process_count=count), [])
           for i in range(count)]
  assert sorted(sum(parts, [])) == list(range(40))
  assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_host_slices_is_a_pure_partition():
  lengths = [5, 0, 7, 3, 9]
  for count in range(1, 8):
    covered = []
    for index in range(count):
      slices = reader.host_slices(lengths, index, count)
      assert slices == reader.host_slices(lengths, index, count)
      covered += [(s, r) for s, a, b in slices for r in range(a, b)]
    assert sorted(covered) == [(s, r) for s, n in enumerate(lengths) for r in range(n)]
  assert reader.host_slices(lengths, 0, 2) == [(0, 0, 5), (2, 0, 7)]
  assert reader.host_slices(lengths, 1, 3) == [(2, 3, 7), (3, 0, 3), (4, 0, 1)]
  with pytest.raises(ConfigError, match="process_index"):
    reader.host_slices(lengths, 2, 2)
  assert reader.per_host_batch_size(64, 8) == 8
  with pytest.raises(ConfigError, match="global batch 60 does not split evenly over 8 hosts"):
    reader.per_host_batch_size(60, 8)


def test_resume_from_state_continues_exactly(dataset):
  config = reader.ReaderConfig(batch_size=6, num_epochs=3, include_text=True, shuffle_buffer=8,
                               **SMALL)
  straight = list(reader.make_iterator(dataset, config, process_index=0, process_count=1))
  for stop in (4, 7):  # Inside epoch 0, and inside epoch 1.
    it = reader.make_iterator(dataset, config, process_index=0, process_count=1)
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.state().to_dict()))  # What a checkpoint would store.
    resumed = list(reader.make_iterator(dataset, config, process_index=0, process_count=1,
                                        state=state))
    assert len(resumed) == len(straight) - stop
    for a, b in zip(resumed, straight[stop:]):
      assert list(a["instruction"]) == list(b["instruction"])
      np.testing.assert_array_equal(a["input"], b["input"])  # Same crops and flips.
  with pytest.raises(ConfigError, match="host 0 of 1"):
    reader.make_iterator(dataset, config, process_index=1, process_count=2, state=state)


def test_tokens_come_from_the_tokenizer_given_at_read_time(dataset):
  tok = load_tokenizer()
  config = reader.ReaderConfig(batch_size=4, num_epochs=1, include_text=True, **SMALL)
  batch = next(reader.make_iterator(dataset, config, tokenize=tok, process_index=0,
                                    process_count=1))
  assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (4, 77)
  np.testing.assert_array_equal(batch["input_ids"], tok(list(batch["instruction"])))
  assert batch["input_ids"][0, -1] == tok.pad_id == 49407


SIZES = {0: (40, 56), 1: (60, 44), 2: (48, 48), 3: (52, 64)}  # (height, width); 3 is a JPEG


def test_geometry_is_each_examples_original_size_and_crop(tmp_path):
  """include_geometry (SDXL's micro-conditioning): "original_size" is the stored edited image's
  (height, width); "crop_top_left" is the crop's corner in the resized square, its left mirrored
  when flipped — checked against the pixels: some square side and flip reproduce the example from
  exactly that corner. SDXL's two tokenizers give ids [B, 2, 77]."""
  from jip2p.tokenizer import CLIPTokenizer, SDXLTokenizers
  directory = str(tmp_path / "sizes")
  with writer.DatasetWriter(directory, examples_per_shard=4) as w:
    for i, (h, w_) in SIZES.items():
      image = fx.pattern(i, h, w_)
      fmt = "jpeg" if i == 3 else "png"
      w.write(schema.Triplet(input_image=fx.encode(image, fmt), instruction=f"example {i}",
                             edited_image=fx.encode(255 - image, fmt)))
  s, low, high = 16, 20, 28
  config = reader.ReaderConfig(batch_size=4, num_epochs=6, include_text=True, shuffle=False,
                               include_geometry=True, resolution=s, min_resize=low,
                               max_resize=high)
  pair = SDXLTokenizers(load_tokenizer(), CLIPTokenizer.open_clip())
  tf = import_tf()
  flips = []
  for batch in reader.make_iterator(directory, config, tokenize=pair, process_index=0,
                                    process_count=1):
    assert batch["input_ids"].shape == (4, 2, 77)
    np.testing.assert_array_equal(batch["input_ids"], pair(list(batch["instruction"])))
    assert batch["original_size"].dtype == batch["crop_top_left"].dtype == np.int32
    for i, size, (top, left), edited in zip(fx.example_ids(batch["instruction"]),
                                            batch["original_size"], batch["crop_top_left"],
                                            batch["edited"]):
      assert tuple(size) == SIZES[i]
      if i == 3:
        continue  # JPEG pixels are not the pattern's
      h, w_ = SIZES[i]
      source = 255 - fx.pattern(i, h, w_)
      found = []
      for side in range(low, high + 1):
        for flip in (False, True):
          left0 = side - s - left if flip else left  # the corner before the flip
          if not (0 <= top <= side - s and 0 <= left0 <= side - s):
            continue
          window = []
          for corner, n in ((top, h), (left0, w_)):
            extent = max(round(s / side * n), 1)
            window.append((min(round(corner / side * n), n - extent), extent))
          (y, hh), (x, ww) = window
          crop = source[y:y + hh, x:x + ww][:, ::-1 if flip else 1].astype(np.float32)
          want = tf.image.resize(crop, [s, s], method="area", antialias=True).numpy()
          if np.allclose(edited, want / 127.5 - 1.0, atol=1e-4):
            found.append(flip)
      assert found, (i, top, left)
      flips += found[:1]
  assert 0 < np.mean(flips) < 1  # both flipped and unflipped examples were checked


def test_full_size_jpeg_pipeline_shapes(tmp_path):
  with writer.DatasetWriter(str(tmp_path), examples_per_shard=2) as w:
    for i in range(3):
      w.write(fx.triplet(i, size=512, fmt="jpeg"))
  config = reader.ReaderConfig(batch_size=3, num_epochs=1, include_text=True)
  (batch,) = reader.make_iterator(str(tmp_path), config, process_index=0, process_count=1)
  assert batch["input"].shape == batch["edited"].shape == (3, 256, 256, 3)
  # JPEG is lossy, so the negative relation holds only approximately.
  assert np.abs(batch["edited"] + batch["input"]).mean() < 0.05


# ---------------------------------------------------------------- bad data


def _example(tf, **fields):
  feature = {}
  for key, value in fields.items():
    feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def add_bad_shard(directory, records, *, truncate_to=None, claimed=None):
  """Appends a hand-made shard to the manifest (claiming `claimed` records)."""
  tf = import_tf()
  manifest = writer.read_manifest(directory)
  shards = manifest["splits"]["train"]["shards"]
  name = writer.shard_filename(manifest["name"], "train", len(shards))
  path = os.path.join(directory, name)
  with tf.io.TFRecordWriter(path) as w:
    for r in records:
      w.write(r)
  if truncate_to is not None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:truncate_to(len(data))])
  shards.append({"file": name, "num_examples": claimed or len(records), "num_bytes": 0,
                 "sha256": "", "last_cursor": None})
  manifest["splits"]["train"]["num_examples"] += claimed or len(records)
  with open(os.path.join(directory, writer.MANIFEST), "w") as f:
    json.dump(manifest, f)


def bad_records(tf):
  good = fx.triplet(100)
  png = good.input_image
  return [
      b"\x00not a protocol buffer\xff" * 3,  # undecodable
      _example(tf, input_image=png[:len(png) // 3], edited_image=good.edited_image,
               instruction=b"cut"),  # undecodable: truncated PNG body
      _example(tf, input_image=b"BM not an image", edited_image=png,
               instruction=b"bmp"),  # undecodable: not PNG/JPEG
      _example(tf, input_image=png, instruction=b"no edited image"),  # missing_field
      _example(tf, input_image=png, edited_image=png, instruction=b"  "),  # empty_instruction
  ]


def test_corrupt_records_are_skipped_and_counted(tmp_path):
  tf = import_tf()
  directory = str(tmp_path)
  with writer.DatasetWriter(directory, examples_per_shard=10) as w:
    for i in range(20):
      w.write(fx.triplet(i))
  add_bad_shard(directory, bad_records(tf))
  good = [writer.serialize(schema.to_record(fx.triplet(i))) for i in range(20, 26)]
  # A shard cut in its third record: two records read, four lost.
  add_bad_shard(directory, good, truncate_to=lambda n: n * 5 // 12)
  config = reader.ReaderConfig(batch_size=4, num_epochs=2, include_text=True,
                               drop_remainder=False, max_bad_fraction=0.5, **SMALL)
  it = reader.make_iterator(directory, config, process_index=0, process_count=1)
  ids = sum((fx.example_ids(b["instruction"]) for b in it), [])
  assert sorted(ids) == sorted(2 * (list(range(22))))
  assert it.stats() == {"records": 62, "ok": 44, "unreadable": 8, "undecodable": 6,
                        "missing_field": 2, "empty_instruction": 2}


def test_mostly_corrupt_data_stops_with_a_named_error(tmp_path):
  tf = import_tf()
  directory = str(tmp_path)
  with writer.DatasetWriter(directory, examples_per_shard=10) as w:
    w.write(fx.triplet(0))
  add_bad_shard(directory, bad_records(tf) * 4)
  config = reader.ReaderConfig(batch_size=2, max_bad_fraction=0.1, **SMALL)
  with pytest.raises(InputError, match=r"records read so far are bad.*undecodable=\d+"):
    for _ in reader.make_iterator(directory, config, process_index=0, process_count=1):
      pass
  # No good record at all: the error still comes (instead of a pipeline that never yields).
  with writer.DatasetWriter(str(tmp_path / "none"), examples_per_shard=10) as w:
    w.write(fx.triplet(0))
  manifest = writer.read_manifest(str(tmp_path / "none"))
  first = tmp_path / "none" / manifest["splits"]["train"]["shards"][0]["file"]
  with tf.io.TFRecordWriter(str(first)) as w:
    for r in bad_records(tf):
      w.write(r)
  manifest["splits"]["train"]["shards"][0]["num_examples"] = 5
  (tmp_path / "none" / writer.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(InputError, match="5 of 5 records"):
    next(reader.make_iterator(str(tmp_path / "none"), config, process_index=0, process_count=1))


def test_reader_names_what_is_wrong_with_its_input(tmp_path, dataset):
  with pytest.raises(InputError, match="neither manifest.json nor dataset_info.json"):
    reader.make_iterator(str(tmp_path), reader.ReaderConfig(batch_size=1), process_index=0,
                         process_count=1)
  with pytest.raises(InputError, match=re.escape(f"{tmp_path}/missing does not exist: expected "
                                                 "a dataset folder")):
    reader.list_shards([dataset, str(tmp_path / "missing")], "train")
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(InputError, match=re.escape(f"{tmp_path}/a_file is not a folder")):
    reader.list_shards(str(tmp_path / "a_file"), "train")
  with pytest.raises(InputError, match="no split 'validation'"):
    reader.make_iterator(dataset, reader.ReaderConfig(batch_size=1, split="validation"),
                         process_index=0, process_count=1)
  with pytest.raises(ConfigError, match="min_resize"):
    reader.make_iterator(dataset, reader.ReaderConfig(batch_size=1, resolution=300),
                         process_index=0, process_count=1)


def test_iter_triplets_names_a_cut_record_in_one_line(tmp_path):
  directory = str(tmp_path)
  with writer.DatasetWriter(directory, examples_per_shard=10) as w:
    w.write(fx.triplet(0))
  good = [writer.serialize(schema.to_record(fx.triplet(i))) for i in range(1, 4)]
  add_bad_shard(directory, good, truncate_to=lambda n: n * 5 // 6)  # cut in its third record
  with pytest.raises(InputError) as e:
    list(reader.iter_triplets(directory))
  shard = writer.shard_filename("jip2p_triplets", "train", 1)
  message = str(e.value)
  assert message.startswith(f"{directory}/{shard}, record 2: ") and "truncated record" in message
  assert "\n" not in message and "{{" not in message and "[Op:" not in message


def test_missing_shard_counts_as_unreadable(tmp_path):
  with writer.DatasetWriter(str(tmp_path), examples_per_shard=5) as w:
    for i in range(10):
      w.write(fx.triplet(i))
  (tmp_path / writer.shard_filename("jip2p_triplets", "train", 1)).unlink()
  config = reader.ReaderConfig(batch_size=5, num_epochs=1, include_text=True,
                               max_bad_fraction=0.6, **SMALL)
  it = reader.make_iterator(str(tmp_path), config, process_index=0, process_count=1)
  assert sorted(sum((fx.example_ids(b["instruction"]) for b in it), [])) == list(range(5))
  assert it.stats()["unreadable"] == 5 and it.stats()["records"] == 10
  strict = reader.ReaderConfig(**{**config.__dict__, "max_bad_fraction": 0.4})
  with pytest.raises(InputError, match="unreadable=5.*missing, truncated or corrupt shard"):
    list(reader.make_iterator(str(tmp_path), strict, process_index=0, process_count=1))



def test_a_dataset_on_a_non_local_filesystem_is_read(dataset):
  """TensorFlow's in-memory ram:// filesystem stands in for gs:// (the reader lists and reads
  through tf.io.gfile and tf.data, as on gs://): the same examples as from the local copy."""
  tf = import_tf()
  remote = "ram://jip2p-reader-test/ds"
  tf.io.gfile.makedirs(remote)
  for name in tf.io.gfile.listdir(dataset):
    tf.io.gfile.copy(os.path.join(dataset, name), f"{remote}/{name}", overwrite=True)
  config = reader.ReaderConfig(batch_size=40, num_epochs=1, shuffle=False, augment=False,
                               cycle_length=1, include_text=True, **SMALL)
  [batch] = list(reader.make_iterator(remote, config, process_index=0, process_count=1))
  assert sorted(fx.example_ids(batch["instruction"])) == list(range(40))
  assert read_ids(remote, config) == read_ids(dataset, config)
