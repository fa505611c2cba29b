"""The procedural edit world: determinism, exact edits, template splits, unambiguous wording.

Pure numpy (neither TensorFlow nor torch), so it runs on the torch side of the suite.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jip2p.data import synthetic as sy
from jip2p.errors import ConfigError, InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REF = re.compile(r"\bthe (?:(%s) )?(%s)\b" % ("|".join(sy.COLOURS), "|".join(sy.SHAPES)))


def digest(ex: sy.Example) -> str:
  h = hashlib.sha256(ex.input_image.tobytes() + ex.edited_image.tobytes())
  h.update(json.dumps(ex.meta(), sort_keys=True).encode())
  return h.hexdigest()


def test_same_seed_and_index_give_identical_examples_and_others_differ():
  a = sy.example_at(17, seed=5)
  b = sy.example_at(17, seed=5)
  assert digest(a) == digest(b)
  assert digest(sy.example_at(18, seed=5)) != digest(a)
  assert digest(sy.example_at(17, seed=6)) != digest(a)
  whole = [digest(e) for e in sy.generate(12, seed=5)]
  shard = [digest(e) for e in sy.generate(4, seed=5, start=8)]
  assert shard == whole[8:]
  assert len(set(whole)) == len(whole)


def test_examples_do_not_depend_on_the_process():
  """A fresh interpreter with another hash seed makes the same bytes (no set/dict-order leaks)."""
  code = ("import hashlib, json; from jip2p.data import synthetic as sy\n"
          "h = hashlib.sha256()\n"
          "for e in sy.generate(40, seed=3, size=48):\n"
          "  h.update(e.input_image.tobytes() + e.edited_image.tobytes())\n"
          "  h.update(json.dumps(e.meta(), sort_keys=True).encode())\n"
          "print(h.hexdigest())\n")
  env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                       text=True, cwd=ROOT).stdout.strip()
  h = hashlib.sha256()
  for e in sy.generate(40, seed=3, size=48):
    h.update(e.input_image.tobytes() + e.edited_image.tobytes())
    h.update(json.dumps(e.meta(), sort_keys=True).encode())
  assert out == h.hexdigest()


def test_generator_and_metrics_import_neither_tensorflow_nor_torch():
  code = ("import sys, jip2p.data.synthetic, jip2p.eval.world_metrics\n"
          "print('tensorflow' in sys.modules, 'torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}).stdout.split()
  assert out == ["False", "False"]


def expected_region(ex: sy.Example) -> np.ndarray:
  """The pixels the edit must change, built from shape masks (not from the renderer's diff)."""
  scene, edit, size = ex.input_scene, ex.edit, ex.size

  def mask(obj):
    return sy.object_mask(obj, size)

  if edit.family == "background":
    region = np.ones((size, size), bool)
    for o in scene.objects:
      region &= ~mask(o)
    return region
  if edit.family == "add":
    return mask(edit.new)
  target = scene.objects[edit.target]
  if edit.family in ("recolour", "remove"):
    return mask(target)
  if edit.family == "move":
    return mask(target) | mask(sy.moved(target, edit.direction))
  return mask(target) | mask(scene.objects[edit.other])


@pytest.mark.parametrize("family", sy.FAMILIES)
@pytest.mark.parametrize("size", [64, 128])
def test_every_family_edits_exactly_the_expected_region(family, size):
  for ex in sy.generate(40, seed=11, size=size, families=(family,)):
    assert ex.family == ex.edit.family == family
    assert ex.template_id.startswith(family + "/")
    assert ex.edited_scene == ex.edit.apply(ex.input_scene)
    assert ex.input_caption == sy.caption(ex.input_scene)
    assert ex.edited_caption == sy.caption(ex.edited_scene) != ex.input_caption
    for image in (ex.input_image, ex.edited_image):
      assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    np.testing.assert_array_equal(ex.edited_image, sy.render(ex.edited_scene, size))
    changed = (ex.input_image != ex.edited_image).any(-1)
    region = expected_region(ex)
    assert region.any()
    np.testing.assert_array_equal(changed, region)


def test_rendering_is_exact_and_every_object_visible():
  for ex in sy.generate(60, seed=2, size=32):
    scene = ex.input_scene
    colours = {tuple(c) for c in ex.input_image.reshape(-1, 3)}
    assert colours == {sy.COLOURS[scene.background]} | {sy.COLOURS[o.colour] for o in scene.objects}
    labels = sy.label_map(scene, 32)
    for i, o in enumerate(scene.objects):
      assert (labels == i + 1).sum() == sy.object_mask(o, 32).sum() > 10  # disjoint and visible


def test_palette_colours_are_far_apart():
  rgb = np.array(list(sy.COLOURS.values()), float)
  d = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
  assert d[~np.eye(len(rgb), dtype=bool)].min() > 80


def test_heldout_templates_never_in_train_and_only_in_heldout():
  held = {t.id for ts in sy.TEMPLATES.values() for t in ts if t.heldout}
  train_ids = {e.template_id for e in sy.generate(900, seed=1, split="train")}
  heldout_ids = {e.template_id for e in sy.generate(300, seed=1, split="heldout")}
  assert not train_ids & held
  assert heldout_ids == held  # only held-out ones, and all of them
  assert train_ids == {t.id for ts in sy.TEMPLATES.values() for t in ts} - held
  for family in sy.FAMILIES:
    assert sy.templates(family, "heldout") and sy.templates(family, "train")


def test_splits_share_scenes_and_edits_but_not_wording():
  for i in range(30):
    a = sy.example_at(i, seed=4, split="train")
    b = sy.example_at(i, seed=4, split="heldout")
    assert (a.input_scene, a.edit) == (b.input_scene, b.edit)
    assert a.template_id != b.template_id


def words(templates) -> set[str]:
  return {w for t in templates for w in re.findall(r"[a-z]+", re.sub(r"{\w+}", "", t.text))}


def test_heldout_wording_uses_only_words_seen_in_training():
  train = words(t for ts in sy.TEMPLATES.values() for t in ts if not t.heldout)
  held = words(t for ts in sy.TEMPLATES.values() for t in ts if t.heldout)
  assert held <= train, held - train


def test_instructions_name_exactly_the_edited_objects():
  for ex in sy.generate(600, seed=8):
    scene, edit = ex.input_scene, ex.edit
    named = []
    for colour, shape in REF.findall(ex.instruction):
      hits = [i for i, o in enumerate(scene.objects)
              if o.shape == shape and (not colour or o.colour == colour)]
      assert len(hits) == 1, (ex.instruction, sy.caption(scene))
      named.append(hits[0])
    if edit.family == "add":
      assert edit.new.describe() in ex.instruction
      if named:  # placed relative to an anchor one cell away
        anchor = scene.objects[named[0]].cell
        assert abs(anchor[0] - edit.new.cell[0]) + abs(anchor[1] - edit.new.cell[1]) == 1
      else:
        assert sy.PLACES[edit.new.cell] in ex.instruction
    else:
      assert named == [i for i in (edit.target, edit.other) if i is not None], ex.instruction
    for value in (edit.colour, edit.direction):
      if value is not None:
        assert value in ex.instruction


def test_every_family_appears_with_roughly_equal_frequency():
  counts = {f: 0 for f in sy.FAMILIES}
  for ex in sy.generate(600, seed=0):
    counts[ex.family] += 1
  assert min(counts.values()) > 60, counts


def test_meta_round_trips_through_json():
  for ex in sy.generate(20, seed=9, size=40):
    back = sy.Example.from_meta(json.loads(json.dumps(ex.meta())))
    assert digest(back) == digest(ex)
    assert back.edited_scene == ex.edited_scene


def test_caption_wording():
  scene = sy.Scene("white", (sy.Obj("square", "blue", (1, 1)), sy.Obj("circle", "red", (0, 0)),
                             sy.Obj("triangle", "orange", (2, 2))))
  assert sy.caption(scene) == ("a red circle in the top left, a blue square in the centre and an "
                               "orange triangle in the bottom right, on a white background")
  assert sy.caption(sy.Scene("orange")) == "an empty orange background"
  assert sy.references(scene, 0) == ("the blue square", "the square")


def test_caption_wordings_list_the_same_scene_and_hold_some_out():
  scene = sy.Scene("white", (sy.Obj("square", "blue", (1, 1)), sy.Obj("circle", "red", (0, 0))))
  listed = "a red circle in the top left and a blue square in the centre"
  texts = {t.id: sy.caption(scene, t.id) for t in sy.CAPTION_TEMPLATES}
  assert texts["caption/0"] == sy.caption(scene) == f"{listed}, on a white background"
  assert all(listed in text and "a white background" in text for text in texts.values())
  train, held = sy.templates("caption", "train"), sy.templates("caption", "heldout")
  assert train and held and not {t.id for t in train} & {t.id for t in held}
  assert words(held) <= words(train), words(held) - words(train)


def test_drawings_are_pure_functions_of_seed_and_index_and_splits_share_scenes():
  a, b = (sy.drawing_at(7, seed=2, size=32, split=s) for s in sy.SPLITS)
  again = sy.drawing_at(7, seed=2, size=32)
  assert a.scene == b.scene == again.scene and a.caption == again.caption
  np.testing.assert_array_equal(a.image, sy.render(a.scene, 32))
  assert a.caption == sy.caption(a.scene, a.template_id) and not sy.CAPTION_TEMPLATES[
      int(a.template_id.split("/")[1])].heldout
  assert sy.drawing_at(8, seed=2, size=32).scene != a.scene
  with pytest.raises(ConfigError, match="index must be a non-negative integer"):
    sy.drawing_at(-1, seed=2)


def test_invalid_scenes_and_arguments_raise():
  with pytest.raises(InputError, match="share colour and shape"):
    sy.Scene("white", (sy.Obj("circle", "red", (0, 0)), sy.Obj("circle", "red", (1, 1))))
  with pytest.raises(InputError, match="share a cell"):
    sy.Scene("white", (sy.Obj("circle", "red", (0, 0)), sy.Obj("square", "red", (0, 0))))
  with pytest.raises(InputError, match="invisible"):
    sy.Scene("red", (sy.Obj("circle", "red", (0, 0)),))
  with pytest.raises(InputError, match="outside"):
    sy.Scene("red", (sy.Obj("circle", "blue", (3, 0)),))
  with pytest.raises(ConfigError, match="split"):
    sy.generate(3, seed=0, split="test")  # checked eagerly, before iteration
  with pytest.raises(ConfigError, match="size"):
    sy.example_at(0, seed=0, size=16)
  with pytest.raises(ConfigError, match="seed"):
    sy.generate(3, seed=-1)
  with pytest.raises(ConfigError, match="families"):
    sy.generate(3, seed=0, families=("rotate",))
