"""Ground-truth metrics of the edit world: calibrated so truth passes and non-edits fail."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from jip2p.data import synthetic as sy
from jip2p.errors import InputError
from jip2p.eval import world_metrics as wm


def examples(size: int, n: int = 120, seed: int = 21, families=sy.FAMILIES):
  return list(sy.generate(n, seed=seed, size=size, split="heldout", families=families))


def success_by_family(outputs, exs) -> dict[str, float]:
  agg = wm.aggregate(wm.score(o, e) for o, e in zip(outputs, exs))
  assert set(agg["families"]) == {e.family for e in exs}
  return {f: s["success"] for f, s in agg["families"].items()} | {
      "overall": agg["overall"]["success"]}


@pytest.mark.parametrize("size", [64, 128])
def test_ground_truth_scores_full_success(size):
  exs = examples(size)
  rates = success_by_family([e.edited_image for e in exs], exs)
  assert set(rates.values()) == {1.0}, rates
  agg = wm.aggregate(wm.score(e.edited_image, e) for e in exs)
  assert agg["overall"]["psnr"] == wm.PSNR_CAP and agg["overall"]["n"] == len(exs)


@pytest.mark.parametrize("size", [64, 128])
def test_unedited_input_and_noise_score_zero(size):
  exs = examples(size)
  rng = np.random.default_rng(0)
  noise = [rng.integers(0, 256, e.input_image.shape, dtype=np.uint8) for e in exs]
  assert set(success_by_family([e.input_image for e in exs], exs).values()) == {0.0}
  assert set(success_by_family(noise, exs).values()) == {0.0}
  result = wm.score(exs[0].input_image, exs[0])
  assert not result["edit_ok"] and result["rest_ok"]  # nothing done, nothing broken


def jpeg(image: np.ndarray, quality: int = 90) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf))


def blur(image: np.ndarray) -> np.ndarray:
  size = image.shape[0]
  small = Image.fromarray(image).resize((size // 2, size // 2), Image.BILINEAR)
  return np.asarray(small.resize((size, size), Image.BILINEAR))


def test_soft_but_correct_outputs_still_succeed():
  """JPEG artefacts and blurred edges, as a learned model makes, do not count as failures."""
  exs = examples(64)
  rng = np.random.default_rng(1)
  noisy = [np.clip(e.edited_image + rng.normal(0, 12, e.edited_image.shape), 0, 255)
           .astype(np.uint8) for e in exs]
  for outputs in ([jpeg(e.edited_image) for e in exs], [blur(e.edited_image) for e in exs], noisy):
    assert success_by_family(outputs, exs)["overall"] >= 0.98


def test_wrong_edits_fail():
  recoloured = moved = 0
  for ex in examples(64, n=40, families=("recolour",)):
    wrong = next(c for c in sy.COLOURS if c not in (ex.edit.colour, ex.input_scene.background,
                                                     ex.input_scene.objects[ex.edit.target].colour))
    edit = dataclasses.replace(ex.edit, colour=wrong)
    try:
      out = sy.render(edit.apply(ex.input_scene), 64)
    except InputError:  # the wrong colour would clash with another object: skip that one
      continue
    result = wm.score(out, ex)
    assert not result["edit_ok"] and result["rest_ok"]
    recoloured += 1
  for ex in examples(64, n=40, families=("move",)):
    back = {"left": "right", "right": "left", "up": "down", "down": "up"}[ex.edit.direction]
    target = ex.input_scene.objects[ex.edit.target]
    if sy.moved(target, back).cell not in sy.PLACES or any(
        o.cell == sy.moved(target, back).cell for o in ex.input_scene.objects):
      continue
    out = sy.render(dataclasses.replace(ex.edit, direction=back).apply(ex.input_scene), 64)
    assert not wm.score(out, ex)["success"]
    moved += 1
  assert recoloured > 20 and moved > 5, (recoloured, moved)


def test_collateral_damage_fails_the_rest_check():
  """The right edit, plus a kept object erased, is not a success."""
  checked = 0
  for ex in examples(64, n=80):
    touched = {ex.edit.target, ex.edit.other}
    kept = [o for i, o in enumerate(ex.input_scene.objects) if i not in touched]
    if ex.family == "background" or not kept:
      continue
    out = ex.edited_image.copy()
    out[sy.object_mask(kept[0], 64)] = sy.COLOURS[ex.edited_scene.background]
    result = wm.score(out, ex)
    assert result["edit_ok"] and not result["rest_ok"] and not result["success"], ex.instruction
    checked += 1
  assert checked > 20


def test_psnr():
  ex = examples(64, n=1)[0]
  assert wm.psnr(ex.edited_image, ex.edited_image) == wm.PSNR_CAP
  value = wm.psnr(ex.input_image, ex.edited_image)
  assert 0 < value < wm.PSNR_CAP
  off_by_one = np.minimum(ex.edited_image.astype(np.int16) + 1, 255).astype(np.uint8)
  assert wm.psnr(off_by_one, ex.edited_image) >= 20 * np.log10(255)  # MSE <= 1
  # input_psnr: how close an output stays to the input (copying it is the closest).
  assert wm.score(ex.input_image, ex)["input_psnr"] == wm.PSNR_CAP
  assert wm.score(ex.edited_image, ex)["input_psnr"] == value
  agg = wm.aggregate([wm.score(ex.input_image, ex), wm.score(ex.edited_image, ex)])
  assert agg["overall"]["input_psnr"] == pytest.approx((wm.PSNR_CAP + value) / 2)
  with pytest.raises(InputError, match="uint8"):
    wm.psnr(ex.edited_image[:32], ex.edited_image)
  with pytest.raises(InputError, match="uint8"):
    wm.score(ex.edited_image.astype(np.float32), ex)


def test_result_and_aggregate_fields():
  exs = examples(64, n=12)
  results = [wm.score(e.edited_image, e) for e in exs]
  assert results[0]["family"] == exs[0].family
  assert results[0]["template_id"] == exs[0].template_id
  assert results[0]["edit_error"] == 0.0 and results[0]["rest_moved"] == 0.0
  agg = wm.aggregate(results)
  assert list(agg["families"]) == [f for f in sy.FAMILIES if f in agg["families"]]
  assert sum(s["n"] for s in agg["families"].values()) == agg["overall"]["n"] == 12
  with pytest.raises(InputError, match="no results"):
    wm.aggregate([])


def test_scoring_from_stored_meta_matches():
  """Records need only store ``Example.meta()``: the rebuilt example scores identically."""
  ex = examples(64, n=1)[0]
  back = sy.Example.from_meta(ex.meta())
  out = blur(ex.edited_image)
  assert wm.score(out, back) == wm.score(out, ex)


def test_drawings_score_objects_by_colour_shape_and_place():
  rng = np.random.default_rng(0)
  exact, wrong_shape, moved, noise = [], [], [], []
  for i in range(60):
    d = sy.drawing_at(i, seed=4, size=32)
    exact.append(wm.score_drawing(d.image, d.scene))
    first, rest = d.scene.objects[0], d.scene.objects[1:]
    other = next(s for s in sy.SHAPES if s != first.shape
                 and (first.colour, s) not in {(o.colour, o.shape) for o in rest})
    changed = dataclasses.replace(d.scene, objects=(dataclasses.replace(first, shape=other),) + rest)
    wrong_shape.append(wm.score_drawing(sy.render(changed, 32), d.scene))
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {o.cell for o in rest}
            and (r, c) != first.cell]
    shifted = dataclasses.replace(d.scene, objects=(dataclasses.replace(first, cell=free[0]),) + rest)
    moved.append(wm.score_drawing(sy.render(shifted, 32), d.scene))
    noise.append(wm.score_drawing(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), d.scene))
  assert wm.aggregate_drawings(exact)["object_accuracy"] == 1.0
  assert wm.aggregate_drawings(exact)["success"] == 1.0
  # The changed object is wrong in every scene; the others stay right.
  assert all(r["objects_ok"] == r["objects"] - 1 and not r["success"] for r in wrong_shape)
  assert all(r["objects_ok"] == r["objects"] - 1 and not r["success"] for r in moved)
  assert all(not r["background_ok"] for r in moved)  # the object drawn where none should be
  assert wm.aggregate_drawings(noise)["object_accuracy"] == 0.0
  assert wm.aggregate_drawings(noise)["success"] == 0.0
