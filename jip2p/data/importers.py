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

Every source yields `Row`s in a deterministic order; `import_rows` validates them (full decode),
optionally stores the images at a smaller resolution, assigns a split by a hash of the row's
*group* (its prompt, or MagicBrush session) so one prompt's pairs never straddle splits, and
writes. Rejected rows are counted by reason. Resuming: each write carries the row number as the
writer's cursor; a rerun into the same directory skips every row up to the cursor of its split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

from PIL import Image

from jip2p.data import schema
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
  """Rows of clip-filtered or 1000-samples parquet shards (the layout is read from the columns)."""
  for path in files:
    names = _parquet_columns(path)
    if all(c in names for c in CLIP_FILTERED_COLUMNS):
      columns, source = CLIP_FILTERED_COLUMNS, "clip-filtered"
    elif all(c in names for c in SAMPLES_1000_COLUMNS):
      columns, source = SAMPLES_1000_COLUMNS, "instructpix2pix-1000-samples"
    else:
      raise InputError(f"{path}: columns {sorted(names)} match neither the clip-filtered layout "
                       f"{list(CLIP_FILTERED_COLUMNS)} nor the 1000-samples layout "
                       f"{list(SAMPLES_1000_COLUMNS)}")
    for index, row in _iter_parquet_rows(path, columns):
      key = f"{os.path.basename(path)}:{index}"
      input_caption = row.get("original_prompt") or ""
      edited_caption = row.get("edited_prompt") or ""
      instruction = row.get("edit_prompt") or ""
      input_image = _hf_image(row.get("original_image", row.get("input_image")), path)
      edited_image = _hf_image(row["edited_image"], path)
      yield _row(key, "\x1f".join((input_caption, instruction, edited_caption)), input_image,
                 edited_image, instruction, input_caption=input_caption,
                 edited_caption=edited_caption, source=source, source_id=key)


def iter_magicbrush(files: Sequence[str]) -> Iterator[Row]:
  """Rows of MagicBrush parquet shards; the group is the image session (img_id)."""
  for path in files:
    names = _parquet_columns(path)
    missing = [c for c in MAGICBRUSH_COLUMNS if c not in names]
    if missing:
      raise InputError(f"{path}: not a MagicBrush parquet file, missing columns {missing}")
    for _, row in _iter_parquet_rows(path, MAGICBRUSH_COLUMNS):
      img_id = str(row["img_id"])
      turn = row["turn_index"]
      key = f"{img_id}/{turn}"
      yield _row(key, img_id, _hf_image(row["source_img"], path),
                 _hf_image(row["target_img"], path), row["instruction"] or "",
                 source="magicbrush", source_id=key, turn_index=-1 if turn is None else int(turn))


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
  """Rows of the original generator's output folder, one per kept seed, in seeds.json order."""
  from jip2p.data.tf_setup import import_tf
  gfile = import_tf().io.gfile
  root = root.rstrip("/")
  if not gfile.isdir(root):
    raise InputError(f"{root} is not a folder")
  seeds_file = f"{root}/seeds.json"
  if gfile.exists(seeds_file):
    entries = json.loads(_read(seeds_file).decode("utf-8"))
  else:
    logging.warning("%s is missing; listing the prompt folders instead", seeds_file)
    entries = []
    for name in sorted(gfile.listdir(root)):
      name = name.rstrip("/")
      if gfile.isdir(f"{root}/{name}"):
        seeds = sorted(f[:-len("_0.jpg")] for f in gfile.listdir(f"{root}/{name}")
                       if f.endswith("_0.jpg"))
        if seeds:
          entries.append([name, seeds])
  for name, seeds in entries:
    folder = f"{root}/{name}"
    try:
      prompt = json.loads(_read(f"{folder}/prompt.json").decode("utf-8"))
    except (OSError, ValueError, InputError) as e:
      for seed in seeds:
        yield Row(f"{name}/{seed}", name, None, f"unreadable prompt.json ({type(e).__name__})")
      continue
    metadata = {}
    if gfile.exists(f"{folder}/metadata.jsonl"):
      try:
        for line in _read(f"{folder}/metadata.jsonl").decode("utf-8").splitlines():
          if line.strip():
            entry = json.loads(line)
            metadata[int(entry["seed"])] = entry
      except (ValueError, KeyError, TypeError, InputError) as e:
        logging.warning("%s/metadata.jsonl is unreadable (%s); its seeds keep no CLIP scores",
                        folder, e)
    # The original generator reads "caption" where the prompts file says "input" (a known bug).
    input_caption = prompt.get("input", prompt.get("caption")) or ""
    prompt_index = int(name) if name.isdigit() else -1
    for seed in seeds:
      meta = metadata.get(int(seed), {})
      key = f"{name}/{seed}"
      images = [_read_optional(f"{folder}/{seed}_{i}.jpg") for i in (0, 1)]
      yield _row(
          key, name, *images, prompt.get("edit") or "", input_caption=input_caption,
          edited_caption=prompt.get("output") or "", source="generator", source_id=key,
          prompt_index=prompt_index, seed=int(seed),
          **{k: float(meta[m]) for k, m in (
              ("p2p_threshold", "p2p_threshold"), ("cfg_scale", "cfg_scale"),
              ("clip_sim_0", "clip_sim_0"), ("clip_sim_1", "clip_sim_1"),
              ("clip_sim_direction", "clip_sim_dir"), ("clip_sim_image", "clip_sim_image"))
             if meta.get(m) is not None})


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
  if store_format not in ("jpeg", "png"):
    raise ConfigError(f"store_format={store_format!r}: expected 'jpeg' or 'png'")
  if store_resolution is not None and store_resolution < 1:
    raise ConfigError(f"store_resolution={store_resolution}: must be positive")
  if not 0 <= validation_fraction < 1:
    raise ConfigError(f"validation_fraction={validation_fraction}: must lie in [0, 1)")
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


def _parquet_columns(path: str) -> set[str]:
  import pyarrow.parquet as pq
  with _open(path) as f:
    return set(pq.ParquetFile(f).schema_arrow.names)


def _iter_parquet_rows(path: str, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
  import pyarrow.parquet as pq
  index = 0
  with _open(path) as f:
    for batch in pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=list(columns)):
      for row in batch.to_pylist():
        yield index, row
        index += 1


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
