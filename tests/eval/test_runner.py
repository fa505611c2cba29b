"""The evaluation runner with a stand-in editor and scorer: seeds, batching, resuming, multi-turn
sessions, every metric against its hand computation, the summary CSV and the trade-off plot.
No torch, no TensorFlow (the real sidecar and model are in test_eval_end_to_end.py)."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from jip2p.errors import ConfigError
from jip2p.eval import paper_metrics, sets, sweep
from jip2p.eval.runner import RESULTS, RunConfig, Setting, evaluate
from tests.eval import parquet_fixtures as fx


class FakeEditor:
  """Edit j of a call with seed s: the image plus (s + j) % 5 + 10·s_I, clipped; logs each edit."""

  size_multiple = 64  # An SD model's: the runner resizes inputs to multiples of it.

  def __init__(self):
    self.edits = []  # (instruction, seed, s_I, input copy)

  def __call__(self, images, instructions, *, seed, image_guidance, resolution, batch_size,
               **kwargs):
    assert resolution is None and kwargs["steps"] == 2
    out = []
    for j, (image, instruction) in enumerate(zip(images, instructions)):
      image = np.asarray(image)
      assert image.shape[0] % 64 == 0 and image.shape[1] % 64 == 0
      self.edits.append((instruction, seed + j, image_guidance, image.copy()))
      shift = (seed + j) % 5 + int(round(10 * image_guidance))
      out.append(Image.fromarray(np.clip(image.astype(int) + shift, 0, 255).astype(np.uint8)))
    return out


def clip_features(images):
  x = np.stack([np.asarray(im, np.float64).mean((0, 1)) for im in images])
  return np.concatenate([x / 255.0, np.ones((len(x), 1))], axis=1)


def dino_features(images):
  x = np.stack([[np.asarray(im, np.float64).mean(), np.asarray(im, np.float64).std(), 1.0]
                for im in images])
  return x


def text_features(texts):
  return np.array([[len(t), sum(c in "aeiou" for c in t), 1.0, t.count(" ")] for t in texts],
                  np.float64)[:, :4]


class FakeScorer:
  """CLIP / DINO stand-ins that are functions of the pixels and the text (features of width 4
  for CLIP images and texts, 3 for DINO); counts the images it encodes."""
  info = {"model": "fake-clip", "dino": {"model": "fake-dino"}}

  def __init__(self):
    self.encoded = 0

  def encode_images(self, images):
    self.encoded += len(images)
    return clip_features(images)

  def encode_dino(self, images):
    return dino_features(images)

  def encode_texts(self, texts):
    return text_features(texts)


CONFIG = RunConfig(steps=2, resolution=64, seed=100, batch_size=3)


@pytest.fixture
def emu(tmp_path):
  path = str(tmp_path / "emu.parquet")
  fx.write_emu_edit(path, n=7)
  return sets.emu_edit_set(path)


def read_results(folder):
  with open(os.path.join(folder, RESULTS)) as f:
    return [json.loads(line) for line in f]


def test_seeds_and_rows_do_not_depend_on_batching(emu, tmp_path):
  settings = [Setting(7.5, 1.0, "image"), Setting(7.5, 2.0, "image")]
  editor = FakeEditor()
  rows = evaluate(editor, emu, settings, str(tmp_path / "a"), config=CONFIG,
                  scorer=FakeScorer(), progress=False)
  assert len(rows) == 14 and len(editor.edits) == 14
  assert [r["seed"] for r in rows] == list(range(100, 107)) * 2  # edit f uses seed + f
  assert [e[1] for e in editor.edits] == list(range(100, 107)) * 2
  other = evaluate(FakeEditor(), emu, settings, str(tmp_path / "b"),
                   config=RunConfig(steps=2, resolution=64, seed=100, batch_size=2),
                   scorer=FakeScorer(), progress=False)
  assert other == rows
  assert read_results(tmp_path / "a") == rows


def test_every_metric_equals_its_hand_computation(emu, tmp_path):
  [row] = evaluate(FakeEditor(), sets.EvalSet("emu", emu.sessions[3:4], group_name="task"),
                   [Setting(7.5, 1.5)], str(tmp_path), config=RunConfig(steps=2, resolution=64,
                                                                         seed=100),
                   scorer=FakeScorer(), progress=False)
  turn = emu.sessions[3].turns[0]
  model_input = np.full((64, 64, 3), 13, np.uint8)  # 40×32 grey 13 → the editor's 64×64
  output = model_input + np.uint8(100 % 5 + 15)
  f_in, f_out = clip_features([model_input]), clip_features([output])
  t_in, t_out = text_features([turn.input_caption]), text_features([turn.output_caption])
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  assert row["clip_img"] == pytest.approx(cos(f_in[0], f_out[0]))
  assert row["clip_dir"] == pytest.approx(cos(f_out[0] - f_in[0], t_out[0] - t_in[0]))
  assert row["clip_out"] == pytest.approx(cos(f_out[0], t_out[0]))
  assert row["dino"] == pytest.approx(cos(dino_features([model_input])[0],
                                          dino_features([output])[0]))
  assert row["l1"] == pytest.approx(15 / 255)
  assert row["group"] == turn.group == "add" and row["seed"] == 100
  for absent in ("l1_gt", "l2_gt", "clip_i", "dino_gt", "clip_t", "world_success"):
    assert absent not in row  # Emu Edit has no targets


def test_ground_truth_metrics_on_magicbrush(tmp_path):
  path = str(tmp_path / "mb.parquet")
  fx.write_magicbrush(path)
  captions = tmp_path / "captions.json"
  captions.write_text(json.dumps(fx.MAGICBRUSH_CAPTIONS))
  mb = sets.magicbrush_set(path, "single", captions=str(captions))
  rows = evaluate(FakeEditor(), mb, [Setting(7.5, 1.0)], str(tmp_path / "out"),
                  config=CONFIG, scorer=FakeScorer(), progress=False)
  row = rows[2]  # img 7, turn 2: source 27, target 37 (32 px → 64 px), seed 102
  output = np.full((64, 64, 3), 27 + 102 % 5 + 10, np.uint8)
  target = np.full((32, 32, 3), 37, np.uint8)
  assert row["key"] == "magicbrush-7-2"
  assert row["l1_gt"] == pytest.approx(2 / 255) and row["l2_gt"] == pytest.approx((2 / 255) ** 2)
  assert row["clip_i"] == pytest.approx(float(paper_metrics.cosine(clip_features([target]),
                                                             clip_features([output]))[0]))
  assert row["clip_t"] == row["clip_out"] == pytest.approx(float(paper_metrics.cosine(
      clip_features([output]), text_features(["seven after two"]))[0]))
  assert row["dino_gt"] == pytest.approx(float(paper_metrics.cosine(dino_features([target]),
                                                              dino_features([output]))[0]))


def test_multi_turn_sessions_edit_their_own_outputs(tmp_path):
  path = str(tmp_path / "mb.parquet")
  fx.write_magicbrush(path)
  mb = sets.magicbrush_set(path, "multi")
  editor = FakeEditor()
  rows = evaluate(editor, mb, [Setting(7.5, 1.0)], str(tmp_path / "out"), config=CONFIG,
                  scorer=FakeScorer(), progress=False)
  assert [(r["session"], r["turn"], r["seed"]) for r in rows] == [
      ("magicbrush-5", 0, 100), ("magicbrush-7", 0, 101), ("magicbrush-7", 1, 102),
      ("magicbrush-7", 2, 103)]
  inputs = [int(e[3][0, 0, 0]) for e in editor.edits]
  # Session 7 starts from its first source (17); each turn adds seed % 5 + 10 (s_I = 1).
  assert inputs == [15, 17, 17 + 11, 17 + 11 + 12]
  thresholded = FakeEditor()
  rows = evaluate(thresholded, mb, [Setting(7.5, 1.0)], str(tmp_path / "thr"),
                  config=RunConfig(steps=2, resolution=64, seed=100, threshold=0.5),
                  scorer=None, progress=False)
  assert [int(e[3][0, 0, 0]) for e in thresholded.edits] == [15, 17, 17, 17]  # all undone
  assert all(r["l1"] == 0 for r in rows)


def test_resume_skips_finished_sessions_and_repairs_a_cut_file(emu, tmp_path):
  out = str(tmp_path / "out")
  first = [Setting(7.5, 1.0, "image")]
  full = evaluate(FakeEditor(), emu, first, out, config=CONFIG, scorer=FakeScorer(),
                  progress=False)
  results = os.path.join(out, RESULTS)
  with open(results, "rb") as f:
    data = f.read()
  with open(results, "wb") as f:  # a crash: the last two sessions lost, the line before cut
    f.write(data[:data.rfind(b"\n", 0, data.rfind(b"\n", 0, len(data) - 1)) - 10])
  editor = FakeEditor()
  both = first + [Setting(7.5, 2.0, "image")]
  rows = evaluate(editor, emu, both, out, config=CONFIG, scorer=FakeScorer(), progress=False)
  assert [(e[1], e[2]) for e in editor.edits] == [(104, 1.0), (105, 1.0), (106, 1.0)] + [
      (100 + f, 2.0) for f in range(7)]
  assert rows[:7] == full
  assert read_results(out) == sorted(rows, key=lambda r: (r["image_guidance"] == 2.0,
                                                          r["seed"]))
  again = FakeEditor()
  assert evaluate(again, emu, both, out, config=CONFIG, scorer=FakeScorer(),
                  progress=False) == rows
  assert again.edits == []
  with pytest.raises(ConfigError, match=r"holds results of another run \(steps 2 there, 3 now"):
    evaluate(FakeEditor(), emu, both, out, config=RunConfig(steps=3, resolution=64, seed=100),
             progress=False)


def test_set_images_and_captions_are_encoded_once_for_all_settings(emu, tmp_path):
  scorer = FakeScorer()
  evaluate(FakeEditor(), emu, sweep.settings("image", image_values=(1.0, 1.5, 2.0)),
           str(tmp_path), config=CONFIG, scorer=scorer, progress=False)
  assert scorer.encoded == 7 + 3 * 7  # inputs once, outputs per setting


def test_world_set_with_a_perfect_editor(tmp_path):
  class Perfect:
    size_multiple = 64

    def __call__(self, images, instructions, **kwargs):
      return [truth[i] for i in instructions]

  world = sets.world_set(12, seed=2, size=64)
  truth = {s.turns[0].instruction: s.turns[0].load_target() for s in world.sessions}
  assert len(truth) == 12
  rows = evaluate(Perfect(), world, [Setting(7.5, 1.5)], str(tmp_path),
                  config=RunConfig(steps=2, resolution=64), progress=False)
  assert all(r["world_success"] == 1.0 and r["l1_gt"] == 0.0 for r in rows)
  assert all(r["world_psnr"] == 100.0 for r in rows)


def test_summary_csv_and_tradeoff_plot(emu, tmp_path):
  settings = sweep.settings("both", image_values=(1.0, 2.0), text_values=(5.0, 7.5))
  assert [s.key for s in settings] == ["sT7.5_sI1", "sT7.5_sI2", "sT5_sI1.5", "sT7.5_sI1.5"]
  rows = evaluate(FakeEditor(), emu, settings, str(tmp_path), config=CONFIG,
                  scorer=FakeScorer(), progress=False)
  table = sweep.summary_table(rows, settings, group_key="group")
  assert [(e["setting"], e["group"]) for e in table[:4]] == [
      ("sT7.5_sI1", "all"), ("sT7.5_sI1", "add"), ("sT7.5_sI1", "background"),
      ("sT7.5_sI1", "remove")]
  first = [r for r in rows if r["setting"] == "sT7.5_sI1"]
  want = paper_metrics.mean_ci([r["clip_dir"] for r in first])
  assert (table[0]["clip_dir"], table[0]["clip_dir_low"], table[0]["n"]) == (
      pytest.approx(want.mean), pytest.approx(want.low), 7)
  assert table[1]["n"] == 3  # tasks of rows 0, 3, 6
  path = str(tmp_path / "summary.csv")
  sweep.write_csv(table, path)
  with open(path) as f:
    read = list(csv.DictReader(f))
  assert len(read) == 16 and float(read[0]["clip_dir"]) == pytest.approx(want.mean)
  assert "world_success" not in read[0]
  png, svg = str(tmp_path / "t.png"), str(tmp_path / "t.svg")
  assert sweep.plot_tradeoff(table, [png, svg], title="fake", error_bars=True)
  assert Image.open(png).size[0] > 500
  with open(svg) as f:
    text = f.read()
  for label in ("s_I=1", "s_I=2", "s_T=5", "CLIP image similarity"):
    assert label in text
  assert not sweep.plot_tradeoff([{**e, "clip_dir": math.nan} for e in table], [png])


class FakeSDEdit(FakeEditor):
  """SDEdit stand-in: the image plus (s + j) % 5 + 100·strength; logs (prompt, seed, strength)."""

  def __call__(self, images, prompts, *, seed, method, strength, resolution, batch_size, **kwargs):
    assert method == "sdedit" and resolution is None and kwargs["steps"] == 2
    out = []
    for j, (image, prompt) in enumerate(zip(images, prompts)):
      image = np.asarray(image)
      self.edits.append((prompt, seed + j, strength, image.copy()))
      shift = (seed + j) % 5 + int(round(100 * strength))
      out.append(Image.fromarray(np.clip(image.astype(int) + shift, 0, 255).astype(np.uint8)))
    return out


def test_sdedit_series_beside_instruct_pix2pix(emu, tmp_path):
  """SDEdit settings go to the text-to-image editor with each edit's output caption, on the same
  seeds as the InstructPix2Pix settings, and draw one more line of the paper's plot."""
  settings = (sweep.settings("image", image_values=(1.0, 2.0))
              + sweep.sdedit_settings((0.5, 0.8), text_guidance=7.5))
  assert [s.key for s in settings][2:] == ["sdedit_strength0.5_s7.5", "sdedit_strength0.8_s7.5"]
  ip2p, sdedit = FakeEditor(), FakeSDEdit()
  rows = evaluate(ip2p, emu, settings, str(tmp_path), config=CONFIG, scorer=FakeScorer(),
                  progress=False, sdedit_editor=sdedit)
  turns = [s.turns[0] for s in emu.sessions]
  assert [e[0] for e in ip2p.edits] == [t.instruction for t in turns] * 2
  assert [e[0] for e in sdedit.edits] == [t.output_caption for t in turns] * 2
  assert [e[1] for e in sdedit.edits] == [e[1] for e in ip2p.edits] == list(range(100, 107)) * 2
  assert [e[2] for e in sdedit.edits] == [0.5] * 7 + [0.8] * 7
  mine = [r for r in rows if r["setting"] == "sdedit_strength0.8_s7.5"]
  assert len(mine) == 7 and all(r["strength"] == 0.8 and r["series"] == "sdedit" for r in mine)
  assert mine[0]["l1"] == pytest.approx((100 % 5 + 80) / 255)
  table = sweep.summary_table(rows, settings, group_key=None)
  assert [e["strength"] for e in table] == [None, None, 0.5, 0.8]
  svg = str(tmp_path / "t.svg")
  assert sweep.plot_tradeoff(table, [svg])
  with open(svg) as f:
    text = f.read()
  for label in ("s_T = 7.5", "SDEdit, s = 7.5", "strength=0.5", "strength=0.8", "s_I=2"):
    assert label in text
  # Without a text-to-image editor, or a set without output captions, nothing runs.
  with pytest.raises(ConfigError, match="need an sdedit_editor"):
    evaluate(ip2p, emu, settings, str(tmp_path / "b"), config=CONFIG, progress=False)
  bare = sets.EvalSet("bare", [sets.Session("s", (sets.Turn("t", "make it red"),))])
  with pytest.raises(ConfigError, match="none for 1 of its edits"):
    evaluate(ip2p, bare, settings, str(tmp_path / "c"), config=CONFIG, progress=False,
             sdedit_editor=sdedit)
  with pytest.raises(ConfigError, match=r"\(0, 1\]"):
    sweep.sdedit_settings((0.5, 1.5))
