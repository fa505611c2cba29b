"""`jip2p-import parquet`: the column mapping, score filters, list prompts and each preset, on
parquet files written here with the column names and types the datasets' cards publish."""

import io
import math

import pyarrow as pa
import pytest
from PIL import Image

from jip2p.cli import import_data
from jip2p.data import importers, reader, writer
from tests import cli_errors
from tests.data import triplet_fixtures as fx
from tests.data.test_data_importers import HF_IMAGE, hf_image, kill_import, write_parquet

pytestmark = pytest.mark.tf


def run(capsys, *argv):
  code = import_data.main(["parquet", *map(str, argv)])
  out = capsys.readouterr()
  assert code == 0, out.err
  return out.out


def stored(out, split="train"):
  return list(reader.iter_triplets(str(out), split))


# ---------------------------------------------------------------- UltraEdit

ULTRAEDIT_SCHEMA = pa.schema(
    [(c, pa.float64()) for c in ("clip_sim_source", "clip_sim_target", "clip_sim_dir",
                                  "clip_sim_image", "dinov2_sim", "ssim")]
    + [("source_caption", pa.string()), ("target_caption", pa.string()), ("idx", pa.int64()),
       ("edit_prompt", pa.string()), ("edit_object", pa.null()), ("source_image", HF_IMAGE),
       ("edited_image", HF_IMAGE), ("mask_image", pa.null())])


def ultraedit_rows(n=6):
  rows = []
  for i in range(n):
    t = fx.triplet(i)
    rows.append({"clip_sim_source": 0.3, "clip_sim_target": 0.31, "clip_sim_dir": 0.1 * i,
                 "clip_sim_image": 0.8, "dinov2_sim": 0.9, "ssim": 0.7,
                 "source_caption": t.input_caption, "target_caption": t.edited_caption,
                 "idx": 1000 + i, "edit_prompt": t.instruction, "edit_object": None,
                 "source_image": hf_image(t.input_image), "edited_image": hf_image(t.edited_image),
                 "mask_image": None})
  return rows


def test_ultraedit_preset_keeps_scores_and_filters_on_them(tmp_path, capsys):
  write_parquet(tmp_path / "FreeForm_0-00000-of-00002.parquet", ultraedit_rows(), ULTRAEDIT_SCHEMA)
  out = tmp_path / "out"
  report = run(capsys, tmp_path / "FreeForm_0-00000-of-00002.parquet", "--out", out, "--preset",
               "ultraedit", "--where", "clip_sim_dir>0.25", "--where", "ssim>=0.5")
  assert "rows read: 6" in report and "filtered out by clip_sim_dir>0.25: 3" in report
  triplets = stored(out)
  assert [t.source_id for t in triplets] == ["1003", "1004", "1005"]
  t = triplets[0]
  assert (t.instruction, t.input_caption) == ("example 3", "a photo number 3")
  assert t.input_image == fx.triplet(3).input_image and t.source == "ultraedit"
  assert (t.clip_sim_0, t.clip_sim_1, t.clip_sim_image) == pytest.approx((0.3, 0.31, 0.8))
  assert t.clip_sim_direction == pytest.approx(0.3)


# ---------------------------------------------------------------- HQ-Edit

HQ_EDIT_SCHEMA = pa.schema([("input", pa.string()), ("input_image", HF_IMAGE),
                            ("edit", pa.string()), ("inverse_edit", pa.string()),
                            ("output", pa.string()), ("output_image", HF_IMAGE)])


def test_hq_edit_preset_with_and_without_the_inverse_pair(tmp_path, capsys):
  rows = [{"input": f"a photo number {i}", "input_image": hf_image(fx.triplet(i).input_image),
           "edit": f"example {i}", "inverse_edit": f"undo {i}",
           "output": f"a negative of photo number {i}",
           "output_image": hf_image(fx.triplet(i).edited_image)} for i in range(3)]
  write_parquet(tmp_path / "HQ-Edit_1.parquet", rows, HQ_EDIT_SCHEMA)
  run(capsys, tmp_path / "HQ-Edit_1.parquet", "--out", tmp_path / "plain", "--preset", "hq-edit")
  assert [t.instruction for t in stored(tmp_path / "plain")] == [f"example {i}" for i in range(3)]
  run(capsys, tmp_path / "HQ-Edit_1.parquet", "--out", tmp_path / "both", "--preset", "hq-edit",
      "--map", "inverse_instruction=inverse_edit")
  triplets = stored(tmp_path / "both")
  assert [t.instruction for t in triplets] == ["example 0", "undo 0", "example 1", "undo 1",
                                               "example 2", "undo 2"]
  inverse = triplets[1]
  assert inverse.input_image == fx.triplet(0).edited_image
  assert inverse.edited_image == fx.triplet(0).input_image
  assert (inverse.input_caption, inverse.edited_caption) == ("a negative of photo number 0",
                                                             "a photo number 0")


# ---------------------------------------------------------------- OmniEdit

OMNIEDIT_SCHEMA = pa.schema([("omni_edit_id", pa.string()), ("task", pa.string()),
                             ("src_img", HF_IMAGE), ("edited_img", HF_IMAGE),
                             ("edited_prompt_list", pa.list_(pa.string())),
                             ("width", pa.int64()), ("height", pa.int64()),
                             ("sc_score_1", pa.int64()), ("sc_score_2", pa.int64()),
                             ("sc_reasoning", pa.string()), ("pq_score", pa.int64()),
                             ("pq_reasoning", pa.string()), ("o_score", pa.float64())])


def omniedit_rows():
  rows = []
  for i in range(4):
    image = fx.pattern(i, 48, 80)  # not square: OmniEdit keeps every aspect ratio
    rows.append({"omni_edit_id": f"omni-{i}", "task": "swap", "src_img": hf_image(fx.encode(image)),
                 "edited_img": hf_image(fx.encode(255 - image)),
                 "edited_prompt_list": [f"first {i}", f"second {i}"], "width": 80, "height": 48,
                 "sc_score_1": 9, "sc_score_2": 8, "sc_reasoning": "ok", "pq_score": 9,
                 "pq_reasoning": "ok", "o_score": 8.0 + 0.5 * i})
  return rows


def test_omniedit_preset_one_triplet_per_prompt_or_the_first(tmp_path, capsys):
  write_parquet(tmp_path / "train-00000.parquet", omniedit_rows(), OMNIEDIT_SCHEMA)
  run(capsys, tmp_path / "train-00000.parquet", "--out", tmp_path / "first", "--preset",
      "omniedit", "--where", "o_score>=9")
  first = stored(tmp_path / "first")
  assert [(t.source_id, t.instruction) for t in first] == [("omni-2", "first 2"),
                                                           ("omni-3", "first 3")]
  assert Image.open(io.BytesIO(first[0].input_image)).size == (80, 48)
  report = run(capsys, tmp_path / "train-00000.parquet", "--out", tmp_path / "each", "--preset",
               "omniedit", "--prompts", "each")
  assert "written: train=8" in report
  each = stored(tmp_path / "each")
  assert [t.instruction for t in each[:4]] == ["first 0", "second 0", "first 1", "second 1"]
  assert each[1].source_id == "omni-0#1"


# ---------------------------------------------------------------- AnyEdit

ANYEDIT_SCHEMA = pa.schema([("image_id", pa.string()), ("edit_instruction", pa.string()),
                            ("edit_type", pa.string()), ("image_file", HF_IMAGE),
                            ("edited_file", HF_IMAGE), ("visual_input", HF_IMAGE),
                            ("input", pa.string()), ("output", pa.string())])


def test_anyedit_preset_selects_edit_types_and_skips_visual_inputs(tmp_path, capsys):
  types = ["remove", "add", "remove", "visual_sketch", "remove"]
  rows = []
  for i, edit_type in enumerate(types):
    t = fx.triplet(i)
    rows.append({"image_id": f"img{i}", "edit_instruction": t.instruction, "edit_type": edit_type,
                 "image_file": hf_image(t.input_image), "edited_file": hf_image(t.edited_image),
                 "visual_input": hf_image(t.input_image) if edit_type.startswith("visual")
                 else None, "input": t.input_caption, "output": t.edited_caption})
  rows[4]["visual_input"] = hf_image(fx.triplet(4).input_image)
  write_parquet(tmp_path / "train-00000-of-00007.parquet", rows, ANYEDIT_SCHEMA)
  report = run(capsys, tmp_path / "train-00000-of-00007.parquet", "--out", tmp_path / "out",
               "--preset", "anyedit", "--where", "edit_type==remove")
  assert "visual_input is set: 2" in report and "filtered out by edit_type==remove: 1" in report
  assert [t.source_id for t in stored(tmp_path / "out")] == ["img0", "img2"]


# ---------------------------------------------------------------- Emu Edit

EMU_EDIT_SCHEMA = pa.schema([("instruction", pa.string()), ("image", HF_IMAGE),
                             ("task", pa.string()), ("split", pa.string()), ("idx", pa.int64()),
                             ("hash", pa.string()), ("input_caption", pa.string()),
                             ("output_caption", pa.string()), ("edited_image", HF_IMAGE),
                             ("model", pa.string())])


def test_emu_edit_preset_into_a_fixed_split(tmp_path, capsys):
  rows = [{"instruction": f"example {i}", "image": hf_image(fx.triplet(i).input_image),
           "task": ["background", "global"][i % 2], "split": "validation", "idx": i,
           "hash": f"h{i}", "input_caption": f"a photo number {i}",
           "output_caption": f"a negative of photo number {i}",
           "edited_image": hf_image(fx.triplet(i).edited_image), "model": "emu_edit"}
          for i in range(4)]
  write_parquet(tmp_path / "validation-00000-of-00001.parquet", rows, EMU_EDIT_SCHEMA)
  run(capsys, tmp_path / "validation-00000-of-00001.parquet", "--out", tmp_path / "out",
      "--preset", "emu-edit", "--split", "validation", "--where", "task==background")
  triplets = stored(tmp_path / "out", "validation")
  assert [(t.source_id, t.edited_caption) for t in triplets] == [
      ("0", "a negative of photo number 0"), ("2", "a negative of photo number 2")]
  assert set(writer.read_manifest(str(tmp_path / "out"))["splits"]) == {"validation"}


# ---------------------------------------------------------------- the generic mapping


def test_generic_mapping_reads_path_and_binary_image_columns(tmp_path, capsys):
  (tmp_path / "images").mkdir()
  rows = []
  for i in range(4):
    t = fx.triplet(i)
    (tmp_path / "images" / f"{i}.png").write_bytes(t.input_image)
    rows.append({"before": f"images/{i}.png", "after": t.edited_image, "prompt": t.instruction,
                 "session": f"s{i // 2}", "turn": i % 2, "score": float(i)})
  schema = pa.schema([("before", pa.string()), ("after", pa.binary()), ("prompt", pa.string()),
                      ("session", pa.string()), ("turn", pa.int16()), ("score", pa.float32())])
  write_parquet(tmp_path / "mine.parquet", rows, schema)
  out = tmp_path / "out"
  run(capsys, tmp_path / "mine.parquet", "--out", out, "--map",
      "input=before,edited=after,instruction=prompt,id=session+turn,group=session,"
      "turn_index=turn,clip_sim_direction=score", "--where", "score!=2", "--val-fraction", "0.5")
  splits = writer.read_manifest(str(out))["splits"]
  triplets = [t for split in splits for t in stored(out, split)]
  by_id = {t.source_id: t for t in triplets}
  assert sorted(by_id) == ["s0/0", "s0/1", "s1/1"]
  assert by_id["s0/1"].input_image == fx.triplet(1).input_image
  assert by_id["s1/1"].turn_index == 1 and by_id["s1/1"].clip_sim_direction == 3.0
  assert by_id["s0/0"].source == "parquet" and math.isnan(by_id["s0/0"].clip_sim_0)
  # A session never straddles splits.
  splits = {importers.assign_split(t.source_id.split("/")[0], 0.5) for t in triplets
            if t.source_id.startswith("s0")}
  assert len(splits) == 1


def test_a_killed_import_of_list_prompts_resumes_to_the_uninterrupted_result(tmp_path):
  """--prompts each makes several triplets of one parquet row; a kill between them resumes."""
  write_parquet(tmp_path / "train-00000.parquet", omniedit_rows() * 2, OMNIEDIT_SCHEMA)
  args = ["parquet", str(tmp_path / "train-00000.parquet"), "--preset", "omniedit", "--prompts",
          "each", "--where", "o_score>8", "--val-fraction", "0.4", "--examples-per-shard", "2"]
  assert import_data.main(args + ["--out", str(tmp_path / "straight")]) == 0
  killed = tmp_path / "killed"
  kill_import(args + ["--out", str(killed)], at_write=7)  # between the two prompts of one row
  assert import_data.main(args + ["--out", str(killed)]) == 0
  straight = writer.read_manifest(str(tmp_path / "straight"))
  assert writer.read_manifest(str(killed))["splits"] == straight["splits"]
  assert sum(info["num_examples"] for info in straight["splits"].values()) == 12


@pytest.mark.parametrize("argv, expected", [
    (["--map", "input=a,edited=b"], "--map lacks the roles ['instruction']"),
    (["--map", "input=a,edited=b,instruction=c,colour=d"], "--map role 'colour' is unknown"),
    (["--preset", "ultraedit", "--where", "clip_sim_dir~0.2"], "expected COLUMN OP VALUE"),
    (["--preset", "ultraedit", "--where", "clip_sim_dir>high"], "'high' is not a number"),
    (["--preset", "ultraedit", "--where", "source_caption>0.2"],
     "column 'source_caption' holds string; expected numbers"),
    (["--preset", "hq-edit"], "missing columns ['input_image', 'output_image', 'edit'"),
    (["--preset", "ultraedit", "--map", "instruction=ssim"],
     "column 'ssim' holds double; expected text or a list of text"),
])
def test_mapping_mistakes_are_one_named_line(argv, expected, tmp_path, capsys):
  write_parquet(tmp_path / "u.parquet", ultraedit_rows(2), ULTRAEDIT_SCHEMA)
  out = tmp_path / "out"
  code = import_data.main(["parquet", str(tmp_path / "u.parquet"), "--out", str(out), *argv])
  line = cli_errors.named_error(capsys.readouterr().err, code, "jip2p-import")
  assert expected in line
  assert not out.exists()


def test_a_rerun_with_another_filter_is_refused(tmp_path, capsys):
  write_parquet(tmp_path / "u.parquet", ultraedit_rows(4), ULTRAEDIT_SCHEMA)
  args = ["parquet", str(tmp_path / "u.parquet"), "--out", str(tmp_path / "out"), "--preset",
          "ultraedit"]
  assert import_data.main(args + ["--where", "clip_sim_dir>0.1"]) == 0
  capsys.readouterr()
  code = import_data.main(args + ["--where", "clip_sim_dir>0.2"])
  line = cli_errors.named_error(capsys.readouterr().err, code, "jip2p-import")
  assert "where=['clip_sim_dir>0.1']" in line and "resuming would mix two imports" in line
