"""The latent cache: a triplet dataset's VAE moments and text, computed once, read for training.

Training from images spends much of a step on the frozen VAE and text encoder (MLPerf's and
MaxDiffusion's reason for precomputing). `write_cache` runs them once per example and stores, per
record:

  input_mean, input_logvar     [2, h, w, C]  the VAE posterior of the input image's centre crop
  edited_mean, edited_logvar   [2, h, w, C]  … of the edited image; index 1 of both: the crop
                                             flipped horizontally *before* encoding, so flip
                                             augmentation stays exact (a flipped latent is not the
                                             latent of the flipped image)
  text   [L, D] float  the text encoder's output for the instruction  (text="embeddings"), or
  input_ids [L] int    its token ids, encoded in the train step        (text="ids")
  instruction, index   the text, and the record's position in the source split

and for an SDXL model (`CacheInfo.micro_conditioning`):

  text   [L, D1 + D2]  both encoders' prompt states, concatenated (77 × 2048 for SDXL)
  pooled [P] float     the pooled, projected text (1280)             (text="embeddings"), or
  input_ids [2, L] int both tokenizers' ids                           (text="ids")
  original_size [2]    the edited image's stored (height, width): with the centre crop's corner
                       (the same offset from the top and the left, its left mirrored in the
                       flipped crop) and size, the example's micro-conditioning

The crop: both images resized (area, antialiased) to a square of side ``resize`` ≥ ``resolution``
and the central ``resolution``² kept — the reader's geometry with its random offset at the centre;
``resize = resolution`` keeps the whole image.

Training from it needs no change to the train step (`jip2p.train.step.make_loss_fn`): a
`LatentSource` batch has an image batch's keys, holding what the encoders would produce —
``edited`` and ``input`` the posterior moments [B, h, w, 2C] (mean channels, then log-variance),
``input_ids`` the token ids or the text embeddings (SDXL's: the pair (states, pooled)), and an
SDXL cache's ``original_size`` and ``crop_top_left`` — and the step is built with `CachedVAE` and
(for embeddings) `PrecomputedText` in place of the VAE and text encoder. The step then draws
``z = mean + std·ε`` with its own key exactly as it samples a fresh encoding, so a cached run
equals an image run with the same crop and flip.

A cache folder holds ``{name}-{split}.tfrecord-NNNNN`` shards (each written under a temporary
name, then renamed), ``validation.npz`` (the first few examples' crops and instructions: the
trainer's validation grid needs images) and ``latents.json``, written last (a folder without it
is unfinished: a rerun writes it again). `LatentSource` reads it per host: shuffled, repeated,
one random flip per example, resumable from the number of batches taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jip2p import files
from jip2p.data import reader, writer
from jip2p.data.tf_setup import import_tf
from jip2p.errors import ConfigError, InputError, OutputError
from jip2p.models.vae import DiagonalGaussian

MANIFEST = "latents.json"
FORMAT = "jip2p-latents"
FORMAT_VERSION = 1
TEXT_MODES = ("embeddings", "ids")
DTYPES = ("float32", "float16")
VALIDATION = "validation.npz"
MOMENTS = ("input_mean", "input_logvar", "edited_mean", "edited_logvar")


@dataclasses.dataclass(frozen=True)
class CacheInfo:
  """What ``latents.json`` records; shards are ``(file name, num_examples)``."""

  resolution: int
  resize: int
  latent_shape: tuple[int, int, int]
  text: str
  text_shape: tuple[int, ...]
  dtype: str
  scaling_factor: float
  model: str
  split: str
  shards: tuple[tuple[str, int], ...]
  skipped: int
  micro_conditioning: bool = False  # An SDXL model's cache: pooled text and original sizes.
  pooled_shape: tuple[int, ...] = ()  # [P] with text="embeddings" and micro_conditioning.
  format: str = FORMAT
  version: int = FORMAT_VERSION

  @property
  def num_examples(self) -> int:
    return sum(n for _, n in self.shards)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def read(cls, folder: str) -> CacheInfo:
    tf = import_tf()
    path = os.path.join(folder, MANIFEST)
    if not tf.io.gfile.exists(path):
      raise InputError(f"{folder} is not a finished latent cache (no {MANIFEST}); write one with "
                       "jip2p-cache-latents")
    with tf.io.gfile.GFile(path) as f:
      d = json.load(f)
    if d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
      raise InputError(f"{path}: format {d.get('format')!r} version {d.get('version')!r}; this "
                       f"jip2p reads {FORMAT!r} version {FORMAT_VERSION}")
    d["latent_shape"] = tuple(d["latent_shape"])
    d["text_shape"] = tuple(d["text_shape"])
    d["pooled_shape"] = tuple(d.get("pooled_shape", ()))
    d["shards"] = tuple((f, n) for f, n in d["shards"])
    return cls(**d)


# ---------------------------------------------------------------- crops


def centre_offset(resolution: int, resize: int) -> int:
  """The centre crop's offset from the top and from the left of the resized square, in pixels."""
  return (resize - resolution) // 2


def centre_window(resolution: int, resize: int):
  """The reader's crop window (``[top, left]`` and size, as fractions) of the centre crop."""
  offset = centre_offset(resolution, resize)
  return np.full([2], offset / resize, np.float64), resolution / resize


def centre_crops(tf, input_image, edited_image, *, resolution: int, resize: int):
  """Encoded images → float32 ``[S, S, 3]`` centre crops in [-1, 1] (S = resolution), decoded
  crop-first exactly as `reader.decode_and_augment` decodes a random crop."""
  corner, size = centre_window(resolution, resize)
  window = (tf.constant(corner, tf.float64), size)
  config = reader.ReaderConfig(batch_size=1, resolution=resolution, min_resize=resize,
                               max_resize=resize)
  return tuple(reader._scale(tf, reader._resize(tf, reader._decode(tf, data, window), resolution,
                                                config))
               for data in (input_image, edited_image))


def crop_dataset(data_dirs: str | Sequence[str], *, split: str, resolution: int, resize: int,
                 max_examples: int | None = None):
  """tf.data of every good record of ``split`` in storage order: ``index`` (its position),
  ``input``/``edited`` centre crops, ``instruction`` and ``original_size`` (the edited image's
  [height, width], `reader.image_size`). Records without both images and a non-empty
  instruction, or whose images do not decode, are skipped."""
  tf = import_tf()
  if not 0 < resolution <= resize:
    raise ConfigError(f"need 0 < resolution <= resize, got resolution={resolution}, "
                      f"resize={resize}")
  files = [path for path, n in reader.list_shards(data_dirs, split) if n]
  ds = tf.data.TFRecordDataset(files).enumerate()
  if max_examples is not None:
    ds = ds.take(max_examples)
  spec = {k: tf.io.FixedLenFeature([], tf.string, default_value=b"")
          for k in ("input_image", "edited_image", "instruction")}

  def parse(index, record):
    return index, tf.io.parse_single_example(record, spec)

  def usable(_, r):
    return ((tf.strings.length(r["input_image"]) > 0) & (tf.strings.length(r["edited_image"]) > 0)
            & (tf.strings.length(tf.strings.strip(r["instruction"])) > 0))

  def crop(index, r):
    a, b = centre_crops(tf, r["input_image"], r["edited_image"], resolution=resolution,
                        resize=resize)
    return {"index": index, "input": a, "edited": b, "instruction": r["instruction"],
            "original_size": reader.image_size(tf, r["edited_image"])}

  ds = ds.map(parse).filter(usable)
  ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
  return ds


# ---------------------------------------------------------------- encoding


def make_encode_fn(vae_def, text_def, *, text: str) -> Callable:
  """encode(vae_state, text_state, input, edited, input_ids) → dict of cache arrays, jittable.

  input, edited float32 [B, S, S, 3] in [-1, 1]; input_ids int32 [B, L] (SDXL: [B, 2, L]).
  Out: the `MOMENTS` float32 [B, 2, h, w, C] (index 1: the flipped crop) and ``text``
  [B, L, D] (embeddings mode; SDXL's text model also gives ``pooled`` [B, P]).
  """
  def encode(vae_state, text_state, input_images, edited_images, input_ids):
    vae = nnx.merge(vae_def, vae_state)
    b = input_images.shape[0]
    # One encoder pass over [input, input flipped, edited, edited flipped], example-major.
    images = jnp.stack([input_images, input_images[:, :, ::-1], edited_images,
                        edited_images[:, :, ::-1]], axis=1)
    posterior = vae.encode(images.reshape((4 * b,) + images.shape[2:]))
    mean = posterior.mean.reshape((b, 2, 2) + posterior.mean.shape[1:])
    logvar = posterior.logvar.reshape(mean.shape)
    out = {"input_mean": mean[:, 0], "input_logvar": logvar[:, 0],
           "edited_mean": mean[:, 1], "edited_logvar": logvar[:, 1]}
    if text == "embeddings":
      embeddings = nnx.merge(text_def, text_state)(input_ids)
      if isinstance(embeddings, tuple):  # SDXL: (prompt states, pooled)
        embeddings, out["pooled"] = embeddings[0], embeddings[1].astype(jnp.float32)
      out["text"] = embeddings.astype(jnp.float32)
    return out

  return encode


class CachedVAE(nnx.Module):
  """The VAE's stand-in in a train step fed from the cache: its "encoding" of stored moments
  [B, h, w, 2C] is the posterior they describe. ``config`` is the real VAE's (the loop reads it)."""

  def __init__(self, config):
    self.config = config

  def encode(self, moments: jax.Array) -> DiagonalGaussian:
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))


class PrecomputedText(nnx.Module):
  """The text encoder's stand-in when the cache holds its output: returns the embeddings (an
  SDXL cache's pair (states, pooled), as `clip_text.SDXLTextEncoders` returns them)."""

  def __call__(self, embeddings: jax.Array) -> jax.Array:
    return embeddings


# ---------------------------------------------------------------- writing


def _bytes_feature(tf, value: bytes):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _serialize(tf, row: dict[str, np.ndarray], dtype: str) -> bytes:
  feature = {k: _bytes_feature(tf, np.ascontiguousarray(row[k], dtype).tobytes()) for k in MOMENTS}
  for name in ("text", "pooled"):
    if name in row:
      feature[name] = _bytes_feature(tf, np.ascontiguousarray(row[name], dtype).tobytes())
  if "text" not in row:
    feature["input_ids"] = tf.train.Feature(
        int64_list=tf.train.Int64List(value=np.asarray(row["input_ids"], np.int64).reshape(-1)
                                      .tolist()))
  if "original_size" in row:
    feature["original_size"] = tf.train.Feature(
        int64_list=tf.train.Int64List(value=np.asarray(row["original_size"], np.int64).tolist()))
  feature["instruction"] = _bytes_feature(tf, row["instruction"])
  feature["index"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row["index"])]))
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)


def check_target(data_dirs: str | Sequence[str], out_dir: str, split: str) -> None:
  """What `write_cache` checks before any work (and `jip2p-cache-latents` before it loads the
  model): ``split`` of the input holds records, and ``out_dir`` is writable and holds no finished
  cache. An unfinished one (no ``latents.json``: an interrupted run) is written again."""
  reader.list_shards(data_dirs, split)
  files.check_output_dir(out_dir, "cache folder")
  if import_tf().io.gfile.exists(os.path.join(out_dir, MANIFEST)):
    raise ConfigError(f"{out_dir} already holds a latent cache ({MANIFEST}); choose another "
                      "folder or delete it")


class _Shards:
  """Serialized records into shards of ``per_shard``, each written under a temporary name and
  renamed once closed; the folder is made at the first record. ``done``: (file name, records)."""

  def __init__(self, tf, out_dir: str, name: str, split: str, per_shard: int):
    self._tf, self._out_dir, self._name, self._split = tf, out_dir, name, split
    self._per_shard = per_shard
    self._file, self._count, self._path = None, 0, ""
    self.done: list[tuple[str, int]] = []

  def write(self, data: bytes) -> None:
    if self._file is None:
      self._tf.io.gfile.makedirs(self._out_dir)
      self._path = os.path.join(self._out_dir,
                                writer.shard_filename(self._name, self._split, len(self.done)))
      self._file = self._tf.io.TFRecordWriter(self._path + ".incomplete")
    self._file.write(data)
    self._count += 1
    if self._count == self._per_shard:
      self.close()

  def close(self) -> None:
    if self._file is None:
      return
    self._file.close()
    self._tf.io.gfile.rename(self._path + ".incomplete", self._path, overwrite=True)
    self.done.append((os.path.basename(self._path), self._count))
    self._file, self._count = None, 0

  def abandon(self) -> None:
    """After a failed write: the open shard's temporary file goes (a rerun writes it again)."""
    if self._file is None:
      return
    with contextlib.suppress(Exception):  # the same full disk may fail the close
      self._file.close()
    with contextlib.suppress(Exception):
      self._tf.io.gfile.remove(self._path + ".incomplete")
    self._file, self._count = None, 0


@contextlib.contextmanager
def _named_write_errors(out_dir: str, shards: _Shards):
  """A write to the cache that fails (a full disk, a lost permission) as one `OutputError`, the
  open shard's temporary file removed; reading errors are not caught here."""
  tf = import_tf()
  try:
    yield
  except (tf.errors.OpError, OSError) as e:
    shards.abandon()
    reason = e.message if isinstance(e, tf.errors.OpError) else (e.strerror or str(e))
    raise OutputError(f"cannot write the latent cache {out_dir}: {reason}; once that is fixed "
                      "(a full disk: make room), rerun the same command: it writes the cache "
                      "again") from None


def write_cache(data_dirs: str | Sequence[str], out_dir: str, pipeline, *, split: str = "train",
                resolution: int = 256, resize: int | None = None, text: str = "embeddings",
                dtype: str = "float32", batch_size: int = 32, examples_per_shard: int = 1024,
                num_validation: int = 16, max_examples: int | None = None,
                model_name: str = "", log: Callable[[str], None] | None = None) -> CacheInfo:
  """Encodes ``split`` of a triplet dataset into a latent cache at ``out_dir`` (see the module
  docstring); ``pipeline`` is a `jip2p.checkpoints.Pipeline` (its UNet is not used; an SDXL one's
  two text encoders run as `Pipeline.text_model`)."""
  tf = import_tf()
  if text not in TEXT_MODES:
    raise ConfigError(f"text={text!r}; choose one of {TEXT_MODES}")
  if dtype not in DTYPES:
    raise ConfigError(f"dtype={dtype!r}; choose one of {DTYPES}")
  if batch_size < 1 or examples_per_shard < 1:
    raise ConfigError("batch_size and examples_per_shard must be positive")
  resize = resolution if resize is None else resize
  factor = pipeline.vae.config.downscale
  if resolution % factor:
    raise ConfigError(f"resolution={resolution} is not a multiple of the VAE's downscale {factor}")
  check_target(data_dirs, out_dir, split)

  vae_def, vae_state = nnx.split(pipeline.vae)
  text_def, text_state = nnx.split(pipeline.text_model())
  encode = jax.jit(make_encode_fn(vae_def, text_def, text=text))
  tokenizer, sdxl = pipeline.text_tokenizer(), pipeline.is_sdxl
  ds = crop_dataset(data_dirs, split=split, resolution=resolution, resize=resize,
                    max_examples=max_examples).batch(batch_size).prefetch(2)

  shards = _Shards(tf, out_dir, writer.DEFAULT_NAME.replace("triplets", "latents"), split,
                   examples_per_shard)
  validation = {"input": [], "edited": [], "instruction": [], "original_size": []}
  total = sum(n for _, n in reader.list_shards(data_dirs, split))
  seen = total if max_examples is None else min(total, max_examples)
  written = 0
  for batch in ds.as_numpy_iterator():
    n = len(batch["index"])
    instructions = [t.decode("utf-8", errors="replace") for t in batch["instruction"]]
    ids = np.asarray(tokenizer(instructions), np.int32)
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - n, 0)])
    out = jax.device_get(encode(vae_state, text_state, pad(batch["input"]), pad(batch["edited"]),
                                pad(ids)))
    for i in range(n):
      row = {k: v[i] for k, v in out.items()}
      row.update(index=batch["index"][i], instruction=batch["instruction"][i], input_ids=ids[i])
      if sdxl:
        row["original_size"] = batch["original_size"][i]
      with _named_write_errors(out_dir, shards):
        shards.write(_serialize(tf, row, dtype))
      if len(validation["instruction"]) < num_validation:
        to_uint8 = lambda x: np.round((x + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        validation["input"].append(to_uint8(batch["input"][i]))
        validation["edited"].append(to_uint8(batch["edited"][i]))
        validation["instruction"].append(instructions[i])
        validation["original_size"].append(batch["original_size"][i])
    written += n
    if log:
      log(f"cached {written} examples")
  with _named_write_errors(out_dir, shards):
    shards.close()
  if not written:
    raise InputError(f"split {split!r} of {data_dirs} has no usable example to cache")
  buffer = io.BytesIO()  # np.savez seeks, which a GFile being written cannot.
  np.savez(buffer, input=np.stack(validation["input"]), edited=np.stack(validation["edited"]),
           instruction=np.asarray(validation["instruction"]),
           original_size=np.stack(validation["original_size"]).astype(np.int32))
  with _named_write_errors(out_dir, shards):
    with tf.io.gfile.GFile(os.path.join(out_dir, VALIDATION), "wb") as f:
      f.write(buffer.getvalue())
  h, w, c = out["input_mean"].shape[2:]
  text_shape = out["text"].shape[1:] if text == "embeddings" else ids.shape[1:]
  info = CacheInfo(resolution=resolution, resize=resize, latent_shape=(h, w, c), text=text,
                   text_shape=tuple(int(x) for x in text_shape), dtype=dtype,
                   scaling_factor=float(pipeline.vae.config.scaling_factor), model=model_name,
                   split=split, shards=tuple(shards.done), skipped=seen - written,
                   micro_conditioning=sdxl,
                   pooled_shape=tuple(int(x) for x in out["pooled"].shape[1:])
                   if "pooled" in out else ())
  tmp = os.path.join(out_dir, MANIFEST + ".tmp")
  with _named_write_errors(out_dir, shards):
    with tf.io.gfile.GFile(tmp, "w") as f:
      f.write(info.to_json())
    tf.io.gfile.rename(tmp, os.path.join(out_dir, MANIFEST), overwrite=True)
  return info


# ---------------------------------------------------------------- reading


class LatentSource:
  """Per-host training batches from a latent cache, like `jip2p.train.input`'s sources.

  Yields numpy ``edited`` and ``input``: float32 posterior moments [B_local, h, w, 2C] (mean, then
  log-variance; of the crop or of its flip, one fair coin per example when ``flip``), and
  ``input_ids``: float32 text embeddings [B_local, L, D] or int32 token ids [B_local, L], as the
  cache holds; an SDXL cache's embeddings are the pair (states, pooled [B_local, P]), its ids
  [B_local, 2, L], and its batches also hold ``original_size`` and ``crop_top_left`` (the centre
  crop's corner, its left mirrored for a flipped example), int32 [B_local, 2]. Each epoch
  reshuffles this host's records (a contiguous part of the cache, as `reader.host_slices` cuts
  it). Position: the number of batches taken; the stream is a pure function of (seed, host,
  position).
  """

  def __init__(self, path: str, *, global_batch: int, seed: int, flip: bool = True,
               shuffle_buffer: int = 10_000, tokenizer=None, process_index: int = 0,
               process_count: int = 1):
    self.info = CacheInfo.read(path)
    self._path = path
    self._local = reader.per_host_batch_size(global_batch, process_count)
    self._seed, self._flip, self._buffer = seed, flip, shuffle_buffer
    self._tokenizer = tokenizer
    lengths = [n for _, n in self.info.shards]
    self._slices = reader.host_slices(lengths, process_index, process_count)
    if not self._slices:
      raise InputError(f"host {process_index} of {process_count} gets no records: the cache at "
                       f"{path} holds {sum(lengths)}")
    self._process_index = process_index
    self.position = 0
    self._it = self._make(0)

  def _make(self, position: int):
    tf = import_tf()
    info = self.info
    files = tf.constant([os.path.join(self._path, info.shards[s][0]) for s, _, _ in self._slices])
    starts = tf.constant([a for _, a, _ in self._slices], tf.int64)
    stops = tf.constant([b for _, _, b in self._slices], tf.int64)
    base = tf.random.experimental.stateless_fold_in(
        tf.constant([self._seed, 1], tf.int64), self._process_index)
    flip_base = tf.random.experimental.stateless_fold_in(
        tf.constant([self._seed, 2], tf.int64), self._process_index)

    def epoch(e):
      key = tf.random.experimental.stateless_fold_in(base, e)
      order = tf.random.experimental.stateless_shuffle(tf.range(len(self._slices),
                                                                dtype=tf.int64), seed=key)
      ds = tf.data.Dataset.from_tensor_slices(
          (tf.gather(files, order), tf.gather(starts, order), tf.gather(stops, order)))
      ds = ds.interleave(lambda f, a, b: tf.data.TFRecordDataset(f).take(b).skip(a),
                         cycle_length=min(16, len(self._slices)))
      seed = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(key, 1),
                                         minval=0, maxval=2**31 - 1, dtype=tf.int64)
      return ds.shuffle(self._buffer, seed=seed)

    ds = tf.data.Dataset.range(2**62).flat_map(epoch).enumerate()
    ds = ds.skip(position * self._local)
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in MOMENTS}
    if info.text == "embeddings":
      spec["text"] = tf.io.FixedLenFeature([], tf.string)
    else:
      spec["input_ids"] = tf.io.FixedLenFeature(list(info.text_shape), tf.int64)
    if info.pooled_shape:
      spec["pooled"] = tf.io.FixedLenFeature([], tf.string)
    if info.micro_conditioning:
      spec["original_size"] = tf.io.FixedLenFeature([2], tf.int64)
    stored = tf.float32 if info.dtype == "float32" else tf.float16
    moments_shape = (2,) + info.latent_shape
    offset = centre_offset(info.resolution, info.resize)

    def parse(count, record):
      r = tf.io.parse_single_example(record, spec)
      flip = tf.random.stateless_uniform(
          [], seed=tf.random.experimental.stateless_fold_in(flip_base, count)) < (
              0.5 if self._flip else 0.0)
      pick = tf.cast(flip, tf.int32)
      moments = lambda k: tf.gather(tf.reshape(tf.io.decode_raw(r[k], stored), moments_shape),
                                    pick)
      out = {name: tf.cast(tf.concat([moments(f"{name}_mean"), moments(f"{name}_logvar")], -1),
                           tf.float32) for name in ("edited", "input")}
      embeddings = lambda k, shape: tf.cast(tf.reshape(tf.io.decode_raw(r[k], stored), shape),
                                            tf.float32)
      if "text" in r:
        out["input_ids"] = embeddings("text", info.text_shape)
        if "pooled" in r:
          out["input_ids"] = (out["input_ids"], embeddings("pooled", info.pooled_shape))
      else:
        out["input_ids"] = tf.cast(r["input_ids"], tf.int32)
      if "original_size" in r:
        out["original_size"] = tf.cast(r["original_size"], tf.int32)
        left = tf.where(flip, info.resize - info.resolution - offset, offset)
        out["crop_top_left"] = tf.stack([tf.constant(offset), left])
      return out

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self._local, drop_remainder=True).prefetch(2)
    return ds.as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self.position += 1
    return batch

  def get_position(self) -> int:
    return self.position

  def set_position(self, position: int) -> None:
    self.position = int(position)
    self._it = self._make(self.position)

  def validation_batch(self, n: int) -> dict[str, np.ndarray]:
    """The cache's first ``n`` crops (cycled) as the image sources give them: ``input``,
    ``edited`` float32 [n, S, S, 3] in [-1, 1], with a tokenizer ``input_ids``, and an SDXL
    cache's ``original_size`` and ``crop_top_left`` (the centre crop's)."""
    tf = import_tf()
    with tf.io.gfile.GFile(os.path.join(self._path, VALIDATION), "rb") as f:
      stored = np.load(io.BytesIO(f.read()))
      index = np.arange(n) % len(stored["instruction"])
      out = {k: stored[k][index].astype(np.float32) / 127.5 - 1.0 for k in ("input", "edited")}
      instructions = [str(t) for t in stored["instruction"][index]]
      if self.info.micro_conditioning:
        out["original_size"] = stored["original_size"][index].astype(np.int32)
        offset = centre_offset(self.info.resolution, self.info.resize)
        out["crop_top_left"] = np.full((n, 2), offset, np.int32)
    if self._tokenizer is not None:
      out["input_ids"] = np.asarray(self._tokenizer(instructions), np.int32)
    return out


def iter_records(path: str):
  """Every record of a cache in storage order, as numpy: the `MOMENTS` [2, h, w, C] float32,
  ``text`` [L, D] float32 or ``input_ids`` [L] int32, ``instruction`` (str) and ``index`` (int);
  an SDXL cache's ``pooled`` [P] float32 (embeddings), ``input_ids`` [2, L] (ids) and
  ``original_size`` [2] int32."""
  tf = import_tf()
  info = CacheInfo.read(path)
  stored = np.float32 if info.dtype == "float32" else np.float16
  for name, _ in info.shards:
    for data in tf.data.TFRecordDataset(os.path.join(path, name)).as_numpy_iterator():
      features = tf.train.Example.FromString(data).features.feature
      raw = lambda k, shape: np.frombuffer(features[k].bytes_list.value[0], stored).reshape(
          shape).astype(np.float32)
      record = {k: raw(k, (2,) + info.latent_shape) for k in MOMENTS}
      if info.text == "embeddings":
        record["text"] = raw("text", info.text_shape)
      else:
        record["input_ids"] = np.asarray(features["input_ids"].int64_list.value,
                                         np.int32).reshape(info.text_shape)
      if info.pooled_shape:
        record["pooled"] = raw("pooled", info.pooled_shape)
      if info.micro_conditioning:
        record["original_size"] = np.asarray(features["original_size"].int64_list.value,
                                             np.int32)
      record["instruction"] = features["instruction"].bytes_list.value[0].decode("utf-8")
      record["index"] = int(features["index"].int64_list.value[0])
      yield record


def latent_batch_shapes(info: CacheInfo, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The arrays of a `LatentSource` batch of ``batch`` examples (for lowering the step early)."""
  h, w, c = info.latent_shape
  moments = jax.ShapeDtypeStruct((batch, h, w, 2 * c), jnp.float32)
  text = jax.ShapeDtypeStruct((batch,) + info.text_shape,
                              jnp.float32 if info.text == "embeddings" else jnp.int32)
  if info.pooled_shape:
    text = (text, jax.ShapeDtypeStruct((batch,) + info.pooled_shape, jnp.float32))
  shapes = {"edited": moments, "input": moments, "input_ids": text}
  if info.micro_conditioning:
    pair = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
    shapes.update(original_size=pair, crop_top_left=pair)
  return shapes
