"""Metric functions against values worked out by hand, confidence intervals, and multi-turn
editing (seeds per turn, Emu Edit's thresholding). Pure numpy: neither torch nor TensorFlow."""

import math

import numpy as np
import pytest
from PIL import Image

from jip2p.errors import ConfigError, InputError
from jip2p.eval import multiturn, paper_metrics


def test_cosine_and_clip_metrics_by_hand():
  a = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
  b = np.array([[4.0, 3.0], [-2.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(paper_metrics.cosine(a, b), [24 / 25, -1.0, 0.0])  # zero vector → 0
  # Directional: image change (1, -1) against text change (2, -2) → 1; against (0, 3) → -1/√2.
  img_in, img_out = np.array([[1.0, 1.0]] * 2), np.array([[2.0, 0.0]] * 2)
  txt_in, txt_out = np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[2.0, -2.0], [1.0, 4.0]])
  np.testing.assert_allclose(
      paper_metrics.clip_directional_similarity(img_in, img_out, txt_in, txt_out),
      [1.0, -1 / math.sqrt(2)])
  np.testing.assert_allclose(paper_metrics.clip_image_similarity(img_in, img_out),
                             [1 / math.sqrt(2)] * 2)
  np.testing.assert_allclose(paper_metrics.clip_text_similarity(img_out, txt_out),
                             [1 / math.sqrt(2), 1 / math.sqrt(17)])
  np.testing.assert_allclose(paper_metrics.dino_similarity(a[:2], a[:2]), [1.0, 1.0])
  with pytest.raises(InputError, match=r"shapes \(3, 2\) and \(2, 2\)"):
    paper_metrics.cosine(a, b[:2])


def test_pixel_distances_by_hand():
  ref = np.zeros((4, 6, 3), np.uint8)
  out = np.zeros((4, 6, 3), np.uint8)
  out[:2] = 255  # half the pixels differ by 1.0 in [0, 1] units
  out[2:, :, 0] = 51  # a quarter of the rest's values differ by 0.2
  assert paper_metrics.l1_distance(out, ref) == pytest.approx(0.5 + 0.5 * 0.2 / 3)
  assert paper_metrics.l2_distance(out, ref) == pytest.approx(0.5 + 0.5 * 0.04 / 3)
  assert paper_metrics.l1_distance(ref, ref) == 0.0


def test_outputs_are_resized_to_the_reference_bicubic():
  rng = np.random.default_rng(0)
  out = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
  ref = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(out).resize((24, 16), Image.Resampling.BICUBIC))
  want = np.abs(resized / 255.0 - ref / 255.0).mean()
  assert paper_metrics.l1_distance(out, ref) == pytest.approx(want)
  with pytest.raises(InputError, match="uint8 \\[H, W, 3\\]"):
    paper_metrics.l1_distance(out.astype(np.float32), ref)


def test_mean_ci_is_students_t_interval():
  x = [0.1, 0.4, 0.35, 0.8, float("nan")]  # NaN: not applicable, left out
  m = paper_metrics.mean_ci(x, 0.95)
  values = np.array(x[:4])
  half = 3.182446305284263 * values.std(ddof=1) / 2  # t_{0.975, 3}
  assert m.n == 4
  assert m.mean == pytest.approx(values.mean())
  assert (m.low, m.high) == pytest.approx((values.mean() - half, values.mean() + half))
  one = paper_metrics.mean_ci([0.5])
  assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low)
  assert paper_metrics.mean_ci([]).n == 0
  with pytest.raises(InputError, match="confidence"):
    paper_metrics.mean_ci([1.0, 2.0], 1.5)


def test_summarize_groups_and_missing_metrics():
  rows = [{"group": "add", "l1": 0.1, "clip_t": None}, {"group": "add", "l1": 0.3},
          {"group": "remove", "l1": 0.5, "clip_t": 0.2}]
  out = paper_metrics.summarize(rows, ["l1", "clip_t"], group_key="group")
  assert list(out) == ["all", "add", "remove"]
  assert out["all"]["l1"].mean == pytest.approx(0.3) and out["all"]["l1"].n == 3
  assert out["add"]["l1"].mean == pytest.approx(0.2)
  assert out["all"]["clip_t"].n == 1 and out["add"]["clip_t"].n == 0


def test_box_filter_is_a_local_mean():
  rng = np.random.default_rng(1)
  x = rng.random((7, 9))
  got = multiturn.box_filter(x, 1)
  padded = np.pad(x, 1, mode="edge")
  want = np.mean([padded[i:i + 7, j:j + 9] for i in range(3) for j in range(3)], axis=0)
  np.testing.assert_allclose(got, want)
  np.testing.assert_array_equal(multiturn.box_filter(x, 0), x)


def test_threshold_keeps_previous_pixels_where_the_change_is_small():
  previous = np.full((20, 20, 3), 100, np.uint8)
  edited = previous.copy()
  edited += np.uint8(3)  # drift everywhere: 3/255 ≈ 0.012
  edited[5:15, 5:15] = 250  # the edit: a large change in a square
  out = multiturn.threshold_edit(previous, edited, threshold=0.1, radius=1)
  np.testing.assert_array_equal(out[7:13, 7:13], 250)  # the edit's interior is kept
  np.testing.assert_array_equal(out[0:3], 100)  # the drift far from it is undone
  assert (out[5:15, 5:15] == 250).all() and (out[:4] == 100).all()
  np.testing.assert_array_equal(multiturn.threshold_edit(previous, edited, 0.0), edited)
  with pytest.raises(ConfigError, match="threshold must be in"):
    multiturn.threshold_edit(previous, edited, 2.0)
  with pytest.raises(InputError, match="one shape"):
    multiturn.threshold_edit(previous, edited[:10], 0.1)


class ShiftEditor:
  """A stand-in editor: adds ``seed % 7`` to every pixel, and records its calls."""

  def __init__(self):
    self.calls = []

  def __call__(self, images, instructions, *, seed, resolution, **kwargs):
    self.calls.append((np.asarray(images[0]).copy(), instructions[0], seed, resolution, kwargs))
    pixels = np.asarray(images[0]).astype(np.int16) + seed % 7
    return [Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))]


def test_edit_sequence_chains_turns_with_consecutive_seeds():
  editor = ShiftEditor()
  image = np.full((64, 128, 3), 10, np.uint8)
  outs = multiturn.edit_sequence(editor, image, ["a", "b", "c"], seed=4, resolution=128,
                                 steps=3)
  assert [c[2] for c in editor.calls] == [4, 5, 6]
  assert [c[1] for c in editor.calls] == ["a", "b", "c"]
  assert editor.calls[0][4] == {"steps": 3}
  np.testing.assert_array_equal(editor.calls[1][0], np.asarray(outs[0]))  # turn 2 edits turn 1
  np.testing.assert_array_equal(np.asarray(outs[-1]), 10 + 4 + 5 + 6)
  assert outs[0].size == (128, 64)


def test_edit_sequence_with_threshold_drops_small_changes():
  editor = ShiftEditor()
  image = np.full((64, 64, 3), 10, np.uint8)
  outs = multiturn.edit_sequence(editor, image, ["a", "b"], seed=1, resolution=64,
                                 threshold=0.02)
  # Shifts of 1 and 2 (< 0.02·255 ≈ 5) are undone: every turn keeps the input.
  for out in outs:
    np.testing.assert_array_equal(np.asarray(out), 10)
  with pytest.raises(InputError, match="non-empty list"):
    multiturn.edit_sequence(editor, image, "just one string", seed=0)
