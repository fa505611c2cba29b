"""The optional mask: stored losslessly, cropped and flipped with its pair, imported."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from jip2p.cli import import_data
from jip2p.data import reader, schema, writer
from jip2p.errors import InputError
from tests.data import triplet_fixtures as fx
from tests.data.test_data_importers import HF_IMAGE, hf_image, write_parquet

pytestmark = pytest.mark.tf


def masked_triplet(i, height=48, width=80):
  """Example i whose mask is its input's red channel (noise): any crop or flip the mask does not
  share with the input shows as a mismatch."""
  image = fx.pattern(i, height, width)
  return schema.Triplet(input_image=fx.encode(image), edited_image=fx.encode(255 - image),
                        instruction=f"example {i}", mask=fx.encode(image[..., 0]))


def test_a_mask_round_trips_and_is_augmented_with_its_pair(tmp_path):
  directory = str(tmp_path / "ds")
  with writer.DatasetWriter(directory, examples_per_shard=5) as w:
    for i in range(12):
      w.write(masked_triplet(i) if i != 3 else fx.triplet(i, size=48))
  stored = list(reader.iter_triplets(directory))
  assert stored[0].mask == masked_triplet(0).mask and stored[3].mask == b""
  config = reader.ReaderConfig(batch_size=4, num_epochs=2, include_text=True, include_mask=True,
                               resolution=32, min_resize=32, max_resize=48)
  flips = []
  for batch in reader.make_iterator(directory, config, process_index=0, process_count=1):
    assert batch["mask"].shape == (4, 32, 32, 1) and batch["mask"].dtype == np.float32
    for instruction, image, mask in zip(batch["instruction"], batch["input"], batch["mask"]):
      if instruction == "example 3":  # no mask: all of it may change
        np.testing.assert_array_equal(mask, 1.0)
        continue
      np.testing.assert_allclose(mask[..., 0] * 2 - 1, image[..., 0], atol=1e-5)
      flips.append(np.diff(image[16, :, 1]).mean() < 0)  # the green ramp falls when flipped
  assert 0 < np.mean(flips) < 1
  plain = reader.ReaderConfig(batch_size=4, num_epochs=1, resolution=32, min_resize=32,
                              max_resize=48)
  batch = next(reader.make_iterator(directory, plain, process_index=0, process_count=1))
  assert "mask" not in batch  # masked records train as ordinary ones


def test_without_augmentation_the_mask_is_resized_with_the_input(tmp_path):
  directory = str(tmp_path / "ds")
  with writer.DatasetWriter(directory) as w:
    w.write(masked_triplet(0))
  config = reader.ReaderConfig(batch_size=1, num_epochs=1, augment=False, include_mask=True,
                               resolution=32, min_resize=32, max_resize=32)
  batch = next(reader.make_iterator(directory, config, process_index=0, process_count=1))
  np.testing.assert_allclose(batch["mask"][0, ..., 0] * 2 - 1, batch["input"][0, ..., 0],
                             atol=1e-5)


def test_a_mask_must_be_png_of_the_input_size():
  t = masked_triplet(0)
  t.mask = fx.encode(fx.pattern(0, 48, 80)[..., 0], "jpeg")
  with pytest.raises(InputError, match="must be PNG"):
    schema.to_record(t)
  t.mask = fx.encode(fx.pattern(0, 40, 80)[..., 0])
  with pytest.raises(InputError, match=r"is \(40, 80\) \(h, w\), input_image \(48, 80\)"):
    schema.to_record(t)


MAGICBRUSH_SCHEMA = pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()),
                               ("source_img", HF_IMAGE), ("mask_img", HF_IMAGE),
                               ("instruction", pa.string()), ("target_img", HF_IMAGE)])


def test_magicbrush_masks_and_turns_are_imported(tmp_path, capsys):
  rows = []
  for i in range(4):
    image = fx.pattern(i, 64, 64)
    mask = np.where(image[..., 0:1] > 127, 255, 0).astype(np.uint8).repeat(3, axis=2)
    rows.append({"img_id": f"{327726 + i // 2}", "turn_index": 1 + i % 2,
                 "source_img": hf_image(fx.encode(image)),
                 "mask_img": hf_image(fx.encode(mask) if i != 2 else fx.encode(mask[:32])),
                 "instruction": f"example {i}", "target_img": hf_image(fx.encode(255 - image))})
  rows[3]["mask_img"] = None
  write_parquet(tmp_path / "train-00000-of-00001.parquet", rows, MAGICBRUSH_SCHEMA)
  out = tmp_path / "out"
  assert import_data.main(["magicbrush", str(tmp_path / "train-00000-of-00001.parquet"),
                           "--out", str(out), "--store-resolution", "32"]) == 0
  assert "mask size differs from the input image's: 1" in capsys.readouterr().out
  triplets = list(reader.iter_triplets(str(out)))
  assert [(t.source_id, t.turn_index) for t in triplets] == [
      ("327726/1", 1), ("327726/2", 2), ("327727/2", 2)]
  assert triplets[2].mask == b""
  mask = Image.open(io.BytesIO(triplets[0].mask))
  assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (32, 32))
  # Nearest resize of the source's mask: every other pixel, still binary.
  expected = np.where(fx.pattern(0, 64, 64)[1::2, 1::2, 0] > 127, 255, 0)
  np.testing.assert_array_equal(np.asarray(mask), expected)


def test_ultraedit_region_masks_and_free_form_nulls(tmp_path, capsys):
  from tests.data.test_parquet_presets import ULTRAEDIT_SCHEMA, ultraedit_rows
  region = ULTRAEDIT_SCHEMA.set(ULTRAEDIT_SCHEMA.get_field_index("mask_image"),
                                pa.field("mask_image", HF_IMAGE))
  rows = ultraedit_rows(2)
  rows[0]["mask_image"] = hf_image(fx.encode(fx.pattern(9, 64, 64)[..., 0]))
  write_parquet(tmp_path / "RegionBased_0-00000.parquet", rows, region)
  write_parquet(tmp_path / "FreeForm_0-00000.parquet", ultraedit_rows(2), ULTRAEDIT_SCHEMA)
  out = tmp_path / "out"
  assert import_data.main(["parquet", str(tmp_path), "--preset", "ultraedit", "--out",
                           str(out)]) == 0
  masks = [t.mask for t in reader.iter_triplets(str(out))]
  assert masks[2] == fx.encode(fx.pattern(9, 64, 64)[..., 0])  # a grayscale PNG stays as it is
  assert masks[0] == masks[1] == masks[3] == b""
  dropped = tmp_path / "dropped"
  assert import_data.main(["parquet", str(tmp_path), "--preset", "ultraedit", "--map", "mask=",
                           "--out", str(dropped)]) == 0
  assert [t.mask for t in reader.iter_triplets(str(dropped))] == [b""] * 4
