"""A procedural edit world: coloured shapes on a grid, edit instructions, exact edited images.

No pretrained weights reach this project, so the first model a newcomer trains needs a world in
which every edit has one right answer. A scene is 1-4 shapes of named colours, each in its own cell
of a 3x3 grid, on a coloured background. Six edit families change a scene (recolour, remove, add,
move, background, swap); each edit comes with an instruction drawn from several wordings, some of
which are held out of training to test generalisation to unseen phrasing.

Rendering is exact: a pixel takes a shape's colour when its centre lies inside the shape (no
anti-aliasing), so an edit changes precisely the pixels of the objects it touches, and
`jip2p.eval.world_metrics` can score any output against the truth.

Every example is a pure function of ``(seed, index)`` (its own ``np.random.default_rng([seed,
index])``), so any shard of a dataset of any size is produced independently and identically. For
one ``(seed, index)`` the two splits give the same scene and edit, worded with the training or the
held-out templates; use different seeds for training and evaluation scenes.

Pure numpy: importable without TensorFlow or PyTorch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np

from jip2p.errors import ConfigError, InputError

# Named colours, pairwise at least 85 apart in RGB, with no grey: the mean colour of a region then
# names one of them, and the mean of uniform noise (mid grey) is far from all.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
FAMILIES = ("recolour", "remove", "add", "move", "background", "swap")
SPLITS = ("train", "heldout")
GRID = 3  # cells per side
MAX_OBJECTS = 4
OBJECT_SIZE = 0.7  # a shape's extent as a fraction of its cell's side
MIN_SIZE = 32  # pixels per image side; below this shapes lose their interiors

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0),
                                          "down": (1, 0)}
_DIRECTION_TO = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# Where a new object goes relative to an anchor object: the new cell is anchor cell + offset.
_RELATIONS = {(0, -1): "to the left of", (0, 1): "to the right of", (-1, 0): "above",
              (1, 0): "below"}
PLACES: dict[tuple[int, int], str] = {
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}


# ----------------------------------------------------------------------------- scenes

@dataclasses.dataclass(frozen=True)
class Obj:
  """One shape: ``cell`` is (row, column) of the grid, row 0 at the top."""
  shape: str
  colour: str
  cell: tuple[int, int]
  size: float = OBJECT_SIZE

  def describe(self) -> str:
    """'a red circle' / 'an orange square'."""
    return f"{_article(self.colour)} {self.colour} {self.shape}"

  def to_dict(self) -> dict[str, Any]:
    return {"shape": self.shape, "colour": self.colour, "cell": list(self.cell),
            "size": self.size}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Obj:
    return cls(d["shape"], d["colour"], (int(d["cell"][0]), int(d["cell"][1])), float(d["size"]))


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background colour and up to `MAX_OBJECTS` shapes in distinct cells.

  Invariants (checked): known names, cells inside the grid and distinct, no object of the
  background's colour, and no two objects of the same colour *and* shape, so that "the red circle"
  always names exactly one object.
  """
  background: str
  objects: tuple[Obj, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "objects", tuple(self.objects))
    if self.background not in COLOURS:
      raise InputError(f"unknown background colour {self.background!r}; known: {list(COLOURS)}")
    if len(self.objects) > MAX_OBJECTS:
      raise InputError(f"a scene holds at most {MAX_OBJECTS} objects, got {len(self.objects)}")
    for o in self.objects:
      if o.shape not in SHAPES or o.colour not in COLOURS:
        raise InputError(f"unknown shape or colour in {o}; shapes {SHAPES}, colours "
                         f"{list(COLOURS)}")
      if not all(0 <= c < GRID for c in o.cell):
        raise InputError(f"cell {o.cell} is outside the {GRID}x{GRID} grid")
      if not 0 < o.size <= 1:
        raise InputError(f"object size {o.size} must be in (0, 1] (a fraction of the cell)")
      if o.colour == self.background:
        raise InputError(f"{o.describe()} is invisible on a {self.background} background")
    if len({o.cell for o in self.objects}) < len(self.objects):
      raise InputError(f"two objects share a cell: {[o.cell for o in self.objects]}")
    if len({(o.colour, o.shape) for o in self.objects}) < len(self.objects):
      raise InputError("two objects share colour and shape, so a reference would be ambiguous")

  def to_dict(self) -> dict[str, Any]:
    return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Scene:
    return cls(d["background"], tuple(Obj.from_dict(o) for o in d["objects"]))


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, template_id: str = "caption/0") -> str:
  """The whole scene in words, with one of `CAPTION_TEMPLATES` (by default 'a red circle in the
  top left and a blue square in the centre, on a white background')."""
  background = f"{scene.background} background"
  if not scene.objects:
    return f"an empty {background}"
  parts = [f"{o.describe()} {PLACES[o.cell]}" for o in sorted(scene.objects, key=lambda o: o.cell)]
  listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  template = {t.id: t for t in CAPTION_TEMPLATES}[template_id]
  return template.text.format(objects=listed, a_background=f"{_article(background)} {background}")


def references(scene: Scene, i: int) -> tuple[str, ...]:
  """The phrases that name object ``i`` unambiguously: colour and shape, or shape when unique."""
  o = scene.objects[i]
  refs = [f"the {o.colour} {o.shape}"]
  if sum(p.shape == o.shape for p in scene.objects) == 1:
    refs.append(f"the {o.shape}")
  return tuple(refs)


# ----------------------------------------------------------------------------- rendering

def object_mask(obj: Obj, size: int) -> np.ndarray:
  """bool [size, size]: the pixels whose centres lie inside ``obj``."""
  centres = (np.arange(size) + 0.5) * (GRID / size)  # pixel centres in cell units
  dx = centres[None, :] - (obj.cell[1] + 0.5)
  dy = centres[:, None] - (obj.cell[0] + 0.5)
  h = obj.size / 2
  if obj.shape == "circle":
    return dx * dx + dy * dy <= h * h
  if obj.shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.9 * h  # a full square looks larger than the rest
  if obj.shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= h
  return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)  # triangle, apex up


def label_map(scene: Scene, size: int) -> np.ndarray:
  """int32 [size, size]: 0 where the background shows, ``i + 1`` on object ``i``."""
  labels = np.zeros((size, size), np.int32)
  for i, o in enumerate(scene.objects):
    labels[object_mask(o, size)] = i + 1
  return labels


def render(scene: Scene, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the scene drawn exactly (no anti-aliasing) at ``size`` pixels."""
  image = np.empty((size, size, 3), np.uint8)
  image[...] = COLOURS[scene.background]
  for o in scene.objects:
    image[object_mask(o, size)] = COLOURS[o.colour]
  return image


def random_scene(rng: np.random.Generator) -> Scene:
  """1-`MAX_OBJECTS` random objects in distinct cells, on a random background."""
  names = list(COLOURS)
  background = names[rng.integers(len(names))]
  cells = rng.permutation(GRID * GRID)[:rng.integers(1, MAX_OBJECTS + 1)]
  objects: list[Obj] = []
  for cell in cells:
    used = {(o.colour, o.shape) for o in objects}
    options = [(s, c) for s in SHAPES for c in names if c != background and (c, s) not in used]
    shape, colour = options[rng.integers(len(options))]
    objects.append(Obj(shape, colour, (int(cell) // GRID, int(cell) % GRID)))
  return Scene(background, tuple(objects))


# ----------------------------------------------------------------------------- edits

@dataclasses.dataclass(frozen=True)
class Edit:
  """A structured edit of a scene; indices refer to the *input* scene's objects.

  recolour: target, colour. remove: target. add: new. move: target, direction.
  background: colour. swap: target, other.
  """
  family: str
  target: int | None = None
  other: int | None = None
  colour: str | None = None
  direction: str | None = None
  new: Obj | None = None

  def apply(self, scene: Scene) -> Scene:
    """The edited scene. Objects keep their order; a removed one is dropped, an added one last."""
    objs = list(scene.objects)
    if self.family == "background":
      return Scene(self.colour, scene.objects)
    if self.family == "recolour":
      objs[self.target] = dataclasses.replace(objs[self.target], colour=self.colour)
    elif self.family == "remove":
      del objs[self.target]
    elif self.family == "add":
      objs.append(self.new)
    elif self.family == "move":
      objs[self.target] = moved(objs[self.target], self.direction)
    elif self.family == "swap":
      a, b = objs[self.target], objs[self.other]
      objs[self.target] = dataclasses.replace(a, colour=b.colour)
      objs[self.other] = dataclasses.replace(b, colour=a.colour)
    else:
      raise InputError(f"unknown edit family {self.family!r}; known: {FAMILIES}")
    return Scene(scene.background, tuple(objs))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["new"] = None if self.new is None else self.new.to_dict()
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> Edit:
    return cls(**{**d, "new": None if d.get("new") is None else Obj.from_dict(d["new"])})


def moved(obj: Obj, direction: str) -> Obj:
  dr, dc = DIRECTIONS[direction]
  return dataclasses.replace(obj, cell=(obj.cell[0] + dr, obj.cell[1] + dc))


def _pick(options: Sequence, rng: np.random.Generator):
  return options[rng.integers(len(options))] if options else None


def _propose_recolour(scene: Scene, rng: np.random.Generator) -> Edit | None:
  used = {(o.colour, o.shape) for o in scene.objects}
  options = [(i, c) for i, o in enumerate(scene.objects) for c in COLOURS
             if c not in (o.colour, scene.background) and (c, o.shape) not in used]
  choice = _pick(options, rng)
  return None if choice is None else Edit("recolour", target=choice[0], colour=choice[1])


def _propose_remove(scene: Scene, rng: np.random.Generator) -> Edit | None:
  choice = _pick(range(len(scene.objects)), rng)
  return None if choice is None else Edit("remove", target=int(choice))


def _propose_add(scene: Scene, rng: np.random.Generator) -> Edit | None:
  if len(scene.objects) >= MAX_OBJECTS:
    return None
  taken = {o.cell for o in scene.objects}
  used = {(o.colour, o.shape) for o in scene.objects}
  options = [Obj(s, c, cell) for cell in PLACES if cell not in taken for s in SHAPES
             for c in COLOURS if c != scene.background and (c, s) not in used]
  new = _pick(options, rng)
  return None if new is None else Edit("add", new=new)


def _propose_move(scene: Scene, rng: np.random.Generator) -> Edit | None:
  taken = {o.cell for o in scene.objects}
  options = [(i, d) for i, o in enumerate(scene.objects) for d in DIRECTIONS
             if moved(o, d).cell in PLACES and moved(o, d).cell not in taken]
  choice = _pick(options, rng)
  return None if choice is None else Edit("move", target=choice[0], direction=choice[1])


def _propose_background(scene: Scene, rng: np.random.Generator) -> Edit | None:
  used = {o.colour for o in scene.objects} | {scene.background}
  colour = _pick([c for c in COLOURS if c not in used], rng)
  return None if colour is None else Edit("background", colour=colour)


def _propose_swap(scene: Scene, rng: np.random.Generator) -> Edit | None:
  objs = scene.objects
  options = []
  for i in range(len(objs)):
    for j in range(i + 1, len(objs)):
      a, b = objs[i], objs[j]
      rest = {(o.colour, o.shape) for k, o in enumerate(objs) if k not in (i, j)}
      if a.colour != b.colour and not {(b.colour, a.shape), (a.colour, b.shape)} & rest:
        options.append((i, j))
  choice = _pick(options, rng)
  return None if choice is None else Edit("swap", target=choice[0], other=choice[1])


PROPOSERS: dict[str, Callable[[Scene, np.random.Generator], Edit | None]] = {
    "recolour": _propose_recolour, "remove": _propose_remove, "add": _propose_add,
    "move": _propose_move, "background": _propose_background, "swap": _propose_swap,
}


# ----------------------------------------------------------------------------- instructions

@dataclasses.dataclass(frozen=True)
class Template:
  id: str  # "<family>/<k>"
  text: str  # str.format pattern over the family's slots
  heldout: bool  # never used by split="train"; the only ones used by split="heldout"


def _templates(family: str, rows: Sequence[tuple[str, bool]]) -> tuple[Template, ...]:
  return tuple(Template(f"{family}/{k}", text, held) for k, (text, held) in enumerate(rows))


# Held-out wordings reorder or recombine words that training wordings use, so that a model trained
# from scratch has seen every word and can generalise to the phrasing.
TEMPLATES: dict[str, tuple[Template, ...]] = {
    "recolour": _templates("recolour", [
        ("make {obj} {colour}", False),
        ("turn {obj} {colour}", False),
        ("change the colour of {obj} to {colour}", False),
        ("change the color of {obj} to {colour}", False),
        ("paint {obj} {colour}", False),
        ("recolor {obj} to {colour}", False),
        ("{obj} should be {colour}", True),
        ("change {obj} to {colour}", True),
    ]),
    "remove": _templates("remove", [
        ("remove {obj}", False),
        ("delete {obj}", False),
        ("take away {obj}", False),
        ("get rid of {obj}", False),
        ("{obj} should be removed", False),
        ("take {obj} away", True),
    ]),
    "add": _templates("add", [
        ("add {new} {where}", False),
        ("put {new} {where}", False),
        ("place {new} {where}", False),
        ("draw {new} {where}", False),
        ("{where}, add {new}", True),
    ]),
    "move": _templates("move", [
        ("move {obj} {dir_to}", False),
        ("shift {obj} {dir_to}", False),
        ("slide {obj} {dir_to}", False),
        ("move {obj} one step {dir}", False),
        ("shift {obj} one step {dir}", True),
        ("{obj} should move {dir_to}", True),
    ]),
    "background": _templates("background", [
        ("make the background {colour}", False),
        ("change the background to {colour}", False),
        ("turn the background {colour}", False),
        ("paint the background {colour}", False),
        ("the background should be {colour}", True),
        ("change the colour of the background to {colour}", True),
    ]),
    "swap": _templates("swap", [
        ("swap the colours of {obj} and {other}", False),
        ("swap the colors of {obj} and {other}", False),
        ("exchange the colours of {obj} and {other}", False),
        ("{obj} and {other} swap colours", False),
        ("exchange the colors of {obj} and {other}", True),
        ("{obj} and {other} exchange colours", True),
    ]),
}


# Whole-scene captions: the prompts of a text-to-image model of the world and the texts of a world
# CLIP. Every wording lists the same objects in the same order (by cell); the held-out ones
# recombine the training ones' words.
CAPTION_TEMPLATES: tuple[Template, ...] = _templates("caption", [
    ("{objects}, on {a_background}", False),
    ("on {a_background}, {objects}", False),
    ("{a_background} with {objects}", False),
    ("a picture of {objects} on {a_background}", False),
    ("a picture of {a_background} with {objects}", True),
    ("{objects} on {a_background}", True),
])


def templates(family: str, split: str) -> tuple[Template, ...]:
  """The wordings ``split`` may use for ``family`` ("caption": `CAPTION_TEMPLATES`)."""
  rows = CAPTION_TEMPLATES if family == "caption" else TEMPLATES[family]
  return tuple(t for t in rows if t.heldout == (split == "heldout"))


def _where(scene: Scene, cell: tuple[int, int], rng: np.random.Generator) -> str:
  """An absolute place ('in the top left') or, half the time, one relative to a neighbour."""
  relative = [f"{rel} {ref}" for (dr, dc), rel in _RELATIONS.items()
              for i, o in enumerate(scene.objects) if o.cell == (cell[0] - dr, cell[1] - dc)
              for ref in references(scene, i)]
  if relative and rng.random() < 0.5:
    return _pick(relative, rng)
  return PLACES[cell]


def instruct(scene: Scene, edit: Edit, rng: np.random.Generator,
             split: str = "train") -> tuple[str, str]:
  """(template id, instruction) wording ``edit`` of ``scene`` with a template of ``split``."""
  template = _pick(templates(edit.family, split), rng)
  slots: dict[str, str] = {}
  if edit.target is not None:
    slots["obj"] = _pick(references(scene, edit.target), rng)
  if edit.other is not None:
    slots["other"] = _pick(references(scene, edit.other), rng)
  if edit.colour is not None:
    slots["colour"] = edit.colour
  if edit.direction is not None:
    slots["dir"], slots["dir_to"] = edit.direction, _DIRECTION_TO[edit.direction]
  if edit.new is not None:
    slots["new"], slots["where"] = edit.new.describe(), _where(scene, edit.new.cell, rng)
  return template.id, template.text.format(**slots)


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  """One training/evaluation triplet with the structured truth needed to score it.

  Images are uint8 [size, size, 3]; ``edited_image == render(edited_scene, size)``.
  """
  seed: int
  index: int
  split: str
  family: str
  template_id: str
  instruction: str
  input_caption: str
  edited_caption: str
  input_scene: Scene
  edited_scene: Scene
  edit: Edit
  input_image: np.ndarray
  edited_image: np.ndarray

  @property
  def size(self) -> int:
    return self.input_image.shape[0]

  def meta(self) -> dict[str, Any]:
    """JSON-safe description (no pixels): `from_meta` rebuilds the example exactly."""
    return {"seed": self.seed, "index": self.index, "split": self.split, "size": self.size,
            "family": self.family, "template_id": self.template_id,
            "instruction": self.instruction, "input_caption": self.input_caption,
            "edited_caption": self.edited_caption, "input_scene": self.input_scene.to_dict(),
            "edit": self.edit.to_dict()}

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> Example:
    """Re-renders the images, so records need only store `meta` to be scored."""
    scene = Scene.from_dict(meta["input_scene"])
    edit = Edit.from_dict(meta["edit"])
    edited = edit.apply(scene)
    return cls(meta["seed"], meta["index"], meta["split"], meta["family"], meta["template_id"],
               meta["instruction"], meta["input_caption"], meta["edited_caption"], scene, edited,
               edit, render(scene, meta["size"]), render(edited, meta["size"]))


def _check(seed: int, size: int, split: str, families: Sequence[str]) -> None:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
  if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
    raise ConfigError(f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}")
  if split not in SPLITS:
    raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
  check_families(families)


def check_families(families: Sequence[str]) -> None:
  """A named `ConfigError` unless ``families`` is a non-empty subset of `FAMILIES`."""
  unknown = [f for f in families if f not in FAMILIES]
  if unknown or not families:
    raise ConfigError(f"families must be a non-empty subset of {FAMILIES}, got {list(families)}")


def example_at(index: int, *, seed: int, size: int = 64, split: str = "train",
               families: Sequence[str] = FAMILIES) -> Example:
  """Example ``index`` of the dataset ``seed``: depends on nothing else (no shared RNG state)."""
  _check(seed, size, split, families)
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ConfigError(f"index must be a non-negative integer, got {index!r}")
  rng = np.random.default_rng([int(seed), int(index)])
  family = families[rng.integers(len(families))]
  edit = None
  while edit is None:  # every family applies to most scenes: a few draws at most
    scene = random_scene(rng)
    edit = PROPOSERS[family](scene, rng)
  edited = edit.apply(scene)
  template_id, instruction = instruct(scene, edit, rng, split)  # wording last: splits share scenes
  return Example(int(seed), int(index), split, family, template_id, instruction, caption(scene),
                 caption(edited), scene, edited, edit, render(scene, size), render(edited, size))


@dataclasses.dataclass(frozen=True, eq=False)
class Drawing:
  """One scene and a caption of it: a text-to-image example. ``image`` is uint8 [size, size, 3]."""
  seed: int
  index: int
  split: str
  template_id: str
  caption: str
  scene: Scene
  image: np.ndarray


def drawing_at(index: int, *, seed: int, size: int = 64, split: str = "train") -> Drawing:
  """Scene ``index`` of the caption dataset ``seed``, worded with a caption template of ``split``:
  like `example_at`, a pure function of its arguments, and the two splits share scenes."""
  _check(seed, size, split, FAMILIES)
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ConfigError(f"index must be a non-negative integer, got {index!r}")
  rng = np.random.default_rng([int(seed), int(index), 1])  # not example_at's scenes
  scene = random_scene(rng)
  template = _pick(templates("caption", split), rng)
  return Drawing(int(seed), int(index), split, template.id, caption(scene, template.id), scene,
                 render(scene, size))


def generate(n: int, *, seed: int, size: int = 64, split: str = "train", start: int = 0,
             families: Sequence[str] = FAMILIES) -> Iterator[Example]:
  """Examples ``start .. start + n - 1`` of the dataset ``seed``; shards can be made apart.

  Arguments are checked here, not at the first ``next()``.
  """
  _check(seed, size, split, families)
  for name, value in (("n", n), ("start", start)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
  return (example_at(i, seed=seed, size=size, split=split, families=families)
          for i in range(start, start + n))
