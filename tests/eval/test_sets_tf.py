"""The held-out split of our TFRecords as an evaluation set, and a run over it (TensorFlow side:
the set reads through `jip2p.data.reader`; the scorer is a stand-in, so no torch here)."""

import os

import numpy as np
import pytest

from jip2p.data import writer
from jip2p.errors import InputError
from jip2p.eval import sets
from jip2p.eval.runner import RunConfig, Setting, evaluate
from tests.data import triplet_fixtures as fx

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfrecords"))
  with writer.DatasetWriter(directory, examples_per_shard=2) as w:
    for i in range(5):
      w.write(fx.triplet(i), split="train" if i == 0 else "validation")
  return directory


def test_validation_split_as_an_evaluation_set(data_dir):
  held_out = sets.tfrecord_set(data_dir)
  assert held_out.name == "tfrecords:validation" and not held_out.multi_turn
  assert [s.key for s in held_out.sessions] == ["id-1", "id-2", "id-3", "id-4"]
  turn = held_out.sessions[1].turns[0]
  assert turn.instruction == "example 2"
  assert (turn.input_caption, turn.output_caption) == ("a photo number 2",
                                                       "a negative of photo number 2")
  np.testing.assert_array_equal(turn.load_image(), fx.pattern(2, 64, 64))
  np.testing.assert_array_equal(turn.load_target(), 255 - fx.pattern(2, 64, 64))
  assert len(sets.tfrecord_set(data_dir, limit=2).sessions) == 2
  with pytest.raises(InputError,
                     match=r"has no split 'test' \(it has \['train', 'validation'\]\)"):
    sets.tfrecord_set(data_dir, "test")


def test_a_perfect_editor_scores_zero_distance_to_the_targets(data_dir, tmp_path):
  held_out = sets.tfrecord_set(data_dir)
  targets = {s.turns[0].instruction: s.turns[0].load_target() for s in held_out.sessions}

  def perfect(images, instructions, **kwargs):
    return [targets[i] for i in instructions]

  perfect.size_multiple = 64  # What the runner resizes the inputs by, as an Editor has.
  rows = evaluate(perfect, held_out, [Setting(7.5, 1.5)], str(tmp_path),
                  config=RunConfig(steps=1, resolution=64), progress=False)
  assert [r["l1_gt"] for r in rows] == [0.0] * 4
  for row in rows:
    i = int(row["instruction"].split()[-1])
    want = np.abs((255 - fx.pattern(i, 64, 64)) / 255 - fx.pattern(i, 64, 64) / 255).mean()
    assert row["l1"] == pytest.approx(want)


def test_jip2p_eval_names_a_data_folder_that_does_not_exist(tmp_path, capsys):
  from jip2p.cli import eval as eval_cli
  missing = tmp_path / "missing"
  out = tmp_path / "out"
  code = eval_cli.main(["--model", str(tmp_path / "model"), "--set", "tfrecords", "--data",
                        str(missing), "--output", str(out)])
  err = capsys.readouterr().err
  assert code == 2 and "Traceback" not in err
  assert err.strip().splitlines()[-1] == (f"jip2p-eval: error: {missing} does not exist: expected "
                                          "a dataset folder (manifest.json or TFDS "
                                          "dataset_info.json)")
  assert os.listdir(tmp_path) == []
