"""Sharded TFRecord writer for edit triplets: atomic shards, a manifest, resumable after a crash.

Layout of a dataset directory (local or gs://, all I/O through `tf.io.gfile`):

  {name}-{split}.tfrecord-{index:05d}   complete shards of `examples_per_shard` records (the last
                                        shard of a split may be shorter once the writer closed)
  {name}-{split}.tfrecord-{index:05d}.incomplete   the shard being written (never read)
  manifest.json                         format, schema version, per split: counts and the shard
                                        list with sizes and sha256 checksums; "complete" once closed
  dataset_info.json, features.json      TFDS metadata (written by `close`): the directory is a
                                        TFDS dataset for `tfds.builder_from_directory`

A shard is written under a temporary name; when full it is listed in the manifest (with its
checksum and the producer's cursor), then renamed. A writer opened on an existing directory
finishes such a rename if a crash interrupted it, drops the unfinished shard, and reports per split
what is safely stored: `committed(split)` examples, and `cursor(split)`, the position in the
producer's input of the last stored example. A producer with a deterministic input order skips
up to there and writes the rest; the result holds exactly the examples of an uninterrupted run,
in the same shards. The importers do this.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from jip2p.data import schema
from jip2p.data.tf_setup import import_tf
from jip2p.errors import ConfigError, InputError

MANIFEST = "manifest.json"
FORMAT = "jip2p-triplets"
DEFAULT_NAME = "jip2p_triplets"
_INCOMPLETE = ".incomplete"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def shard_filename(name: str, split: str, index: int) -> str:
  """Shard `index`'s file name: TFDS template `{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}`."""
  return f"{name}-{split}.tfrecord-{index:05d}"


def check_split_name(split: str) -> None:
  """A named `ConfigError` unless ``split`` can name a split (and its shard files)."""
  if not isinstance(split, str) or not _SPLIT_RE.match(split):
    raise ConfigError(f"split name {split!r} must match [a-z][a-z0-9_]*")


def serialize(record: Mapping[str, Any]) -> bytes:
  """A `schema.to_record` dict as a serialized `tf.train.Example` (deterministic bytes)."""
  tf = import_tf()
  feature = {}
  for f in schema.FIELDS:
    value = record[f.name]
    if f.kind in ("image", "mask", "text"):
      feature[f.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    elif f.kind == "int":
      feature[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))
    else:
      feature[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)


def read_manifest(directory: str) -> dict:
  """The manifest of a dataset directory; InputError if it is missing or unreadable."""
  tf = import_tf()
  path = _join(directory, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise InputError(f"{directory} holds no {MANIFEST}: not a jip2p dataset directory")
  try:
    with tf.io.gfile.GFile(path, "r") as f:
      manifest = json.loads(f.read())
  except (ValueError, tf.errors.OpError) as e:
    raise InputError(f"cannot read {path}: {e}") from None
  if manifest.get("format") != FORMAT:
    raise InputError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
  if manifest.get("schema_version") != schema.SCHEMA_VERSION:
    raise InputError(f"{path} has schema version {manifest.get('schema_version')}; this jip2p "
                     f"reads version {schema.SCHEMA_VERSION}")
  return manifest


def _named_io_errors(method):
  """A file-system failure inside a `DatasetWriter` method (no space, no permission, a path
  under a regular file, ...) becomes one `InputError` line naming the dataset directory."""

  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    tf = import_tf()
    try:
      return method(self, *args, **kwargs)
    except (tf.errors.OpError, OSError) as e:
      reason = e.message if isinstance(e, tf.errors.OpError) else (e.strerror or str(e))
      raise InputError(f"cannot write the dataset {self.directory}: {reason}") from None

  return wrapped


class DatasetWriter:
  """Writes `schema.Triplet`s into sharded TFRecords, per split, resuming what a crash left.

  Use as a context manager (or call `close()`): a clean exit commits the last partial shard of
  each split, marks the manifest complete and writes the TFDS metadata (unless `tfds_metadata`
  is False: TFDS reaches local, gs:// and s3:// paths only); leaving by an exception commits
  nothing more, like a crash, and removes a dataset that has no committed shard (`abandon`).
  File-system failures are `InputError`s naming the directory.
  """

  @_named_io_errors
  def __init__(self, directory: str, *, name: str = DEFAULT_NAME, examples_per_shard: int = 1000,
               version: str = "1.0.0", description: str = "",
               metadata: Mapping[str, Any] | None = None, tfds_metadata: bool = True):
    tf = import_tf()
    self.directory = directory.rstrip("/")
    if not _NAME_RE.match(name):
      raise ConfigError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*), as TFDS "
                        "requires")
    if not isinstance(examples_per_shard, int) or examples_per_shard < 1:
      raise ConfigError(f"examples_per_shard={examples_per_shard!r}: must be a positive integer")
    self._tf = tf
    self._tfds_metadata = tfds_metadata
    self._open: dict[str, _OpenShard] = {}
    self._made = _missing_folders(tf, self.directory)
    tf.io.gfile.makedirs(self.directory)
    if tf.io.gfile.exists(_join(self.directory, MANIFEST)):
      manifest = read_manifest(self.directory)
      for key, value in (("name", name), ("examples_per_shard", examples_per_shard)):
        if manifest[key] != value:
          raise ConfigError(f"{self.directory} was written with {key}={manifest[key]!r}; resuming "
                            f"it with {key}={value!r} would mix layouts")
      manifest["complete"] = False
    else:
      manifest = {"format": FORMAT, "schema_version": schema.SCHEMA_VERSION, "name": name,
                  "version": version, "description": description,
                  "examples_per_shard": examples_per_shard, "complete": False, "splits": {}}
    if metadata is not None:
      manifest["metadata"] = dict(metadata)
    self._manifest = manifest
    self._finish_interrupted_commit()
    for path in tf.io.gfile.glob(_join(self.directory, f"{name}-*{_INCOMPLETE}")):
      tf.io.gfile.remove(path)
    self._write_manifest()

  @property
  def name(self) -> str:
    return self._manifest["name"]

  def committed(self, split: str) -> int:
    """Examples of `split` stored in complete shards: a resuming producer skips this many."""
    info = self._manifest["splits"].get(split)
    return info["num_examples"] if info else 0

  def cursor(self, split: str):
    """The `cursor` given with the last example of `split`'s last complete shard (None if none).

    A producer that numbers its input (as the importers do) resumes after this position, which
    also covers input it rejected in between.
    """
    info = self._manifest["splits"].get(split)
    return info["shards"][-1]["last_cursor"] if info and info["shards"] else None

  @_named_io_errors
  def write(self, triplet: schema.Triplet, split: str = "train", cursor=None) -> None:
    """Appends one triplet to `split`; InputError (nothing written) if it breaks the schema.

    `cursor` (any JSON value, e.g. the input row number) is kept with the shard for `cursor()`.
    """
    data = serialize(schema.to_record(triplet))
    shard = self._open.get(split)
    if shard is None:
      check_split_name(split)
      info = self._manifest["splits"].setdefault(split, {"num_examples": 0, "shards": []})
      path = _join(self.directory, shard_filename(self.name, split, len(info["shards"])))
      shard = self._open[split] = _OpenShard(self._tf, path)
    shard.write(data, cursor)
    if shard.count == self._manifest["examples_per_shard"]:
      self._commit(split)

  @_named_io_errors
  def close(self) -> dict:
    """Commits partial shards, marks the manifest complete, writes TFDS metadata; the manifest."""
    for split in list(self._open):
      self._commit(split)
    self._manifest["complete"] = True
    self._write_manifest()
    if self._tfds_metadata:
      from jip2p.data import tfds as tfds_lib
      tfds_lib.write_metadata(self.directory, self._manifest)
    return self._manifest

  @_named_io_errors
  def abandon(self) -> None:
    """Stops without committing the open shards (what a crash leaves behind), except that a
    dataset with no committed shard is removed: its manifest, its unfinished shards and the
    folders this writer made."""
    for shard in self._open.values():
      with contextlib.suppress(self._tf.errors.OpError):  # the full disk that stopped the writes
        shard.writer.close()
    self._open.clear()
    if any(info["shards"] for info in self._manifest["splits"].values()):
      return
    gfile = self._tf.io.gfile
    for path in gfile.glob(_join(self.directory, f"{self.name}-*{_INCOMPLETE}")):
      gfile.remove(path)
    gfile.remove(_join(self.directory, MANIFEST))
    for folder in self._made:  # the deepest first; one holding other files stays
      if gfile.exists(folder) and not gfile.listdir(folder):
        gfile.rmtree(folder)

  def __enter__(self) -> DatasetWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      try:
        self.close()
      except Exception:  # e.g. the last shard's flush on a full disk: left as by any failure
        with contextlib.suppress(Exception):
          self.abandon()
        raise
    else:
      self.abandon()

  def _commit(self, split: str) -> None:
    """Lists the shard in the manifest, then renames it (a crash in between: see __init__)."""
    shard = self._open.pop(split)
    shard.writer.close()
    if shard.count == 0:
      self._tf.io.gfile.remove(shard.temp_path)
      return
    num_bytes, sha256 = _file_digest(self._tf, shard.temp_path)
    info = self._manifest["splits"][split]
    info["shards"].append({"file": _basename(shard.path), "num_examples": shard.count,
                           "num_bytes": num_bytes, "sha256": sha256,
                           "last_cursor": shard.last_cursor})
    info["num_examples"] += shard.count
    self._write_manifest()
    self._tf.io.gfile.rename(shard.temp_path, shard.path, overwrite=True)

  def _finish_interrupted_commit(self) -> None:
    """Renames a shard that the manifest lists but a crash left under its temporary name."""
    tf = self._tf
    for split, info in self._manifest["splits"].items():
      for shard in info["shards"]:
        path = _join(self.directory, shard["file"])
        if tf.io.gfile.exists(path):
          continue
        temp = path + _INCOMPLETE
        if (tf.io.gfile.exists(temp)
            and _file_digest(tf, temp) == (shard["num_bytes"], shard["sha256"])):
          tf.io.gfile.rename(temp, path, overwrite=True)
        else:
          raise InputError(f"{path}, listed in {MANIFEST} for split {split!r}, is missing: the "
                           "dataset directory was damaged; write it again")

  def _write_manifest(self) -> None:
    path = _join(self.directory, MANIFEST)
    with self._tf.io.gfile.GFile(path + _INCOMPLETE, "w") as f:
      f.write(json.dumps(self._manifest, indent=1))
    self._tf.io.gfile.rename(path + _INCOMPLETE, path, overwrite=True)


class _OpenShard:

  def __init__(self, tf, path: str):
    self.path = path
    self.temp_path = path + _INCOMPLETE
    self.writer = tf.io.TFRecordWriter(self.temp_path)
    self.count = 0
    self.last_cursor = None

  def write(self, data: bytes, cursor) -> None:
    self.writer.write(data)
    self.count += 1
    self.last_cursor = cursor


def _missing_folders(tf, directory: str) -> list[str]:
  """The folders ``makedirs(directory)`` will create, the deepest first (never a top-level one)."""
  directory = directory if "://" in directory else os.path.abspath(directory)
  missing = []
  while "/" in directory.split("://", 1)[-1].strip("/") and not tf.io.gfile.exists(directory):
    missing.append(directory)
    directory = directory.rsplit("/", 1)[0]
  return missing


def _file_digest(tf, path: str) -> tuple[int, str]:
  digest, size = hashlib.sha256(), 0
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def _join(directory: str, name: str) -> str:
  return f"{directory.rstrip('/')}/{name}"


def _basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]
