"""Importers for the released edit datasets, from files a user downloaded, into a `DatasetWriter`.

Sources (docs/design.md §1, "Released data formats"):
  * HF parquet shards of `timbrooks/instructpix2pix-clip-filtered` (original_prompt,
    original_image, edit_prompt, edited_prompt, edited_image) and
    `fusing/instructpix2pix-1000-samples` (input_image, edit_prompt, edited_image); images are
    HF `Image` structs {bytes, path}. Read with pyarrow a few rows at a time, never whole.
  * the original generator's folders: `seeds.json` ([[dir, [seed, ...]], ...]),
    `{i:07d}/prompt.json` ({"input" or "caption", "edit", "output"}), `{seed}_0.jpg`,
    `{seed}_1.jpg` and `metadata.jsonl` (seed, p2p_threshold, cfg_scale, clip_sim_0/1/dir/image);
    every listed seed becomes one triplet with its CLIP scores.
  * MagicBrush parquet (img_id, turn_index, source_img, mask_img, instruction, target_img).
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
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from PIL import Image

from jip2p.data import schema
from jip2p.data.writer import check_split_name
from jip2p.errors import ConfigError, InputError

CLIP_FILTERED_COLUMNS = ("original_prompt", "original_image", "edit_prompt", "edited_prompt",
                         "edited_image")
SAMPLES_1000_COLUMNS = ("input_image", "edit_prompt", "edited_image")
MAGICBRUSH_COLUMNS = ("img_id", "turn_index", "source_img", "instruction", "target_img")
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


def iter_hf_parquet(files: Sequence[str]) -> Iterator[Row]:
  """Rows of clip-filtered or 1000-samples parquet shards (the layout is read from the columns).

  Every file's footer is read and its columns checked here, before the first row: a file that is
  not parquet or holds another layout is an `InputError` before anything is written.
  """
  layouts = []
  for path in files:
    arrow_schema = _parquet_schema(path)
    names = arrow_schema.names
    if all(c in names for c in CLIP_FILTERED_COLUMNS):
      layouts.append((path, CLIP_FILTERED_COLUMNS, "clip-filtered"))
    elif all(c in names for c in SAMPLES_1000_COLUMNS):
      layouts.append((path, SAMPLES_1000_COLUMNS, "instructpix2pix-1000-samples"))
    else:
      raise InputError(f"{path}: columns {sorted(names)} match neither the clip-filtered layout "
                       f"{list(CLIP_FILTERED_COLUMNS)} nor the 1000-samples layout "
                       f"{list(SAMPLES_1000_COLUMNS)}")
    _check_column_types(path, arrow_schema, layouts[-1][1])
  return (row for path, columns, source in layouts
          for row in _parquet_rows(path, columns, functools.partial(_hf_row, source=source)))


def _hf_row(path: str, index: int, row: dict, *, source: str) -> Row:
  key = f"{os.path.basename(path)}:{index}"
  input_caption = row.get("original_prompt") or ""
  edited_caption = row.get("edited_prompt") or ""
  instruction = row.get("edit_prompt") or ""
  input_image = _hf_image(row.get("original_image", row.get("input_image")), path)
  edited_image = _hf_image(row["edited_image"], path)
  return _row(key, "\x1f".join((input_caption, instruction, edited_caption)), input_image,
              edited_image, instruction, input_caption=input_caption,
              edited_caption=edited_caption, source=source, source_id=key)


def iter_magicbrush(files: Sequence[str]) -> Iterator[Row]:
  """Rows of MagicBrush parquet shards; the group is the image session (img_id). Every file's
  columns are checked here, before the first row."""
  for path in files:
    arrow_schema = _parquet_schema(path)
    missing = [c for c in MAGICBRUSH_COLUMNS if c not in arrow_schema.names]
    if missing:
      raise InputError(f"{path}: not a MagicBrush parquet file, missing columns {missing}")
    _check_column_types(path, arrow_schema, MAGICBRUSH_COLUMNS)
  return (row for path in files for row in _parquet_rows(path, MAGICBRUSH_COLUMNS, _magicbrush_row))


def _magicbrush_row(path: str, index: int, row: dict) -> Row:
  img_id, turn = str(row["img_id"]), row["turn_index"]
  key = f"{img_id}/{turn}"
  return _row(key, img_id, _hf_image(row["source_img"], path), _hf_image(row["target_img"], path),
              row["instruction"] or "", source="magicbrush", source_id=key,
              turn_index=-1 if turn is None else int(turn))


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
  (Lanczos) to that short side and re-encoded as `store_format`.
  """
  images = {}
  for field in ("input_image", "edited_image"):
    data = getattr(triplet, field)
    try:
      with Image.open(io.BytesIO(data)) as im:
        im.load()
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
  """Bytes of an HF `Image` cell ({bytes, path}, or raw bytes); None when absent."""
  if value is None:
    return None
  if isinstance(value, bytes):
    return value
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


# What each column must hold, and how to say so.
_COLUMN_KINDS = {"img_id": "id", "turn_index": "int"} | {
    c: "image" for c in ("original_image", "input_image", "edited_image", "source_img",
                         "target_img")} | {
    c: "text" for c in ("original_prompt", "edit_prompt", "edited_prompt", "instruction")}
_KIND_NAMES = {"text": "text (string)", "int": "integers", "id": "strings or integers",
               "image": "images (binary, or a struct whose 'bytes' field is binary)"}


def _check_column_types(path: str, arrow_schema, columns: Sequence[str]) -> None:
  """`InputError` naming the first of ``columns`` whose type in ``arrow_schema`` cannot hold its
  kind."""
  import pyarrow as pa
  is_text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)
  is_bytes = lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)
  for name in columns:
    t = arrow_schema.field(name).type
    kind = _COLUMN_KINDS[name]
    ok = {"text": is_text(t), "int": pa.types.is_integer(t),
          "id": is_text(t) or pa.types.is_integer(t),
          "image": is_bytes(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                                   and is_bytes(t.field("bytes").type)
                                   and (t.get_field_index("path") < 0
                                        or is_text(t.field("path").type)))}[kind]
    if not ok:
      raise InputError(f"{path}: column {name!r} holds {t}; expected {_KIND_NAMES[kind]}")


def _parquet_rows(path: str, columns: Sequence[str],
                  to_row: Callable[[str, int, dict], Row]) -> Iterator[Row]:
  """``to_row(path, index, values)`` for each row, a row group at a time, a few rows at once.

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
            yield to_row(path, index, values)
            index += 1
      except (pa.ArrowException, OSError) as e:
        logging.warning("%s: rows %d to %d are unreadable (%s); skipping them", path, index,
                        end - 1, _first_line(e))
      for skipped in range(index, end):
        key = f"{os.path.basename(path)}:{skipped}"
        yield Row(key, key, None, "unreadable parquet data")
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
