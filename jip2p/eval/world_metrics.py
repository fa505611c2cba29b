"""Scores an edit of the procedural world (`jip2p.data.synthetic`) against its exact ground truth.

An output succeeds when both hold:

- **edit done**: each region the edit is about has the requested colour: the mean colour of the
  region's interior is nearest, among the named colours, to the requested one and within
  ``Tolerances.colour`` of it. Regions per family: recolour: the object; remove: where it was,
  now background; add: the new object; move: the new place (the object's colour) and the old one
  (background); background: everything off the objects; swap: both objects, exchanged.
- **rest unchanged**: every object the edit does not touch keeps its colour (same test), and
  almost no pixel away from the edited region moves by more than ``Tolerances.pixel`` from the
  example's ``input_image`` (the exact render, or a generated drawing of the input scene).

Interiors are masks eroded by a margin of ``size // 64`` pixels (at least 1), and the "away"
part excludes the same margin around the edited region and every object boundary, so that soft
edges from a learned model are not counted. With the defaults the exact ground truth scores 100%,
the unedited input 0% and uniform noise 0% on every family.

A drawing of a caption (a text-to-image model's output, `score_drawing`) is scored per object:
its colour as above, on its own cell (so the place is right too), and its shape: the pixels of
the object's colour in its cell overlap the object's true shape more than any other shape (the
highest intersection over union). The background must show its colour off the objects, with
almost no pixel of another named colour there (no extra objects).

Besides, ``input_psnr`` measures how close the output stays to the input image as a whole: the
exact counterpart of the paper's CLIP image similarity, the axis along which s_I trades off.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from jip2p.data import synthetic
from jip2p.errors import InputError

PSNR_CAP = 100.0  # dB returned for identical images, so that means stay finite

_PALETTE_NAMES = list(synthetic.COLOURS)
_PALETTE = np.array([synthetic.COLOURS[c] for c in _PALETTE_NAMES], np.float64)


@dataclasses.dataclass(frozen=True)
class Tolerances:
  colour: float = 48.0  # RGB distance of a region's mean colour from the requested colour
  pixel: int = 48  # a pixel has "moved" when a channel differs from the input by more than this
  rest_fraction: float = 0.02  # the largest fraction of moved pixels away from the edit
  margin: int | None = None  # erosion / exclusion margin in pixels; None: max(1, size // 64)


def psnr(output: np.ndarray, target: np.ndarray) -> float:
  """PSNR in dB of two uint8 images, capped at `PSNR_CAP` (identical images)."""
  _check_pair(output, target)
  mse = np.mean((output.astype(np.float64) - target.astype(np.float64)) ** 2)
  return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))


def _check_pair(output: np.ndarray, target: np.ndarray) -> None:
  if output.dtype != np.uint8 or output.shape != target.shape or output.ndim != 3 \
      or output.shape[-1] != 3:
    raise InputError(f"expected a uint8 [H, W, 3] output shaped like the target {target.shape}, "
                     f"got {output.dtype} {output.shape}")


def _filter(mask: np.ndarray, r: int, reduce) -> np.ndarray:
  """Max (dilate) or min (erode) over a (2r+1)^2 square; the image border is edge-padded."""
  h, w = mask.shape
  padded = np.pad(mask, r, mode="edge")
  out = mask.copy()
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      out = reduce(out, padded[dy:dy + h, dx:dx + w])
  return out


def _colour_error(image: np.ndarray, mask: np.ndarray, colour: str) -> float:
  """Distance of the mask's mean colour from ``colour``; inf when another colour is nearer."""
  if not mask.any():
    return math.inf
  mean = image[mask].astype(np.float64).mean(0)
  dists = np.linalg.norm(_PALETTE - mean, axis=-1)
  nearest = _PALETTE_NAMES[int(np.argmin(dists))]
  return float(dists[_PALETTE_NAMES.index(colour)]) if nearest == colour else math.inf


def _edit_regions(example, size: int) -> list[tuple[np.ndarray, str]]:
  """(mask, colour it must show) for each region the edit is about."""
  scene, edit = example.input_scene, example.edit

  def mask(obj):
    return synthetic.object_mask(obj, size)

  target = None if edit.target is None else scene.objects[edit.target]
  if edit.family == "recolour":
    return [(mask(target), edit.colour)]
  if edit.family == "remove":
    return [(mask(target), scene.background)]
  if edit.family == "add":
    return [(mask(edit.new), edit.new.colour)]
  if edit.family == "move":
    return [(mask(synthetic.moved(target, edit.direction)), target.colour),
            (mask(target), scene.background)]
  if edit.family == "background":
    return [(synthetic.label_map(example.edited_scene, size) == 0, edit.colour)]
  other = scene.objects[edit.other]
  return [(mask(target), other.colour), (mask(other), target.colour)]


def score(output: np.ndarray, example: synthetic.Example,
          tol: Tolerances = Tolerances()) -> dict[str, Any]:
  """Scores one output (uint8 [H, W, 3], the example's size) against ``example``'s truth.

  Returns {family, template_id, success, edit_ok, rest_ok, psnr (vs the edited image),
  input_psnr (vs the input image), edit_error (worst colour distance among the edit's regions;
  inf when a region shows another named colour), rest_moved (fraction of moved pixels away from
  the edit)}.
  """
  _check_pair(output, example.edited_image)
  size = example.size
  r = tol.margin if tol.margin is not None else max(1, size // 64)

  def erode(mask):
    return _filter(mask, r, np.minimum)

  edit_error = max(_colour_error(output, erode(m), c) for m, c in _edit_regions(example, size))
  edit_ok = edit_error <= tol.colour

  touched = {example.edit.target, example.edit.other} - {None}
  kept = [o for i, o in enumerate(example.input_scene.objects) if i not in touched]
  kept_ok = all(_colour_error(output, erode(synthetic.object_mask(o, size)), o.colour)
                <= tol.colour for o in kept)
  # The pixels the edit changes in truth, from the scenes: ``input_image`` may be a model's drawing
  # of the input scene (a generated pair, `jip2p.p2p.world`), which differs from the render
  # everywhere a little.
  changed = (synthetic.render(example.input_scene, size) != example.edited_image).any(-1)
  edges = np.zeros_like(changed)
  for scene in (example.input_scene, example.edited_scene):
    labels = synthetic.label_map(scene, size)
    edges |= _filter(labels, r, np.maximum) != _filter(labels, r, np.minimum)
  away = ~_filter(changed, r, np.maximum) & ~edges
  moved = np.abs(output.astype(np.int16) - example.input_image.astype(np.int16)).max(-1) > tol.pixel
  rest_moved = float(moved[away].mean()) if away.any() else 0.0
  rest_ok = kept_ok and rest_moved <= tol.rest_fraction

  return {"family": example.family, "template_id": example.template_id,
          "success": bool(edit_ok and rest_ok), "edit_ok": bool(edit_ok), "rest_ok": bool(rest_ok),
          "psnr": psnr(output, example.edited_image),
          "input_psnr": psnr(output, example.input_image), "edit_error": edit_error,
          "rest_moved": rest_moved}


def _summary(results: list[dict[str, Any]]) -> dict[str, float]:
  summary = {"n": len(results)}
  for key in ("success", "edit_ok", "rest_ok", "psnr", "input_psnr"):
    summary[key] = float(np.mean([r[key] for r in results]))
  return summary


def aggregate(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """{'overall': summary, 'families': {family: summary}} over `score` results.

  A summary is {n, success, edit_ok, rest_ok (rates in [0, 1]), psnr, input_psnr (mean dB)};
  families appear in `synthetic.FAMILIES` order, only those present.
  """
  results = list(results)
  if not results:
    raise InputError("no results to aggregate")
  families = {f: [r for r in results if r["family"] == f] for f in synthetic.FAMILIES}
  return {"overall": _summary(results),
          "families": {f: _summary(rs) for f, rs in families.items() if rs}}


def _cell_box(cell: tuple[int, int], size: int) -> tuple[slice, slice]:
  """The pixels whose centres lie in a grid cell."""
  centres = (np.arange(size) + 0.5) * (synthetic.GRID / size)
  rows = np.flatnonzero(np.floor(centres) == cell[0])
  cols = np.flatnonzero(np.floor(centres) == cell[1])
  return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _nearest_colour(image: np.ndarray) -> np.ndarray:
  """int [..., ] index into the named colours nearest each pixel."""
  d = np.linalg.norm(image.astype(np.float64)[..., None, :] - _PALETTE, axis=-1)
  return np.argmin(d, axis=-1)


def score_drawing(output: np.ndarray, scene: synthetic.Scene,
                  tol: Tolerances = Tolerances()) -> dict[str, Any]:
  """Scores a drawing (uint8 [H, W, 3]) of ``scene``'s caption against the scene.

  Returns {objects (how many), objects_ok (drawn with the right colour and shape in the right
  cell), colour_ok, shape_ok (counts), background_ok, success (every object and the background
  right)}.
  """
  size = output.shape[0]
  truth = synthetic.render(scene, size)
  _check_pair(output, truth)
  r = tol.margin if tol.margin is not None else max(1, size // 64)
  nearest = _nearest_colour(output)
  colour_ok = shape_ok = objects_ok = 0
  for o in scene.objects:
    colour = _colour_error(output, _filter(synthetic.object_mask(o, size), r, np.minimum),
                           o.colour) <= tol.colour
    box = _cell_box(o.cell, size)
    drawn = nearest[box] == _PALETTE_NAMES.index(o.colour)
    iou = {}
    for shape in synthetic.SHAPES:
      mask = synthetic.object_mask(dataclasses.replace(o, shape=shape), size)[box]
      union = (mask | drawn).sum()
      iou[shape] = (mask & drawn).sum() / union if union else 0.0
    best = max(iou.values())
    shape = iou[o.shape] == best and sum(v == best for v in iou.values()) == 1
    colour_ok += colour
    shape_ok += shape
    objects_ok += colour and shape
  labels = synthetic.label_map(scene, size)
  away = _filter(labels, r, np.maximum) == 0
  stray = float((nearest[away] != _PALETTE_NAMES.index(scene.background)).mean())
  background_ok = bool(away.any()) and stray <= tol.rest_fraction \
      and _colour_error(output, away, scene.background) <= tol.colour
  n = len(scene.objects)
  return {"objects": n, "objects_ok": objects_ok, "colour_ok": colour_ok, "shape_ok": shape_ok,
          "background_ok": background_ok, "success": objects_ok == n and background_ok}


def aggregate_drawings(results: Iterable[dict[str, Any]]) -> dict[str, float]:
  """{n (drawings), object_accuracy, colour_accuracy, shape_accuracy (fractions of all objects),
  background_ok, success (fractions of drawings)} over `score_drawing` results."""
  results = list(results)
  if not results:
    raise InputError("no results to aggregate")
  objects = sum(r["objects"] for r in results)
  return {"n": len(results), "object_accuracy": sum(r["objects_ok"] for r in results) / objects,
          "colour_accuracy": sum(r["colour_ok"] for r in results) / objects,
          "shape_accuracy": sum(r["shape_ok"] for r in results) / objects,
          "background_ok": float(np.mean([r["background_ok"] for r in results])),
          "success": float(np.mean([r["success"] for r in results]))}
