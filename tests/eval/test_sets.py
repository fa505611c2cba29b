"""Evaluation sets from local files: Emu Edit and MagicBrush parquet (single- and multi-turn), the
procedural world; lazy image loading and the errors a user can cause. No torch, no TensorFlow."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jip2p.errors import ConfigError, InputError
from jip2p.eval import sets
from tests.eval import parquet_fixtures as fx


def test_emu_edit_set_reads_shards_lazily(tmp_path):
  folder = tmp_path / "emu"
  folder.mkdir()
  fx.write_emu_edit(str(folder / "test-00001.parquet"), n=3, first_idx=5)
  fx.write_emu_edit(str(folder / "test-00000.parquet"), n=5)
  emu = sets.emu_edit_set(str(folder))
  assert emu.name == "emu_edit" and emu.group_name == "task" and not emu.multi_turn
  assert [s.key for s in emu.sessions] == [f"emu-{i}" for i in range(8)]  # shards sorted
  turn = emu.sessions[6].turns[0]
  assert (turn.instruction, turn.group) == ("edit 1", "background")
  assert (turn.input_caption, turn.output_caption) == ("a photo 1", "an edited photo 1")
  assert turn.target is None and turn.load_target() is None
  image = turn.load_image()
  assert image.dtype == np.uint8 and image.shape == (32, 40, 3) and (image == 11).all()
  assert (emu.sessions[4].turns[0].load_image() == 14).all()  # another row group
  assert len(sets.emu_edit_set(str(folder), limit=2).sessions) == 2


def test_magicbrush_single_turn_uses_ground_truth_sources(tmp_path):
  path = str(tmp_path / "mb.parquet")
  fx.write_magicbrush(path)
  captions = tmp_path / "global_descriptions.json"
  captions.write_text(json.dumps(fx.MAGICBRUSH_CAPTIONS))
  mb = sets.magicbrush_set(path, "single", captions=str(captions))
  assert not mb.multi_turn and mb.num_turns == 4
  assert [s.key for s in mb.sessions] == ["magicbrush-5-1", "magicbrush-7-1", "magicbrush-7-2",
                                          "magicbrush-7-3"]
  turn = mb.sessions[2].turns[0]  # img 7, turn 2
  assert turn.instruction == "do 7/2"
  assert (turn.load_image() == 27).all() and (turn.load_target() == 37).all()
  assert (turn.input_caption, turn.output_caption) == ("seven after one", "seven after two")
  assert mb.sessions[0].turns[0].input_caption == "five before"


def test_magicbrush_multi_turn_groups_sessions_in_turn_order(tmp_path):
  path = str(tmp_path / "mb.parquet")
  fx.write_magicbrush(path)
  mb = sets.magicbrush_set(path, "multi")
  assert mb.multi_turn and [s.key for s in mb.sessions] == ["magicbrush-5", "magicbrush-7"]
  turns = mb.sessions[1].turns
  assert [t.instruction for t in turns] == ["do 7/1", "do 7/2", "do 7/3"]
  assert (turns[0].load_image() == 17).all()
  assert [int(t.load_target()[0, 0, 0]) for t in turns] == [27, 37, 47]
  assert turns[0].output_caption == ""  # no captions file: caption metrics do not apply


def test_world_set_carries_the_exact_truth():
  world = sets.world_set(6, seed=3, size=48)
  assert world.group_name == "family" and len(world.sessions) == 6
  turn = world.sessions[2].turns[0]
  ex = turn.example
  assert turn.group == ex.family and ex.split == "heldout"
  np.testing.assert_array_equal(turn.load_image(), ex.input_image)
  np.testing.assert_array_equal(turn.load_target(), ex.edited_image)
  assert turn.output_caption == ex.edited_caption and turn.load_image().shape == (48, 48, 3)


def test_errors_name_the_problem(tmp_path):
  path = tmp_path / "wrong.parquet"
  pq.write_table(pa.table({"instruction": ["x"], "image": [b"y"]}), str(path))
  with pytest.raises(InputError, match=r"wrong.parquet: missing columns \['task'"):
    sets.emu_edit_set(str(path))
  with pytest.raises(InputError, match="not a readable parquet file"):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    sets.emu_edit_set(str(tmp_path / "junk.parquet"))
  with pytest.raises(InputError, match="no such file or folder"):
    sets.emu_edit_set(str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match="mode must be one of"):
    sets.magicbrush_set(str(path), "double")
  bad_captions = tmp_path / "captions.json"
  bad_captions.write_text("[1, 2]")
  mb = str(tmp_path / "mb.parquet")
  fx.write_magicbrush(mb)
  with pytest.raises(InputError, match="global_descriptions.json"):
    sets.magicbrush_set(mb, captions=str(bad_captions))
  broken = tmp_path / "broken.parquet"
  pq.write_table(pa.table({"instruction": ["x"], "image": [{"bytes": b"garbage", "path": None}],
                           "task": ["add"], "input_caption": [""], "output_caption": [""]}),
                 str(broken))
  turn = sets.emu_edit_set(str(broken)).sessions[0].turns[0]
  with pytest.raises(InputError, match=r"broken.parquet, row 0, image: not a readable image"):
    turn.load_image()
