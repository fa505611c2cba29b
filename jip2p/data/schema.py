"""The one schema of an edit triplet, shared by the writer, the reader and the TFDS metadata.

A record is a flat `tf.train.Example` whose keys are the `FIELDS` below. Images are stored as
their encoded PNG or JPEG bytes (never re-encoded unless an importer is asked to), with the size
read from the header beside them. Every field is written in every record, so that TFDS (which
parses with fixed-length specs) reads any record; absent provenance takes the field's default
(-1 for integers, NaN for floats, "" for text).

An optional `mask` (the edit region, as UltraEdit's region split and MagicBrush publish) is stored
losslessly as a grayscale PNG of the input image's size, or b"" when the triplet has none; the
reader crops and flips it with the pair when a config asks for it (`ReaderConfig.include_mask`),
and otherwise ignores it, so masked records train as ordinary ones.

This module does not import TensorFlow: `kind` says how each consumer maps a field
("image" and "mask" → bytes, "text" → UTF-8 bytes, "int" → int64, "float" → float32).
"""

from __future__ import annotations

import dataclasses
import io
import math

from PIL import Image

from jip2p.errors import InputError

SCHEMA_VERSION = 1
IMAGE_FORMATS = ("png", "jpeg")


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  kind: str  # "image", "mask", "text", "int" or "float".
  required: bool  # The reader skips a record that lacks it.
  doc: str

  @property
  def default(self):
    return {"image": b"", "mask": b"", "text": "", "int": -1, "float": math.nan}[self.kind]


FIELDS: tuple[Field, ...] = (
    Field("input_image", "image", True, "the image before the edit, encoded PNG/JPEG bytes"),
    Field("input_height", "int", False, "height of input_image in pixels"),
    Field("input_width", "int", False, "width of input_image in pixels"),
    Field("edited_image", "image", True, "the image after the edit, encoded PNG/JPEG bytes"),
    Field("edited_height", "int", False, "height of edited_image in pixels"),
    Field("edited_width", "int", False, "width of edited_image in pixels"),
    Field("mask", "mask", False, "the edit region: grayscale PNG of input_image's size, or empty"),
    Field("instruction", "text", True, "the edit instruction (what the model is conditioned on)"),
    Field("input_caption", "text", False, "caption of the input image"),
    Field("edited_caption", "text", False, "caption of the edited image"),
    Field("source", "text", False, "where the triplet comes from, e.g. 'clip-filtered'"),
    Field("source_id", "text", False, "the triplet's id in its source (row, folder/seed, img_id)"),
    Field("prompt_index", "int", False, "index of the text triplet in the prompts file"),
    Field("seed", "int", False, "generation seed of the image pair"),
    Field("turn_index", "int", False, "MagicBrush: the edit turn within its session"),
    Field("p2p_threshold", "float", False, "fraction of steps with shared attention (p)"),
    Field("cfg_scale", "float", False, "classifier-free guidance scale of the generation"),
    Field("clip_sim_0", "float", False, "CLIP cos(input image, input caption)"),
    Field("clip_sim_1", "float", False, "CLIP cos(edited image, edited caption)"),
    Field("clip_sim_direction", "float", False, "CLIP cos(image change, caption change)"),
    Field("clip_sim_image", "float", False, "CLIP cos(input image, edited image)"),
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}
REQUIRED = tuple(f.name for f in FIELDS if f.required)
_SIZE_FIELDS = {"input_height", "input_width", "edited_height", "edited_width"}


@dataclasses.dataclass
class Triplet:
  """One edit example as Python values; the image fields hold encoded PNG/JPEG bytes."""

  input_image: bytes
  edited_image: bytes
  instruction: str
  input_caption: str = ""
  edited_caption: str = ""
  source: str = ""
  source_id: str = ""
  prompt_index: int = -1
  seed: int = -1
  turn_index: int = -1
  mask: bytes = b""
  p2p_threshold: float = math.nan
  cfg_scale: float = math.nan
  clip_sim_0: float = math.nan
  clip_sim_1: float = math.nan
  clip_sim_direction: float = math.nan
  clip_sim_image: float = math.nan


def image_format(data: bytes) -> str | None:
  """"png" or "jpeg" from the magic bytes, None for anything else."""
  if data.startswith(b"\x89PNG\r\n\x1a\n"):
    return "png"
  if data.startswith(b"\xff\xd8\xff"):
    return "jpeg"
  return None


def image_size(data: bytes, what: str = "image") -> tuple[int, int]:
  """(height, width) from the header of encoded PNG/JPEG bytes; InputError if it is not one."""
  if image_format(data) is None:
    raise InputError(f"{what} is not PNG or JPEG data (starts with {bytes(data[:8])!r})")
  try:
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
  except (OSError, ValueError) as e:
    raise InputError(f"{what} has an unreadable header: {e}") from None
  return height, width


def to_record(t: Triplet) -> dict[str, bytes | int | float]:
  """Every field of the schema as a plain value (text as UTF-8 bytes), image sizes filled in."""
  values = dataclasses.asdict(t)
  for name in REQUIRED:
    if not values[name]:
      raise InputError(f"triplet field {name!r} is empty")
  record = {}
  for prefix in ("input", "edited"):
    record[f"{prefix}_height"], record[f"{prefix}_width"] = image_size(
        values[f"{prefix}_image"], f"{prefix}_image")
  for f in FIELDS:
    if f.name in _SIZE_FIELDS:
      continue
    value = values[f.name]
    if f.kind == "text":
      if not isinstance(value, str):
        raise InputError(f"triplet field {f.name!r} must be str, got {type(value).__name__}")
      value = value.encode("utf-8")
    elif f.kind == "image":
      value = bytes(value)
    elif f.kind == "mask":
      value = bytes(value)
      if value and image_format(value) != "png":
        raise InputError(f"triplet field {f.name!r} must be PNG (lossless), starts with "
                         f"{value[:8]!r}")
      if value and image_size(value, f.name) != (record["input_height"], record["input_width"]):
        raise InputError(f"triplet field {f.name!r} is {image_size(value, f.name)} (h, w), "
                         f"input_image {(record['input_height'], record['input_width'])}")
    elif f.kind == "int":
      value = int(value)
    else:
      value = float(value)
    record[f.name] = value
  return record


def from_record(record: dict) -> Triplet:
  """The Triplet of a parsed record (bytes text decoded; image sizes dropped: they are derived)."""
  kwargs = {}
  for f in dataclasses.fields(Triplet):
    value = record.get(f.name, FIELDS_BY_NAME[f.name].default)
    kind = FIELDS_BY_NAME[f.name].kind
    if kind == "text" and isinstance(value, bytes):
      value = value.decode("utf-8")
    elif kind == "int":
      value = int(value)
    elif kind == "float":
      value = float(value)
    kwargs[f.name] = value
  return Triplet(**kwargs)
