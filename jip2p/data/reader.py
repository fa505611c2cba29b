"""The tf.data input pipeline: triplet records → augmented numpy batches for training.

Pipeline, per epoch e (each host builds its own):

  shards ─ host_slices ─→ this host's [start, stop) record ranges (disjoint across hosts)
         ─ order shuffled by (seed, host, e) ─ interleave (deterministic) ─ shuffle buffer
         ─ + an end-of-epoch marker ─ enumerate → position p
         ─ parse, check, decode, paired augmentation (random keyed by (seed, host, e, p)) ─┐
  then, across epochs:  count bad records (one sequential scan) ─ drop them ─ batch ─ tokenize
         ─ prefetch ─→ numpy {"input", "edited", "input_ids", ("instruction"), ("mask"),
                              ("original_size", "crop_top_left")}

Paired augmentation (the paper's): both images are resized to one random square size in
[min_resize, max_resize], then one shared random crop of `resolution` and one shared horizontal
flip (probability `flip_prob`) are applied, so the two stay aligned. It is computed crop-first
(see `decode_and_augment`): only the part of each source that the crop keeps is decoded and
resized. Values are scaled to [-1, 1]. With `include_mask`, the record's mask (schema field
"mask") gets the same crop, flip and resize and comes out as "mask" in [0, 1], [S, S, 1]; a record
without one gets ones (all of it may change). Without it the mask is not even parsed.

With `include_geometry` (SDXL's per-example micro-conditioning, `jip2p.train.step`), each example
also carries "original_size", the edited image's stored (height, width) (read from its PNG or JPEG
header), and "crop_top_left", the crop's (top, left) in the resized square, as seen in the image
trained on: after a flip, its left is the square's side − S − the crop's left. Both int32 [2];
without augmentation, (0, 0).

Determinism: the output depends only on the data, the config's seed and (process_index,
process_count); thread counts and timing do not change it.

Resume (an (epoch, position) skip, not a tf.data iterator checkpoint — that would store the
shuffle buffer's records): `BatchIterator.state()` is a small JSON-able `ReaderState`; passing it
back as `make_iterator(..., state=...)` rebuilds the pipeline at that epoch, skips the first
`position` records of the epoch's shuffled stream before they are parsed, and continues with
exactly the batches the uninterrupted iterator would have produced. The skip re-reads at most one
epoch of this host's records, undecoded. The state is per host.

Bad data: a record lost to a truncated or corrupt shard ("unreadable"), a record that cannot be
parsed or whose image cannot be decoded ("undecodable"), one lacking an image or the instruction
("missing_field"), one with an empty instruction ("empty_instruction") — each is skipped and
counted; `BatchIterator.stats()` has the counts. Once `min_records_for_check` records were seen
and more than `max_bad_fraction` of them were bad, the iterator raises `InputError` with the
counts. The check runs inside the pipeline, so even data with no good record at all stops with
that error rather than hanging.

Tokenization happens in the pipeline (after batching), with a tokenizer chosen at read time: SD
1.x and 2.x pad differently, so ids stored at write time would tie a dataset to one model.
bench/reader_throughput.py puts its cost at a few percent of the reader's, which is all that
tokenizing at write time could save.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jip2p.data import schema, writer
from jip2p.data.tf_setup import import_tf, op_error_text
from jip2p.errors import ConfigError, InputError

COUNTERS = ("records", "ok", "unreadable", "undecodable", "missing_field", "empty_instruction")
_OK, _SENTINEL, _MISSING, _UNDECODABLE, _EMPTY = 0, 1, 2, 3, 4
_STATUS_COUNTER = {_OK: "ok", _MISSING: "missing_field", _UNDECODABLE: "undecodable",
                   _EMPTY: "empty_instruction"}
RESIZE_METHODS = ("area", "bilinear", "bicubic", "lanczos3")


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
  """What to read and how; `batch_size` is per host (the global batch / process_count)."""

  batch_size: int
  split: str = "train"
  resolution: int = 256
  min_resize: int = 256
  max_resize: int = 288
  flip_prob: float = 0.5
  augment: bool = True  # False: resize straight to `resolution` (evaluation).
  resize_method: str = "area"  # Antialiased; see bench/RESULTS.md for speed against lanczos3.
  seed: int = 0
  shuffle: bool = True
  shuffle_buffer: int = 1000  # Records (still encoded) held for shuffling.
  num_epochs: int | None = None  # Epochs in all (a resumed run finishes them); None: forever.
  drop_remainder: bool = True
  cycle_length: int = 16  # Shards read at once (interleaved; 1 with shuffle=False: stored order).
  num_threads: int | None = None  # tf.data's private thread pool; None: TensorFlow's default.
  prefetch: int = 2  # Batches.
  max_bad_fraction: float = 0.01
  min_records_for_check: int = 1000  # Capped at one epoch of this host's records.
  include_text: bool = False  # Also yield "instruction": str [B].
  include_mask: bool = False  # Also yield "mask": float32 [B, S, S, 1] in [0, 1].
  include_geometry: bool = False  # Also yield "original_size", "crop_top_left": int32 [B, 2].

  def validate(self) -> None:
    if self.batch_size < 1:
      raise ConfigError(f"batch_size={self.batch_size}: must be positive")
    if not 0 < self.resolution <= self.min_resize <= self.max_resize:
      raise ConfigError(f"need 0 < resolution <= min_resize <= max_resize, got resolution="
                        f"{self.resolution}, min_resize={self.min_resize}, "
                        f"max_resize={self.max_resize}")
    if self.resize_method not in RESIZE_METHODS:
      raise ConfigError(f"resize_method={self.resize_method!r}: expected one of {RESIZE_METHODS}")
    if not 0 <= self.flip_prob <= 1 or not 0 <= self.max_bad_fraction <= 1:
      raise ConfigError("flip_prob and max_bad_fraction must lie in [0, 1]")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ConfigError(f"num_epochs={self.num_epochs}: must be positive or None")


@dataclasses.dataclass(frozen=True)
class ReaderState:
  """Where a host's iterator stands: epoch, records of its shuffled stream consumed, counts."""

  epoch: int = 0
  position: int = 0
  counts: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(COUNTERS, 0))
  process_index: int = 0
  process_count: int = 1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"counts": dict(self.counts)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ReaderState:
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"unknown reader state keys {sorted(unknown)}")
    return cls(**d)


# ---------------------------------------------------------------- shards and hosts


def list_shards(data_dirs: str | Sequence[str], split: str) -> list[tuple[str, int]]:
  """(path, num_examples) of every shard of `split`, from manifest.json or TFDS metadata."""
  tf = import_tf()
  shards = []
  for directory in [data_dirs] if isinstance(data_dirs, str) else data_dirs:
    directory = directory.rstrip("/")
    if not tf.io.gfile.isdir(directory):
      problem = "is not a folder" if tf.io.gfile.exists(directory) else "does not exist"
      raise InputError(f"{directory} {problem}: expected a dataset folder (manifest.json or TFDS "
                       "dataset_info.json)")
    if tf.io.gfile.exists(f"{directory}/{writer.MANIFEST}"):
      manifest = writer.read_manifest(directory)
      if split not in manifest["splits"]:
        raise InputError(f"{directory} has no split {split!r} (it has "
                         f"{sorted(manifest['splits'])})")
      shards += [(f"{directory}/{s['file']}", s["num_examples"])
                 for s in manifest["splits"][split]["shards"]]
    elif tf.io.gfile.exists(f"{directory}/dataset_info.json"):
      import tensorflow_datasets as tfds
      splits = tfds.builder_from_directory(directory).info.splits
      if split not in splits:
        raise InputError(f"{directory} has no split {split!r} (it has {sorted(splits)})")
      info = splits[split]
      shards += [(str(p), n) for p, n in zip(info.filepaths, info.shard_lengths)]
    else:
      raise InputError(f"{directory} holds neither {writer.MANIFEST} nor dataset_info.json")
  if not any(n for _, n in shards):
    raise InputError(f"split {split!r} of {data_dirs} holds no examples")
  return shards


def per_host_batch_size(global_batch: int, process_count: int) -> int:
  """The `ReaderConfig.batch_size` of each host for a global batch split evenly over hosts."""
  if global_batch < 1 or global_batch % process_count:
    raise ConfigError(f"global batch {global_batch} does not split evenly over {process_count} "
                      "hosts")
  return global_batch // process_count


def host_slices(shard_lengths: Sequence[int], process_index: int,
                process_count: int) -> list[tuple[int, int, int]]:
  """This host's part of the data: (shard, start, stop) record ranges.

  The records, in shard order, are cut into `process_count` contiguous runs whose sizes differ by
  at most one; host i takes run i. Hosts therefore read disjoint records that together cover the
  dataset, and only the shards at run boundaries are shared (each host skips to its start).
  """
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is not in [0, {process_count})")
  total = sum(shard_lengths)
  lo, hi = total * process_index // process_count, total * (process_index + 1) // process_count
  slices, offset = [], 0
  for shard, length in enumerate(shard_lengths):
    start, stop = max(lo, offset), min(hi, offset + length)
    if start < stop:
      slices.append((shard, start - offset, stop - offset))
    offset += length
  return slices


# ---------------------------------------------------------------- the pipeline


def make_dataset(data_dirs: str | Sequence[str], config: ReaderConfig, *,
                 tokenize: Callable[[list[str]], np.ndarray] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 state: ReaderState | None = None):
  """The tf.data pipeline (see the module docstring); elements are dicts of batched tensors.

  Besides the outputs, each batch carries "_epoch", "_position", "_counts" and "_tripped" for
  `BatchIterator`. `process_index`/`process_count` default to JAX's.
  """
  tf = import_tf()
  config.validate()
  process_index, process_count = _process(process_index, process_count)
  state = state or ReaderState(process_index=process_index, process_count=process_count)
  if (state.process_index, state.process_count) != (process_index, process_count):
    raise ConfigError(f"the reader state belongs to host {state.process_index} of "
                      f"{state.process_count}, not host {process_index} of {process_count}")
  shards = list_shards(data_dirs, config.split)
  slices = host_slices([n for _, n in shards], process_index, process_count)
  if not slices:
    raise InputError(f"host {process_index} of {process_count} gets no records: split "
                     f"{config.split!r} has only {sum(n for _, n in shards)}")
  per_epoch = sum(stop - start for _, start, stop in slices)
  min_check = min(config.min_records_for_check, per_epoch)
  base_key = tf.random.experimental.stateless_fold_in(
      tf.constant([config.seed, 0], tf.int64), process_index)
  files = tf.constant([shards[s][0] for s, _, _ in slices])
  starts = tf.constant([a for _, a, _ in slices], tf.int64)
  stops = tf.constant([b for _, _, b in slices], tf.int64)

  def read_slice(path, start, stop):
    # ignore_errors ends a file at a truncated or corrupt record, but would retry the opening of
    # a missing file forever: such a file is read as empty (its records count as unreadable).
    exists = tf.size(tf.io.matching_files(path)) > 0
    records = tf.data.TFRecordDataset(path, buffer_size=1 << 22)
    return records.take(tf.where(exists, stop, tf.zeros_like(stop))).skip(start).ignore_errors()

  def epoch_stream(epoch):
    epoch_key = tf.random.experimental.stateless_fold_in(base_key, epoch)
    order = tf.range(len(slices), dtype=tf.int64)
    if config.shuffle:
      order = tf.random.experimental.stateless_shuffle(order, seed=epoch_key)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.gather(files, order), tf.gather(starts, order), tf.gather(stops, order)))
    ds = ds.interleave(read_slice, cycle_length=min(config.cycle_length, len(slices)),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if config.shuffle:
      shuffle_seed = tf.random.stateless_uniform(
          [], seed=tf.random.experimental.stateless_fold_in(epoch_key, 1), minval=0,
          maxval=2**31 - 1, dtype=tf.int64)
      ds = ds.shuffle(config.shuffle_buffer, seed=shuffle_seed)
    ds = ds.map(lambda r: (r, False)).concatenate(
        tf.data.Dataset.from_tensors((tf.constant(b""), True)))
    ds = ds.enumerate().skip(
        tf.where(epoch == state.epoch, tf.constant(state.position, tf.int64), 0))
    return ds.map(lambda p, x: (epoch, p, x[0], x[1]))

  last_epoch = config.num_epochs - 1 if config.num_epochs else 2**62
  ds = tf.data.Dataset.range(state.epoch, last_epoch + 1).flat_map(epoch_stream)
  ds = ds.map(lambda e, p, r, s: _process_record(tf, config, base_key, e, p, r, s),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors()

  initial = (tf.constant(state.epoch, tf.int64), tf.constant(state.position - 1, tf.int64),
             tf.constant([state.counts.get(k, 0) for k in COUNTERS], tf.int64),
             tf.constant(False))

  # COUNTERS index of each status; -1 (the end-of-epoch marker) one-hot encodes to zeros.
  counter_of_status = tf.constant(
      [COUNTERS.index(_STATUS_COUNTER[s]) if s in _STATUS_COUNTER else -1 for s in range(5)],
      tf.int64)
  units = {k: tf.one_hot(i, len(COUNTERS), dtype=tf.int64) for i, k in enumerate(COUNTERS)}

  def count(carry, element):
    prev_epoch, prev_p, counts, tripped = carry
    epoch, p, status = element["_epoch"], element["_position"], element["_status"]
    sentinel = status == _SENTINEL
    # Positions missing since the previous element were dropped by ignore_errors.
    dropped = tf.where(epoch == prev_epoch, p - prev_p - 1, p)
    # The end-of-epoch marker's position is the number of records read; the rest were lost.
    lost = tf.where(sentinel, per_epoch - p, tf.constant(0, tf.int64))
    counts += (tf.one_hot(tf.gather(counter_of_status, status), len(COUNTERS), dtype=tf.int64)
               + dropped * units["undecodable"] + lost * units["unreadable"]
               + (dropped + lost + tf.cast(~sentinel, tf.int64)) * units["records"])
    records, bad = counts[0], counts[0] - counts[1]
    tripped |= (records >= min_check) & (
        tf.cast(bad, tf.float64) > config.max_bad_fraction * tf.cast(records, tf.float64))
    return (epoch, p, counts, tripped), element | {"_counts": counts, "_tripped": tripped}

  ds = ds.scan(initial, count)
  # Good records go on; so does the final end-of-epoch marker of a finite run (its counts are the
  # run's totals) and, once tripped, everything (so that the error reaches the iterator).
  ds = ds.filter(lambda x: (x["_status"] == _OK) | x["_tripped"] | (
      (x["_status"] == _SENTINEL) & (x["_epoch"] == last_epoch)))
  ds = ds.batch(config.batch_size, drop_remainder=False)
  if tokenize is not None:
    rank = np.ndim(tokenize([""]))  # [B, L], or [B, 2, L] for SDXL's two tokenizers

    def add_ids(batch):
      ids = tf.numpy_function(lambda t: _tokenize(tokenize, t), [batch["instruction"]], tf.int32,
                              stateful=False)
      return batch | {"input_ids": tf.ensure_shape(ids, [None] * rank)}
    ds = ds.map(add_ids, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(config.prefetch)
  options = tf.data.Options()
  options.deterministic = True
  if config.num_threads:
    options.threading.private_threadpool_size = config.num_threads
  return ds.with_options(options)


def _process_record(tf, config: ReaderConfig, base_key, epoch, position, record, is_sentinel):
  """Parse, check and (for good records) decode + augment one record; never raises on bad data
  it can detect, and lets ignore_errors drop what it cannot (a corrupt image body)."""
  required = ("input_image", "edited_image", "instruction")
  spec = {k: tf.io.RaggedFeature(tf.string)
          for k in required + (("mask",) if config.include_mask else ())}
  parsed = tf.io.parse_single_example(record, spec)
  present = [tf.size(parsed[k]) == 1 for k in required]
  values = {k: tf.concat([parsed[k], [b""]], 0)[0] for k in spec}
  missing = ~tf.reduce_all(present)
  magic_ok = [_is_png_or_jpeg(tf, values[k]) for k in ("input_image", "edited_image")]
  empty = tf.strings.length(tf.strings.strip(values["instruction"])) == 0
  status = tf.where(is_sentinel, _SENTINEL, tf.where(missing, _MISSING, tf.where(
      ~(magic_ok[0] & magic_ok[1]), _UNDECODABLE, tf.where(empty, _EMPTY, _OK))))
  key = tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(base_key, epoch), position)
  size = config.resolution

  def placeholder():
    z = tf.zeros([size, size, 3], tf.float32)
    return (z, z, tf.zeros([size, size, 1], tf.float32)) if config.include_mask else (z, z)

  images = tf.cond(status == _OK, lambda: decode_and_augment(
      tf, values["input_image"], values["edited_image"], key, config, values.get("mask")),
      placeholder)
  out = {"input": images[0], "edited": images[1], "instruction": values["instruction"],
         "_epoch": epoch, "_position": position, "_status": tf.cast(status, tf.int64)}
  if config.include_mask:
    out["mask"] = images[2]
  if config.include_geometry:
    zeros = tf.zeros([2], tf.int32)
    out["original_size"], out["crop_top_left"] = tf.cond(
        status == _OK, lambda: geometry(tf, values["edited_image"], key, config),
        lambda: (zeros, zeros))
  return out


def _draws(tf, key, config: ReaderConfig):
  """The paired augmentation's random draws from ``key``: (resized square's side int32, crop's
  [top, left] int32 [2], flip bool)."""
  size_key, crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 3))
  side = tf.random.stateless_uniform([], seed=size_key, minval=config.min_resize,
                                     maxval=config.max_resize + 1, dtype=tf.int32)
  offset = tf.random.stateless_uniform([2], seed=crop_key, minval=0,
                                       maxval=side - config.resolution + 1, dtype=tf.int32)
  flip = tf.random.stateless_uniform([], seed=flip_key) < config.flip_prob
  return side, offset, flip


def geometry(tf, edited_image, key, config: ReaderConfig):
  """(original size [height, width], crop's [top, left]) int32 [2] each of the example
  `decode_and_augment` makes from ``key`` (see the module docstring)."""
  size = image_size(tf, edited_image)
  if not config.augment:
    return size, tf.zeros([2], tf.int32)
  side, offset, flip = _draws(tf, key, config)
  left = tf.where(flip, side - config.resolution - offset[1], offset[1])
  return size, tf.stack([offset[0], left])


def image_size(tf, data):
  """[height, width] int32 of an encoded JPEG or PNG, from its header (nothing decoded; a PNG's
  IHDR holds width then height, big-endian, at bytes 16–23)."""
  def png():
    width_height = tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32, little_endian=False)
    return tf.reverse(tf.ensure_shape(width_height, [2]), axis=[0])
  return tf.cond(tf.io.is_jpeg(data), lambda: tf.image.extract_jpeg_shape(data)[:2], png)


def decode_and_augment(tf, input_image, edited_image, key, config: ReaderConfig, mask=None):
  """Encoded pair → float32 [S, S, 3] pair in [-1, 1], S = config.resolution; with ``mask``
  (encoded PNG bytes, b"" for none) also the mask, float32 [S, S, 1] in [0, 1], given the same
  geometry (ones where the bytes are empty).

  With `config.augment`, the reference's "resize both to a random side in [min_resize,
  max_resize], one random crop of S, one flip" is done crop-first: the crop is mapped to each
  source image (in its own [0, 1] coordinates, so pairs of different sizes stay aligned),
  rounded to whole source pixels, decoded alone (JPEG: decode_and_crop) and resized once to S.
  Same geometry, without decoding or resizing the pixels the crop throws away. Randomness comes
  from the stateless `key` (shape [2] int64) only.
  """
  s = config.resolution

  def mask_of(window, flip):
    def decoded():
      m = _decode(tf, mask, window, channels=1)
      if flip is not None:
        m = tf.cond(flip, lambda: tf.reverse(m, axis=[1]), lambda: m)
      return _resize(tf, m, s, config) / 255.0
    return tf.cond(tf.strings.length(mask) > 0, decoded, lambda: tf.ones([s, s, 1], tf.float32))

  if not config.augment:
    pair = tuple(_scale(tf, _resize(tf, _decode(tf, data, None), s, config))
                 for data in (input_image, edited_image))
    return pair if mask is None else pair + (mask_of(None, None),)
  side, offset, flip = _draws(tf, key, config)
  side = tf.cast(side, tf.float64)
  window = (tf.cast(offset, tf.float64) / side, s / side)  # (top, left), size; as fractions.
  out = []
  for data in (input_image, edited_image):
    image = _decode(tf, data, window)
    image = tf.cond(flip, lambda im=image: tf.reverse(im, axis=[1]), lambda im=image: im)
    out.append(_scale(tf, _resize(tf, image, s, config)))
  if mask is not None:
    out.append(mask_of(window, flip))
  return tuple(out)


def _decode(tf, data, window, channels: int = 3):
  """uint8 [h, w, channels]: the whole image, or its part `window` = ([top, left], size) in
  [0, 1]."""
  if window is None:
    return tf.io.decode_image(data, channels=channels, expand_animations=False)

  def pixels(height, width):
    corner, size = window
    hw = tf.cast(tf.stack([height, width]), tf.float64)
    extent = tf.maximum(tf.cast(tf.round(size * hw), tf.int32), 1)
    start = tf.minimum(tf.cast(tf.round(corner * hw), tf.int32), tf.cast(hw, tf.int32) - extent)
    return start, extent

  def jpeg():
    shape = tf.image.extract_jpeg_shape(data)
    start, extent = pixels(shape[0], shape[1])
    return tf.io.decode_and_crop_jpeg(data, tf.concat([start, extent], 0), channels=channels)

  def other():
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    start, extent = pixels(tf.shape(image)[0], tf.shape(image)[1])
    return tf.slice(image, tf.concat([start, [0]], 0), tf.concat([extent, [channels]], 0))

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _resize(tf, image, size: int, config: ReaderConfig):
  out = tf.image.resize(image, [size, size], method=config.resize_method, antialias=True)
  if config.resize_method in ("bicubic", "lanczos3"):  # Negative lobes overshoot [0, 255].
    out = tf.clip_by_value(out, 0.0, 255.0)
  return out


def _scale(tf, image):
  return image * (2.0 / 255.0) - 1.0


def _is_png_or_jpeg(tf, data):
  head = tf.strings.substr(data, 0, 8)
  return (head == b"\x89PNG\r\n\x1a\n") | (tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff")


def _tokenize(tokenize, texts: np.ndarray) -> np.ndarray:
  ids = tokenize([t.decode("utf-8", errors="replace") for t in texts])
  return np.asarray(ids, np.int32)


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


# ---------------------------------------------------------------- the iterator


class BatchIterator:
  """Numpy batches {"input", "edited": float32 [B, S, S, 3] in [-1, 1], "input_ids": int32
  [B, 77] (with a tokenizer; [B, 2, 77] with SDXL's pair), "instruction": str [B] (with
  include_text), "mask", "original_size", "crop_top_left" (with include_mask,
  include_geometry)}, plus `state()` and `stats()`."""

  def __init__(self, dataset, config: ReaderConfig, state: ReaderState):
    self._iterator = iter(dataset.as_numpy_iterator())
    self._config = config
    self._state = state
    self._last_bad, self._last_log = 0, 0.0

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    tf = import_tf()
    try:
      batch = next(self._iterator)
    except tf.errors.OpError as e:  # Bad data is counted, not raised: this is something else.
      raise InputError(f"the input pipeline failed: {e.message}") from e
    tripped = batch["_tripped"]
    if tripped.any():
      counts = dict(zip(COUNTERS, batch["_counts"][int(np.argmax(tripped))].tolist()))
      bad = counts["records"] - counts["ok"]
      raise InputError(
          f"{bad} of {counts['records']} records read so far are bad, more than max_bad_fraction="
          f"{self._config.max_bad_fraction} — " + _describe(counts)
          + " (unreadable: lost in a missing, truncated or corrupt shard file; undecodable: "
          "the record or an image cannot be decoded). Check the dataset, or raise "
          "max_bad_fraction.")
    good = batch["_status"] == _OK
    if good.any():
      last = int(np.flatnonzero(good)[-1])
      self._state = dataclasses.replace(
          self._state, epoch=int(batch["_epoch"][last]),
          position=int(batch["_position"][last]) + 1)
    self._state = dataclasses.replace(
        self._state, counts=dict(zip(COUNTERS, batch["_counts"][-1].tolist())))
    if not good.all():  # The run's final end-of-epoch marker.
      batch = {k: v[good] for k, v in batch.items()}
    self._log_bad()
    size = int(good.sum())
    if size == 0 or (self._config.drop_remainder and size < self._config.batch_size):
      raise StopIteration
    out = {"input": batch["input"], "edited": batch["edited"]}
    if "input_ids" in batch:
      out["input_ids"] = batch["input_ids"]
    if self._config.include_mask:
      out["mask"] = batch["mask"]
    if self._config.include_geometry:
      out["original_size"], out["crop_top_left"] = batch["original_size"], batch["crop_top_left"]
    if self._config.include_text:
      out["instruction"] = np.array([t.decode("utf-8", errors="replace")
                                     for t in batch["instruction"]], dtype=object)
    return out

  def state(self) -> ReaderState:
    """The position after the last batch returned; `make_iterator(state=...)` resumes there."""
    return self._state

  def stats(self) -> dict[str, int]:
    """Records seen and skipped by reason, up to the last batch returned."""
    return dict(self._state.counts)

  def _log_bad(self) -> None:
    counts = self._state.counts
    bad = counts["records"] - counts["ok"]
    if bad > self._last_bad and time.monotonic() - self._last_log > 60:
      logging.warning("data: skipped %d bad records of %d so far (%s)", bad, counts["records"],
                      _describe(counts))
      self._last_bad, self._last_log = bad, time.monotonic()


def make_iterator(data_dirs: str | Sequence[str], config: ReaderConfig, *,
                  tokenize: Callable[[list[str]], np.ndarray] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  state: ReaderState | Mapping[str, Any] | None = None) -> BatchIterator:
  """Batches of this host's part of `split` (see the module docstring), resumable from `state`."""
  process_index, process_count = _process(process_index, process_count)
  if isinstance(state, Mapping):
    state = ReaderState.from_dict(state)
  state = state or ReaderState(process_index=process_index, process_count=process_count)
  dataset = make_dataset(data_dirs, config, tokenize=tokenize, process_index=process_index,
                         process_count=process_count, state=state)
  return BatchIterator(dataset, config, state)


def iter_triplets(data_dirs: str | Sequence[str], split: str = "train"):
  """Every stored record of `split` as a `schema.Triplet`, in storage order (for inspection).

  Unlike the training reader it stops at the first bad record, with an InputError naming it.
  """
  tf = import_tf()
  spec = {}
  for f in schema.FIELDS:
    dtype = {"image": tf.string, "mask": tf.string, "text": tf.string, "int": tf.int64,
             "float": tf.float32}[f.kind]
    default = None if f.required else f.default
    if f.kind == "text" and default is not None:
      default = default.encode()
    spec[f.name] = tf.io.FixedLenFeature([], dtype, default_value=default)
  for path, _ in list_shards(data_dirs, split):
    records = tf.data.TFRecordDataset(path).map(lambda r: tf.io.parse_single_example(r, spec))
    iterator, index = records.as_numpy_iterator(), 0
    while True:
      try:
        record = next(iterator)
      except StopIteration:
        break
      except tf.errors.OpError as e:
        raise InputError(f"{path}, record {index}: {op_error_text(e)}") from None
      yield schema.from_record(record)
      index += 1


def _describe(counts: Mapping[str, int]) -> str:
  return ", ".join(f"{k}={counts[k]}" for k in COUNTERS[2:])
