"""Importers for the released edit datasets, from files a user downloaded, into a `DatasetWriter`.

Sources (docs/design.md §1, "Released data formats", and §5 for the parquet presets):
  * HF parquet shards of `timbrooks/instructpix2pix-clip-filtered` (original_prompt,
    original_image, edit_prompt, edited_prompt, edited_image) and
    `fusing/instructpix2pix-1000-samples` (input_image, edit_prompt, edited_image); images are
    HF `Image` structs {bytes, path}. Read with pyarrow a few rows at a time, never whole.
  * the original generator's folders: `seeds.json` ([[dir, [seed, ...]], ...]),
    `{i:07d}/prompt.json` ({"input" or "caption", "edit", "output"}), `{seed}_0.jpg`,
    `{seed}_1.jpg` and `metadata.jsonl` (seed, p2p_threshold, cfg_scale, clip_sim_0/1/dir/image);
    every listed seed becomes one triplet with its CLIP scores.
  * MagicBrush parquet (img_id, turn_index, source_img, mask_img, instruction, target_img), the
    mask kept as the triplet's `mask`.
  * any parquet edit dataset through a column mapping (`iter_parquet`: which column is the input
    image, the edited image, the instruction, ...), with named `PRESETS` for the published
    layouts: the three above, UltraEdit, HQ-Edit, OmniEdit, AnyEdit and the Emu Edit test set
    (each preset says which columns it reads). Rows can be filtered on any column (`Condition`,
    e.g. clip_sim_dir>0.2); a list-valued instruction gives one triplet per prompt or the first.
  * the procedural edit world of `jip2p.data.synthetic` (generated, exact; for the demo and tests).

Each source checks what it can before its first row (parquet footers and column types, the
generator's folder and seeds.json), so a bad source is a named `InputError` before anything is
written; a parquet row group that cannot be read becomes skipped rows, numbered as they stood.
Every source yields `Row`s in a deterministic order; `import_rows` validates them (full decode),
optionally stores the images at a smaller resolution, assigns a split by a hash of the row's
*group* (its prompt, or MagicBrush session) so one prompt's pairs never straddle splits, and
writes. Rejected rows are counted by reason. Resuming: each write carries the row number as the
writer's cursor; a rerun into the same directory skips every row up to the cursor of its split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from PIL import Image

from jip2p.data import schema
from jip2p.data.writer import check_split_name
from jip2p.errors import ConfigError, InputError

_BATCH_ROWS = 16


@dataclasses.dataclass
class Row:
  """One source row: a triplet, or None with the reason it cannot be one."""

  key: str  # unique within the source: file:row, prompt_dir/seed, img_id/turn.
  group: str  # rows of one group (prompt, session) always land in the same split.
  triplet: schema.Triplet | None
  skip_reason: str | None = None


@dataclasses.dataclass
class ImportReport:
  """What an import did: rows read, written per split, resumed (already stored), skipped why."""

  rows: int = 0
  resumed: int = 0
  written: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def summary(self) -> str:
    written = ", ".join(f"{s}={n}" for s, n in sorted(self.written.items())) or "none"
    lines = [f"rows read: {self.rows}", f"written: {written}",
             f"already stored (resumed): {self.resumed}",
             f"skipped: {sum(self.skipped.values())}"]
    lines += [f"  {reason}: {n}" for reason, n in self.skipped.most_common()]
    return "\n".join(lines)


# ---------------------------------------------------------------- splits


def assign_split(group: str, validation_fraction: float, seed: int = 0) -> str:
  """"validation" for a deterministic `validation_fraction` of groups, else "train"."""
  if validation_fraction <= 0:
    return "train"
  digest = hashlib.sha256(f"{seed}:{group}".encode("utf-8")).digest()
  fraction = int.from_bytes(digest[:8], "big") / 2**64
  return "validation" if fraction < validation_fraction else "train"


# ---------------------------------------------------------------- sources


def list_parquet(paths: str | Sequence[str]) -> list[str]:
  """Parquet files from files, folders (searched recursively) and globs, sorted per argument."""
  from jip2p.data.tf_setup import import_tf
  gfile = import_tf().io.gfile
  out = []
  for path in [paths] if isinstance(paths, str) else paths:
    with _reading(path):
      if gfile.isdir(path):
        found = sorted(os.path.join(d, f) for d, _, files in gfile.walk(path)
                       for f in files if f.endswith(".parquet"))
      elif any(c in path for c in "*?["):
        found = sorted(gfile.glob(path))
      elif gfile.exists(path):
        found = [path]
      else:
        raise InputError(f"{path} does not exist")
    if not found:
      raise InputError(f"no parquet files in {path}")
    out += found
  return out


# ---------------------------------------------------------------- parquet with a column mapping

# The roles a --map gives a column. Images: binary, an HF `Image` struct {bytes, path}, or a path
# (string) relative to the parquet file's folder. Text: strings; `instruction` may also be a list
# of strings (one triplet per prompt, or the first). `id` and `group` name one column or several
# joined by "+" (their values joined by "/"). The other roles are the schema's number fields.
IMAGE_ROLES = ("input", "edited")
MASK_ROLE = "mask"  # an image column; null cells, a null-typed or an absent column: no mask.
TEXT_ROLES = {"instruction": "instruction", "input_caption": "input_caption",
              "output_caption": "edited_caption", "inverse_instruction": None}
KEY_ROLES = ("id", "group")
NUMBER_ROLES = tuple(f.name for f in schema.FIELDS if f.kind in ("int", "float")
                     and f.name not in ("input_height", "input_width", "edited_height",
                                        "edited_width"))
ROLES = IMAGE_ROLES + (MASK_ROLE,) + tuple(TEXT_ROLES) + KEY_ROLES + NUMBER_ROLES
REQUIRED_ROLES = ("input", "edited", "instruction")


@dataclasses.dataclass(frozen=True)
class Preset:
  """A published parquet layout: which column plays which role (checked against its card)."""

  source: str  # the triplets' `source` field
  mapping: dict[str, str]
  doc: str
  skip_if_set: tuple[str, ...] = ()  # rows with a value in one of these columns are skipped


PRESETS: dict[str, Preset] = {
    # timbrooks/instructpix2pix-clip-filtered: original_prompt, original_image, edit_prompt,
    # edited_prompt, edited_image (images as HF Image structs).
    "clip-filtered": Preset("clip-filtered", {
        "input": "original_image", "edited": "edited_image", "instruction": "edit_prompt",
        "input_caption": "original_prompt", "output_caption": "edited_prompt"},
        "timbrooks/instructpix2pix-clip-filtered"),
    # fusing/instructpix2pix-1000-samples: input_image, edit_prompt, edited_image.
    "instructpix2pix-1000-samples": Preset("instructpix2pix-1000-samples", {
        "input": "input_image", "edited": "edited_image", "instruction": "edit_prompt"},
        "fusing/instructpix2pix-1000-samples"),
    # osunlp/MagicBrush: img_id, turn_index, source_img, mask_img, instruction, target_img; a
    # session (img_id) never straddles splits.
    "magicbrush": Preset("magicbrush", {
        "input": "source_img", "edited": "target_img", "instruction": "instruction",
        "id": "img_id+turn_index", "group": "img_id", "turn_index": "turn_index",
        "mask": "mask_img"},
        "osunlp/MagicBrush"),
    # BleachNick/UltraEdit: clip_sim_source/target/dir/image, dinov2_sim, ssim (float64),
    # source_caption, target_caption, idx (int64), edit_prompt, edit_object, source_image,
    # edited_image, mask_image (the region split's masks; a null column in the free-form
    # splits; UltraEdit_500k has neither edit_object nor mask_image). Filter on any score
    # with --where, e.g. 'clip_sim_dir>0.2' 'ssim>0.6'.
    "ultraedit": Preset("ultraedit", {
        "input": "source_image", "edited": "edited_image", "instruction": "edit_prompt",
        "input_caption": "source_caption", "output_caption": "target_caption", "id": "idx",
        "clip_sim_0": "clip_sim_source", "clip_sim_1": "clip_sim_target",
        "clip_sim_direction": "clip_sim_dir", "clip_sim_image": "clip_sim_image",
        "mask": "mask_image"},
        "BleachNick/UltraEdit"),
    # UCSC-VLAA/HQ-Edit: input, input_image, edit, inverse_edit, output, output_image. Add
    # --map inverse_instruction=inverse_edit to import the reverse edit as a second pair.
    "hq-edit": Preset("hq-edit", {
        "input": "input_image", "edited": "output_image", "instruction": "edit",
        "input_caption": "input", "output_caption": "output"},
        "UCSC-VLAA/HQ-Edit"),
    # TIGER-Lab/OmniEdit-Filtered-1.2M: omni_edit_id, task, src_img, edited_img,
    # edited_prompt_list (list of strings), width, height, sc_score_1, sc_score_2, pq_score
    # (int64), o_score (float64), sc_reasoning, pq_reasoning. Any aspect ratio; filter with e.g.
    # --where 'o_score>=9'.
    "omniedit": Preset("omniedit", {
        "input": "src_img", "edited": "edited_img", "instruction": "edited_prompt_list",
        "id": "omni_edit_id"},
        "TIGER-Lab/OmniEdit-Filtered-1.2M"),
    # Bin1117/AnyEdit: image_id, edit_instruction, edit_type, image_file, edited_file,
    # visual_input (an extra image, set for the visual-editing types), input, output. Rows with a
    # visual input need that image to be edited and are skipped; select types with e.g.
    # --where 'edit_type==remove'.
    "anyedit": Preset("anyedit", {
        "input": "image_file", "edited": "edited_file", "instruction": "edit_instruction",
        "input_caption": "input", "output_caption": "output", "id": "image_id"},
        "Bin1117/AnyEdit", skip_if_set=("visual_input",)),
    # facebook/emu_edit_test_set_generations: instruction, image, task, split, idx, hash,
    # input_caption, output_caption, edited_image, model. (facebook/emu_edit_test_set has the same
    # columns but no edited_image, so no triplet: import the generations set, e.g. for
    # jip2p-eval; select a task with --where 'task==background'.)
    "emu-edit": Preset("emu-edit", {
        "input": "image", "edited": "edited_image", "instruction": "instruction",
        "input_caption": "input_caption", "output_caption": "output_caption", "id": "idx"},
        "facebook/emu_edit_test_set_generations"),
}


def parse_mapping(text: str) -> dict[str, str]:
  """``role=column,...`` as a dict; `ConfigError` naming an unknown role or a malformed item."""
  mapping = {}
  for item in filter(None, (i.strip() for i in text.split(","))):
    role, sep, column = item.partition("=")
    role, column = role.strip(), column.strip()
    if not sep or not (column or role == MASK_ROLE):
      raise ConfigError(f"--map item {item!r}: expected role=column")
    if role not in ROLES:
      raise ConfigError(f"--map role {role!r} is unknown; roles: {', '.join(ROLES)}")
    mapping[role] = column
  return mapping


def resolve_mapping(preset: str | None, mapping: dict[str, str]) -> tuple[str, dict, tuple]:
  """(source name, the preset's mapping updated by ``mapping``, columns whose rows are skipped
  when set); `ConfigError` for an unknown preset or a missing required role."""
  if preset is not None and preset not in PRESETS:
    raise ConfigError(f"--preset {preset!r} is unknown; presets: {', '.join(PRESETS)}")
  base = PRESETS[preset] if preset else Preset("parquet", {}, "")
  merged = {role: column for role, column in {**base.mapping, **mapping}.items() if column}
  missing = [r for r in REQUIRED_ROLES if r not in merged]
  if missing:
    raise ConfigError(f"--map lacks the roles {missing} (give them, or a --preset)")
  return base.source, merged, base.skip_if_set


_WHERE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
        ">": operator.gt, "<": operator.lt}


@dataclasses.dataclass(frozen=True)
class Condition:
  """``column OP value``: numbers compare numerically, text only with == and !=."""

  column: str
  op: str
  value: float | str
  text: str

  def holds(self, cell) -> bool:
    return _OPS[self.op](cell, self.value)


def parse_where(text: str) -> Condition:
  """A `Condition` from ``'clip_sim_dir>0.2'`` or ``'edit_type==remove'``; `ConfigError` else."""
  match = _WHERE.match(text)
  if not match:
    raise ConfigError(f"--where {text!r}: expected COLUMN OP VALUE with OP one of "
                      f"{' '.join(_OPS)}, e.g. 'clip_sim_dir>0.2'")
  column, op, value = match.groups()
  try:
    value = float(value)
  except ValueError:
    if op not in ("==", "!="):
      raise ConfigError(f"--where {text!r}: {value!r} is not a number") from None
    value = value.strip("'\"")
  return Condition(column, op, value, f"{column}{op}{match.group(3)}")


def iter_parquet(files: Sequence[str], mapping: dict[str, str], *, source: str = "parquet",
                 where: Sequence[Condition] = (), prompts: str = "first",
                 skip_if_set: Sequence[str] = (), image_paths: bool = False) -> Iterator[Row]:
  """Rows of parquet files whose columns play the roles in ``mapping`` (`ROLES`).

  ``image_paths``: image columns may also be text, a path relative to the parquet file's folder
  (the published presets hold images, so a text column there is a wrong file, named as such).
  ``where``: rows failing a condition are skipped, counted by condition. ``prompts``: with a list
  of instructions, "first" makes one triplet of the first and "each" one per instruction. Every
  file's columns and their types are checked here, before the first row. The mask's column may
  be absent from a file: its triplets then have no mask.
  """
  if prompts not in ("first", "each"):
    raise ConfigError(f"prompts={prompts!r}: expected 'first' or 'each'")
  plans = []
  for path in files:
    arrow_schema = _parquet_schema(path)
    file_mapping = {role: column for role, column in mapping.items()
                    if role != MASK_ROLE or column in arrow_schema.names}
    columns = list(dict.fromkeys(_mapped_columns(file_mapping) + [c.column for c in where]
                                 + list(skip_if_set)))
    missing = [c for c in columns if c not in arrow_schema.names]
    if missing:
      raise InputError(f"{path}: missing columns {missing} (it has {sorted(arrow_schema.names)})")
    _check_role_types(path, arrow_schema, file_mapping, where, image_paths)
    plans.append((path, columns, functools.partial(
        _mapped_rows, mapping=file_mapping, source=source, where=tuple(where), prompts=prompts,
        skip_if_set=tuple(skip_if_set))))
  return (row for path, columns, to_rows in plans
          for rows in _parquet_rows(path, columns, to_rows) for row in rows)


def _mapped_columns(mapping: dict[str, str]) -> list[str]:
  out = []
  for role, column in mapping.items():
    out += column.split("+") if role in KEY_ROLES else [column]
  return out


def _mapped_rows(path: str, index: int, values: dict, *, mapping: dict[str, str], source: str,
                 where: tuple[Condition, ...], prompts: str,
                 skip_if_set: tuple[str, ...]) -> list[Row]:
  key = f"{os.path.basename(path)}:{index}"
  if "id" in mapping:
    key = "/".join(str(values[c]) for c in mapping["id"].split("+"))
  text = {role: values[mapping[role]] for role in TEXT_ROLES if role in mapping}
  captions = (text.get("input_caption") or "", text.get("output_caption") or "")
  instructions = text["instruction"]
  if isinstance(instructions, list):
    instructions = instructions[:1] if prompts == "first" else instructions
  else:
    instructions = [instructions]
  if "group" in mapping:
    group = "/".join(str(values[c]) for c in mapping["group"].split("+"))
  else:
    group = "\x1f".join((captions[0], str(text["instruction"]), captions[1]))
  for column in skip_if_set:
    if values[column] is not None:
      return [Row(key, group, None, f"{column} is set")]
  for condition in where:
    cell = values[condition.column]
    if cell is None:
      return [Row(key, group, None, f"no {condition.column}")]
    if not condition.holds(cell):
      return [Row(key, group, None, f"filtered out by {condition.text}")]
  if not instructions:
    return [Row(key, group, None, "empty instruction")]
  numbers = {role: values[column] for role, column in mapping.items()
             if role in NUMBER_ROLES and values[column] is not None}
  images = [_hf_image(values[mapping[role]], path) for role in IMAGE_ROLES]
  mask = _hf_image(values[mapping[MASK_ROLE]], path) if MASK_ROLE in mapping else None
  rows = []
  for k, instruction in enumerate(instructions):
    row_key = key if len(instructions) == 1 else f"{key}#{k}"
    rows.append(_row(row_key, group, *images, instruction, input_caption=captions[0],
                     edited_caption=captions[1], source=source, source_id=row_key,
                     mask=mask or b"", **numbers))
  if text.get("inverse_instruction"):
    row_key = f"{key}#inverse"
    rows.append(_row(row_key, group, images[1], images[0], text["inverse_instruction"],
                     input_caption=captions[1], edited_caption=captions[0], source=source,
                     source_id=row_key, mask=mask or b""))
  return rows


def iter_hf_parquet(files: Sequence[str]) -> Iterator[Row]:
  """Rows of clip-filtered or 1000-samples parquet shards (the preset is chosen by the columns).

  Every file's footer is read and its columns checked here, before the first row: a file that is
  not parquet or holds another layout is an `InputError` before anything is written.
  """
  layouts = []
  for path in files:
    names = _parquet_schema(path).names
    for name in ("clip-filtered", "instructpix2pix-1000-samples"):
      if all(c in names for c in PRESETS[name].mapping.values()):
        layouts.append((path, name))
        break
    else:
      raise InputError(
          f"{path}: columns {sorted(names)} match neither the clip-filtered layout "
          f"{list(PRESETS['clip-filtered'].mapping.values())} nor the 1000-samples layout "
          f"{list(PRESETS['instructpix2pix-1000-samples'].mapping.values())}")
  iterators = [iter_parquet([path], PRESETS[name].mapping, source=name)
               for path, name in layouts]
  return (row for rows in iterators for row in rows)


def iter_magicbrush(files: Sequence[str]) -> Iterator[Row]:
  """Rows of MagicBrush parquet shards (the "magicbrush" preset); the group is the image session
  (img_id). Every file's columns are checked here, before the first row."""
  preset = PRESETS["magicbrush"]
  return iter_parquet(files, preset.mapping, source=preset.source)


def iter_synthetic(num: int, *, seed: int = 0, size: int = 64, wording: str = "train",
                   families: Sequence[str] | None = None) -> Iterator[Row]:
  """Rows of the procedural edit world (`jip2p.data.synthetic`): examples ``0 .. num-1`` of world
  ``seed``, worded with the ``wording`` templates ("train" or "heldout"), as PNGs; ``families``
  restricts the edits to a subset of `synthetic.FAMILIES` (default: all)."""
  from jip2p.data import synthetic
  families = synthetic.FAMILIES if families is None else tuple(families)
  for ex in synthetic.generate(num, seed=seed, size=size, split=wording, families=families):
    key = f"{seed}/{ex.index}"
    yield _row(key, key, _png(ex.input_image), _png(ex.edited_image), ex.instruction,
               input_caption=ex.input_caption, edited_caption=ex.edited_caption,
               source="synthetic", source_id=key, seed=seed)


def iter_generator(root: str) -> Iterator[Row]:
  """Rows of the original generator's output folder, one per kept seed, in seeds.json order.

  The folder and its seeds.json are checked here, before the first row.
  """
  root = root.rstrip("/")
  with _reading(root):
    entries = _generator_entries(root)
  return _generator_rows(root, entries)


def _generator_entries(root: str) -> list[tuple[str, list[str]]]:
  """[(prompt folder, [seed, ...]), ...] from seeds.json, or from the folders' ``*_0.jpg``."""
  from jip2p.data.tf_setup import import_tf
  gfile = import_tf().io.gfile
  if not gfile.exists(root):
    raise InputError(f"{root} does not exist")
  if not gfile.isdir(root):
    raise InputError(f"{root} is not a folder")
  seeds_file = f"{root}/seeds.json"
  if not gfile.exists(seeds_file):
    logging.warning("%s is missing; listing the prompt folders instead", seeds_file)
    entries = []
    for name in sorted(gfile.listdir(root)):
      name = name.rstrip("/")
      if gfile.isdir(f"{root}/{name}"):
        stems = (f[:-len("_0.jpg")] for f in gfile.listdir(f"{root}/{name}")
                 if f.endswith("_0.jpg"))
        seeds = sorted(stem for stem in stems if stem.isdigit())
        if seeds:
          entries.append((name, seeds))
    return entries
  try:
    entries = json.loads(_read(seeds_file).decode("utf-8"))
  except ValueError as e:
    raise InputError(f"{seeds_file} is not UTF-8 JSON: {e}") from None
  if not isinstance(entries, list):
    raise InputError(f"{seeds_file} holds a JSON {type(entries).__name__}, not a list of "
                     "[\"prompt folder\", [seed, ...]]")
  out = []
  for i, entry in enumerate(entries):
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], list) and all(_is_seed(s) for s in entry[1])):
      raise InputError(f"{seeds_file}: entry {i} is {json.dumps(entry)[:80]}, not "
                       "[\"prompt folder\", [seed, ...]] with integer seeds")
    out.append((entry[0], [str(s) for s in entry[1]]))
  return out


def _is_seed(value) -> bool:
  return (isinstance(value, int) and not isinstance(value, bool)) or (
      isinstance(value, str) and value.isdigit())


def _generator_rows(root: str, entries: Sequence[tuple[str, list[str]]]) -> Iterator[Row]:
  for name, seeds in entries:
    folder = f"{root}/{name}"
    try:
      prompt = json.loads(_read(f"{folder}/prompt.json").decode("utf-8"))
      if not isinstance(prompt, dict):
        raise ValueError("not a JSON object")
    except (OSError, ValueError, InputError) as e:
      for seed in seeds:
        yield Row(f"{name}/{seed}", name, None, f"unreadable prompt.json ({type(e).__name__})")
      continue
    scores = _generator_scores(folder)
    # The original generator reads "caption" where the prompts file says "input" (a known bug).
    input_caption = prompt.get("input", prompt.get("caption")) or ""
    prompt_index = int(name) if name.isdigit() else -1
    for seed in seeds:
      key = f"{name}/{seed}"
      images = [_read_optional(f"{folder}/{seed}_{i}.jpg") for i in (0, 1)]
      yield _row(key, name, *images, prompt.get("edit") or "", input_caption=input_caption,
                 edited_caption=prompt.get("output") or "", source="generator", source_id=key,
                 prompt_index=prompt_index, seed=int(seed), **scores.get(int(seed), {}))


_GENERATOR_SCORES = (("p2p_threshold", "p2p_threshold"), ("cfg_scale", "cfg_scale"),
                     ("clip_sim_0", "clip_sim_0"), ("clip_sim_1", "clip_sim_1"),
                     ("clip_sim_direction", "clip_sim_dir"), ("clip_sim_image", "clip_sim_image"))


def _generator_scores(folder: str) -> dict[int, dict[str, float]]:
  """seed → its generation settings and CLIP scores in ``metadata.jsonl`` ({} if unreadable)."""
  from jip2p.data.tf_setup import import_tf
  if not import_tf().io.gfile.exists(f"{folder}/metadata.jsonl"):
    return {}
  scores = {}
  try:
    for line in _read(f"{folder}/metadata.jsonl").decode("utf-8").splitlines():
      if line.strip():
        entry = json.loads(line)
        scores[int(entry["seed"])] = {k: float(entry[m]) for k, m in _GENERATOR_SCORES
                                      if entry.get(m) is not None}
  except (ValueError, KeyError, TypeError, AttributeError, InputError) as e:
    logging.warning("%s/metadata.jsonl is unreadable (%s); its seeds keep no CLIP scores",
                    folder, e)
    return {}
  return scores


# ---------------------------------------------------------------- import


def prepare(triplet: schema.Triplet, *, store_resolution: int | None = None,
            store_format: str = "jpeg", jpeg_quality: int = 95) -> schema.Triplet | str:
  """The triplet ready to write, or the reason it is rejected.

  Both images are fully decoded (so the reader never meets a broken one). Formats other than
  PNG/JPEG become PNG. With `store_resolution`, an image whose short side is longer is resized
  (Lanczos) to that short side and re-encoded as `store_format`. A mask must have the input
  image's size; it becomes a grayscale PNG (lossless), resized with the input (nearest).
  """
  images = {}
  input_size = None
  for field in ("input_image", "edited_image"):
    data = getattr(triplet, field)
    try:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
        if field == "input_image":
          input_size = im.size
        resize = store_resolution is not None and min(im.size) > store_resolution
        if resize or schema.image_format(data) is None:
          im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
          if resize:
            scale = store_resolution / min(im.size)
            size = tuple(max(store_resolution, round(s * scale)) for s in im.size)
            im = im.resize(size, Image.Resampling.LANCZOS)
          out = io.BytesIO()
          if resize and store_format == "jpeg":
            im.save(out, "JPEG", quality=jpeg_quality)
          else:
            im.save(out, "PNG")
          data = out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
      return f"undecodable {field.replace('_', ' ')}"
    images[field] = data
  if triplet.mask:
    try:
      with Image.open(io.BytesIO(triplet.mask)) as im:
        im.load()
        if im.size != input_size:
          return "mask size differs from the input image's"
        im = im.convert("L")
        stored = schema.image_size(images["input_image"])[::-1]
        if stored != im.size:
          im = im.resize(stored, Image.Resampling.NEAREST)
        out = io.BytesIO()
        im.save(out, "PNG")
        images["mask"] = out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
      return "undecodable mask"
  return dataclasses.replace(triplet, **images)


def check_options(*, validation_fraction: float = 0.0, split: str | None = None,
                  store_resolution: int | None = None, store_format: str = "jpeg",
                  jpeg_quality: int = 95, workers: int | None = None) -> None:
  """Named `ConfigError`s for `import_rows`' options (a CLI checks them before it writes)."""
  if store_format not in ("jpeg", "png"):
    raise ConfigError(f"store_format={store_format!r}: expected 'jpeg' or 'png'")
  if store_resolution is not None and store_resolution < 1:
    raise ConfigError(f"store_resolution={store_resolution}: must be positive")
  if not 0 <= validation_fraction < 1:
    raise ConfigError(f"validation_fraction={validation_fraction}: must lie in [0, 1)")
  if not 1 <= jpeg_quality <= 100:
    raise ConfigError(f"jpeg_quality={jpeg_quality}: must lie in [1, 100]")
  if workers is not None and workers < 1:
    raise ConfigError(f"workers={workers}: must be at least 1")
  if split is not None:
    check_split_name(split)


def import_rows(rows: Iterable[Row], writer, *, validation_fraction: float = 0.0,
                split_seed: int = 0, split: str | None = None,
                store_resolution: int | None = None, store_format: str = "jpeg",
                jpeg_quality: int = 95, workers: int | None = None,
                progress: Callable[[ImportReport], None] | None = None,
                progress_every: int = 1000) -> ImportReport:
  """Validates, splits and writes `rows` into `writer` (a `DatasetWriter`), resuming its cursor.

  `split` puts every row in that split; otherwise `assign_split(row.group, validation_fraction,
  split_seed)` decides. Images are decoded on `workers` threads (default: all cores), a few rows
  at a time, in order.
  """
  check_options(validation_fraction=validation_fraction, split=split,
                store_resolution=store_resolution, store_format=store_format,
                jpeg_quality=jpeg_quality, workers=workers)
  workers = workers or os.cpu_count() or 1
  report = ImportReport()
  cursors: dict[str, int | None] = {}
  chunk: list[tuple[int, str, Row]] = []

  def flush(pool):
    triplets = pool.map(
        lambda item: prepare(item[2].triplet, store_resolution=store_resolution,
                             store_format=store_format, jpeg_quality=jpeg_quality), chunk)
    for (index, row_split, row), result in zip(chunk, triplets):
      if isinstance(result, str):
        report.skipped[result] += 1
        logging.info("skipping %s: %s", row.key, result)
      else:
        writer.write(result, row_split, cursor=index)
        report.written[row_split] += 1
    chunk.clear()

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for index, row in enumerate(rows):
      report.rows += 1
      row_split = split or assign_split(row.group, validation_fraction, split_seed)
      if row_split not in cursors:
        cursors[row_split] = writer.cursor(row_split)
      if cursors[row_split] is not None and index <= cursors[row_split]:
        report.resumed += 1
      elif row.triplet is None:
        report.skipped[row.skip_reason] += 1
        logging.info("skipping %s: %s", row.key, row.skip_reason)
      else:
        chunk.append((index, row_split, row))
        if len(chunk) >= 4 * workers:
          flush(pool)
      if progress is not None and report.rows % progress_every == 0:
        progress(report)
    flush(pool)
  return report


# ---------------------------------------------------------------- helpers


def _row(key: str, group: str, input_image: bytes | None, edited_image: bytes | None,
         instruction: str, **fields) -> Row:
  if not input_image:
    return Row(key, group, None, "missing input image")
  if not edited_image:
    return Row(key, group, None, "missing edited image")
  if not isinstance(instruction, str) or not instruction.strip():
    return Row(key, group, None, "empty instruction")
  for name, value in fields.items():
    if schema.FIELDS_BY_NAME[name].kind == "text" and not isinstance(value, str):
      return Row(key, group, None, f"{name.replace('_', ' ')} is not text")
  return Row(key, group, schema.Triplet(input_image=input_image, edited_image=edited_image,
                                        instruction=instruction, **fields))


def _png(image) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, "PNG")
  return out.getvalue()


def _hf_image(value, parquet_path: str) -> bytes | None:
  """Bytes of an image cell (an HF `Image` struct {bytes, path}, raw bytes, or a path relative to
  the parquet file's folder); None when absent."""
  if value is None:
    return None
  if isinstance(value, bytes):
    return value
  if isinstance(value, str):
    value = {"path": value}
  if value.get("bytes"):
    return value["bytes"]
  if value.get("path"):
    return _read_optional(os.path.join(os.path.dirname(parquet_path), value["path"]))
  return None


def _parquet_schema(path: str):
  """The arrow schema from a parquet file's footer; `InputError` if it is not readable parquet."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    with _reading(path), _open(path) as f:
      return pq.ParquetFile(f).schema_arrow
  except (pa.ArrowException, OSError) as e:
    raise InputError(f"{path} is not a readable parquet file (empty, truncated or another "
                     f"format): {_first_line(e)}") from None


_KIND_NAMES = {"text": "text (string)", "prompts": "text or a list of text",
               "number": "numbers", "key": "strings or integers",
               "image": "images (binary, or a struct whose 'bytes' field is binary)",
               "mask": "images or nulls"}


def _check_role_types(path: str, arrow_schema, mapping: dict[str, str],
                      where: Sequence[Condition], image_paths: bool) -> None:
  """`InputError` naming the first mapped (or filtered) column whose type cannot play its role."""
  import pyarrow as pa
  is_text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
  is_bytes = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)
  is_number = lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)
  is_image = lambda t: is_bytes(t) or (image_paths and is_text(t)) or (
      pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
      and is_bytes(t.field("bytes").type)
      and (t.get_field_index("path") < 0 or is_text(t.field("path").type)))
  checks = {
      "text": is_text, "number": is_number, "key": lambda t: is_text(t) or pa.types.is_integer(t),
      "prompts": lambda t: is_text(t) or ((pa.types.is_list(t) or pa.types.is_large_list(t))
                                          and is_text(t.value_type)),
      "image": is_image, "mask": lambda t: pa.types.is_null(t) or is_image(t)}
  kinds = []
  for role, column in mapping.items():
    kind = ("image" if role in IMAGE_ROLES else "mask" if role == MASK_ROLE
            else "prompts" if role == "instruction"
            else "text" if role in TEXT_ROLES else "number" if role in NUMBER_ROLES else "key")
    kinds += [(c, kind) for c in column.split("+")] if role in KEY_ROLES else [(column, kind)]
  kinds += [(c.column, "number" if isinstance(c.value, float) else "text") for c in where]
  for column, kind in kinds:
    t = arrow_schema.field(column).type
    if not checks[kind](t):
      raise InputError(f"{path}: column {column!r} holds {t}; expected {_KIND_NAMES[kind]}")


def _parquet_rows(path: str, columns: Sequence[str],
                  to_rows: Callable[[str, int, dict], list[Row]]) -> Iterator[list[Row]]:
  """``to_rows(path, index, values)`` for each row, a row group at a time, a few rows at once.

  A row group whose data cannot be read (a damaged page) becomes skipped rows, so the rows after
  it keep their numbers and a rerun resumes where it should.
  """
  import pyarrow as pa
  import pyarrow.parquet as pq
  index = 0
  with _reading(path), _open(path) as f:
    parquet = pq.ParquetFile(f)
    for group in range(parquet.num_row_groups):
      end = index + parquet.metadata.row_group(group).num_rows
      try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group],
                                          columns=list(columns)):
          for values in batch.to_pylist():
            yield to_rows(path, index, values)
            index += 1
      except (pa.ArrowException, OSError) as e:
        logging.warning("%s: rows %d to %d are unreadable (%s); skipping them", path, index,
                        end - 1, _first_line(e))
      for skipped in range(index, end):
        key = f"{os.path.basename(path)}:{skipped}"
        yield [Row(key, key, None, "unreadable parquet data")]
      index = end


@contextlib.contextmanager
def _reading(path: str):
  """tf.io.gfile's failures (an unknown scheme, no access, ...) as one `InputError` naming path."""
  from jip2p.data.tf_setup import import_tf
  tf = import_tf()
  try:
    yield
  except tf.errors.OpError as e:
    raise InputError(f"cannot read {path}: {e.message}") from None


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _open(path: str):
  """A binary file object; remote paths (gs://, ...) through tf.io.gfile."""
  if "://" in path:
    from jip2p.data.tf_setup import import_tf
    return io.BufferedReader(_GFileReader(import_tf().io.gfile.GFile(path, "rb")), 1 << 20)
  return open(path, "rb")


class _GFileReader(io.RawIOBase):
  """A GFile as a standard raw stream (pyarrow needs `closed`, `readinto`, ...)."""

  def __init__(self, f):
    super().__init__()
    self._f = f

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    self._f.seek(offset, whence)
    return self._f.tell()

  def tell(self) -> int:
    return self._f.tell()

  def close(self) -> None:
    self._f.close()
    super().close()


def _read(path: str) -> bytes:
  if "://" in path:
    from jip2p.data.tf_setup import import_tf
    tf = import_tf()
    try:
      with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()
    except tf.errors.OpError as e:
      raise InputError(f"cannot read {path}: {e.message}") from None
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"cannot read {path}: {e}") from None


def _read_optional(path: str) -> bytes | None:
  try:
    return _read(path)
  except InputError:
    return None
