"""Evaluation sets from local files, as sessions of edit turns.

A `Session` is one or more `Turn`s edited in order; single-turn sets have one turn per session.
In a multi-turn session only the first turn's input image is used: each later turn edits the
model's previous output. Images are loaded when a turn is evaluated (`Turn.load_image`), so a set
of thousands of examples costs only its text up front.

  world        the procedural edit world's held-out wording (`jip2p.data.synthetic`), with exact
               targets and captions; group: the edit family.
  tfrecords    a split of our TFRecords (default "validation", the importers' held-out split)
               through `jip2p.data.reader.iter_triplets` (imports TensorFlow); targets, captions
               where stored.
  emu_edit     the Emu Edit test set parquet (``facebook/emu_edit_test_set``: instruction, image,
               task, input_caption, output_caption); no targets; group: the task.
  magicbrush   MagicBrush parquet (img_id, turn_index, source_img, instruction, target_img).
               "single": every turn from its ground-truth source image; "multi": one session per
               img_id, from the first source image on through the model's own outputs. Captions
               (for CLIP-T / CLIP-out) from the test set's ``global_descriptions.json``
               ({img_id: {"<img_id>-input.png": text, "<img_id>-output<turn>.png": text}}).

Neither torch nor (except for ``tfrecords``) TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from jip2p import files
from jip2p.data import synthetic
from jip2p.errors import ConfigError, InputError

SETS = ("world", "tfrecords", "emu_edit", "magicbrush")
# Required columns and their kind: text (strings or nulls), int, image (bytes, or HF `Image`
# structs of bytes and path), any.
EMU_EDIT_COLUMNS = {"instruction": "text", "image": "image", "task": "text",
                    "input_caption": "text", "output_caption": "text"}
MAGICBRUSH_COLUMNS = {"img_id": "any", "turn_index": "int", "source_img": "image",
                      "instruction": "text", "target_img": "image"}
MAGICBRUSH_MODES = ("single", "multi")


@dataclasses.dataclass(frozen=True)
class Turn:
  """One edit to evaluate; images are loaders returning uint8 [H, W, 3]."""
  key: str
  instruction: str
  image: Callable[[], np.ndarray] | None = None  # the input (first turn of a session only)
  target: Callable[[], np.ndarray] | None = None  # the ground-truth edit, where there is one
  input_caption: str = ""
  output_caption: str = ""
  group: str = ""  # Emu Edit task, world family: results are also reported per group
  example: synthetic.Example | None = None  # the world's structured truth

  def load_image(self) -> np.ndarray:
    return self.image()

  def load_target(self) -> np.ndarray | None:
    return None if self.target is None else self.target()


@dataclasses.dataclass(frozen=True)
class Session:
  key: str
  turns: tuple[Turn, ...]


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """Sessions of one set; ``group_name`` names what `Turn.group` holds (None: no groups)."""
  name: str
  sessions: tuple[Session, ...]
  multi_turn: bool = False
  group_name: str | None = None

  @property
  def num_turns(self) -> int:
    return sum(len(s.turns) for s in self.sessions)


def decode(data: bytes, what: str) -> np.ndarray:
  """Encoded image bytes → uint8 RGB [H, W, 3]; `InputError` naming ``what`` if unreadable."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, ValueError, SyntaxError) as e:
    raise InputError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None


def _limited(sessions: list[Session], limit: int | None) -> tuple[Session, ...]:
  if limit is not None:
    if limit < 1:
      raise ConfigError(f"limit must be ≥ 1, got {limit}")
    sessions = sessions[:limit]
  if not sessions:
    raise InputError("the evaluation set is empty")
  return tuple(sessions)


# ------------------------------------------------------------------------------ world


def world_set(n: int = 64, *, seed: int = 1, size: int = 64, limit: int | None = None) -> EvalSet:
  """``n`` examples of the world's held-out wording (dataset ``seed``; train on another seed)."""
  sessions = []
  for ex in synthetic.generate(n, seed=seed, size=size, split="heldout"):
    turn = Turn(key=f"world-{seed}-{ex.index}", instruction=ex.instruction,
                image=_constant(ex.input_image), target=_constant(ex.edited_image),
                input_caption=ex.input_caption, output_caption=ex.edited_caption,
                group=ex.family, example=ex)
    sessions.append(Session(turn.key, (turn,)))
  return EvalSet("world", _limited(sessions, limit), group_name="family")


def _constant(image: np.ndarray) -> Callable[[], np.ndarray]:
  return lambda: image


# ------------------------------------------------------------------------------ TFRecords


def tfrecord_set(data_dirs: str | Sequence[str], split: str = "validation", *,
                 limit: int | None = None) -> EvalSet:
  """A stored split of our TFRecords (read through TensorFlow, in storage order)."""
  from jip2p.data.reader import iter_triplets
  sessions = []
  for index, t in enumerate(iter_triplets(data_dirs, split)):
    if limit is not None and index >= limit:
      break
    key = t.source_id or f"{split}-{index}"
    turn = Turn(key=key, instruction=t.instruction,
                image=_decoder(t.input_image, f"{key} input_image"),
                target=_decoder(t.edited_image, f"{key} edited_image"),
                input_caption=t.input_caption, output_caption=t.edited_caption)
    sessions.append(Session(key, (turn,)))
  if not sessions:
    raise InputError(f"no {split!r} records in {data_dirs}")
  return EvalSet(f"tfrecords:{split}", _limited(sessions, limit))


def _decoder(data: bytes, what: str) -> Callable[[], np.ndarray]:
  return lambda: decode(data, what)


# ------------------------------------------------------------------------------ parquet


def list_parquet(paths: str | Sequence[str]) -> list[str]:
  """Parquet files from files and folders (searched recursively), sorted per argument."""
  out = []
  for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(path)
                     for f in files if f.endswith(".parquet"))
      if not found:
        raise InputError(f"no .parquet files in {path}")
      out += found
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise InputError(f"{path}: no such file or folder")
  if not out:
    raise InputError("no parquet files given")
  return out


class _ParquetImages:
  """Image cells of one parquet file, read a row group at a time (sessions read in file order)."""

  def __init__(self, path: str, required: Mapping[str, str]):
    import pyarrow.parquet as pq
    try:
      self._file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for non-parquet files
      raise InputError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    self.path = path
    schema = self._file.schema_arrow
    names = schema.names
    missing = [c for c in required if c not in names]
    if missing:
      raise InputError(f"{path}: missing columns {missing} (has {names})")
    wrong = [f"{c} is {schema.field(c).type}, not {kind}" for c, kind in required.items()
             if not _column_is(kind, schema.field(c).type)]
    if wrong:
      raise InputError(f"{path}: wrong column types ({'; '.join(wrong)})")
    self.names = names
    starts = np.cumsum([0] + [self._file.metadata.row_group(i).num_rows
                              for i in range(self._file.num_row_groups)])
    self._starts = starts
    self._cached: tuple[int, str, list] | None = None

  def columns(self, names: Sequence[str]) -> list[dict]:
    """The rows' values of the (small, non-image) columns ``names``."""
    return self._file.read(columns=list(names)).to_pylist()

  def loader(self, row: int, column: str) -> Callable[[], np.ndarray]:
    return lambda: decode(self._bytes(row, column), f"{self.path}, row {row}, {column}")

  def _bytes(self, row: int, column: str) -> bytes:
    group = int(np.searchsorted(self._starts, row, side="right") - 1)
    if self._cached is None or self._cached[:2] != (group, column):
      values = self._file.read_row_group(group, columns=[column]).column(0).to_pylist()
      self._cached = (group, column, values)
    value = self._cached[2][row - self._starts[group]]
    if isinstance(value, dict):  # a HF `Image` cell: {bytes, path}
      data = value.get("bytes")
      if not data and value.get("path"):
        local = os.path.join(os.path.dirname(self.path), value["path"])
        if os.path.isfile(local):
          with open(local, "rb") as f:
            data = f.read()
      value = data
    if not value:
      raise InputError(f"{self.path}, row {row}: the {column} cell holds no image")
    return value


def _column_is(kind: str, t) -> bool:
  import pyarrow as pa
  if kind == "text":
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
  if kind == "int":
    return pa.types.is_integer(t)
  if kind == "image":
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))
  return True


def emu_edit_set(paths: str | Sequence[str], *, limit: int | None = None) -> EvalSet:
  """The Emu Edit test set from its parquet shards; results are reported per task."""
  sessions = []
  for path in list_parquet(paths):
    cells = _ParquetImages(path, EMU_EDIT_COLUMNS)
    text = [c for c in EMU_EDIT_COLUMNS if c != "image"] + [c for c in ("idx",)
                                                            if c in cells.names]
    for row, values in enumerate(cells.columns(text)):
      key = (f"emu-{values['idx']}" if values.get("idx") is not None
             else f"{os.path.basename(path)}:{row}")
      turn = Turn(key=key, instruction=values["instruction"] or "",
                  image=cells.loader(row, "image"),
                  input_caption=values["input_caption"] or "",
                  output_caption=values["output_caption"] or "", group=values["task"] or "")
      sessions.append(Session(key, (turn,)))
  return EvalSet("emu_edit", _limited(sessions, limit), group_name="task")


def magicbrush_set(paths: str | Sequence[str], mode: str = "single", *,
                   captions: str | None = None, limit: int | None = None) -> EvalSet:
  """MagicBrush sessions (single- or multi-turn); ``captions``: global_descriptions.json."""
  if mode not in MAGICBRUSH_MODES:
    raise ConfigError(f"MagicBrush mode must be one of {MAGICBRUSH_MODES}, got {mode!r}")
  descriptions = _read_captions(captions) if captions is not None else {}
  rows = []
  for path in list_parquet(paths):
    cells = _ParquetImages(path, MAGICBRUSH_COLUMNS)
    for row, values in enumerate(cells.columns(("img_id", "turn_index", "instruction"))):
      rows.append((str(values["img_id"]), int(values["turn_index"] or 1), row, cells,
                   values["instruction"] or ""))
  rows.sort(key=lambda r: (r[0], r[1]))
  sessions, by_image = [], {}
  for img_id, turn_index, row, cells, instruction in rows:
    caption = descriptions.get(img_id, {})
    previous = (f"{img_id}-input.png" if turn_index == 1
                else f"{img_id}-output{turn_index - 1}.png")
    key = f"magicbrush-{img_id}-{turn_index}"
    turn = Turn(key=key, instruction=instruction, image=cells.loader(row, "source_img"),
                target=cells.loader(row, "target_img"),
                input_caption=caption.get(previous, ""),
                output_caption=caption.get(f"{img_id}-output{turn_index}.png", ""))
    if mode == "single":
      sessions.append(Session(key, (turn,)))
    else:
      by_image.setdefault(img_id, []).append(turn)
  if mode == "multi":
    sessions = [Session(f"magicbrush-{img_id}", tuple(turns)) for img_id, turns in by_image.items()]
  return EvalSet(f"magicbrush:{mode}", _limited(sessions, limit), multi_turn=mode == "multi")


def _read_captions(path: str) -> dict[str, dict[str, str]]:
  text = files.read_text(path, "captions file")
  try:
    data = json.loads(text)
  except ValueError as e:
    raise InputError(f"{path}: the captions file is not JSON ({e})") from None
  if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
    raise InputError(f"{path}: expected {{img_id: {{image file name: caption}}}} as in "
                     "MagicBrush's global_descriptions.json")
  return {str(k): v for k, v in data.items()}
