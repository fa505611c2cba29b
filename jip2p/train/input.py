"""Per-host training batches with a position that a checkpoint stores and a restart restores.

A source yields this process's rows of each global batch as numpy:
``input``, ``edited`` float32 [B_local, H, W, 3] in [-1, 1], ``input_ids`` int32 [B_local, 77]
(what ``tokenizer`` gives: [B_local, 2, 77] for SDXL's two, `tokenizer.SDXLTokenizers`).
With ``micro_conditioning`` (an SDXL run) also each example's ``original_size`` (height, width)
and ``crop_top_left`` (top, left), int32 [B_local, 2], from which the step makes its SDXL
``time_ids`` (`jip2p.train.step.micro_conditioning`): only SDXL runs carry them. The loop turns
them into one global array with `jax.make_array_from_process_local_data`.

  * ``"synthetic"`` — the first ``num_examples`` pairs of the procedural edit world. The global
    batch of step s is a pure function of (seed, s), and each process takes its contiguous rows,
    so any number of processes sees the same global batches (what the multi-host test checks).
    The world is drawn at the training size: original size (res, res), crop (0, 0).
    For a text-to-image run (`CaptionSource`): scenes and captions of the world, ``edited`` the
    scene's image and ``input_ids`` its caption (no ``input``).
  * ``"tfrecord"``  — `jip2p.data.reader` over a folder of triplet shards, split per process
    (the original sizes and crops: `reader.ReaderConfig.include_geometry`).
  * ``data.latents`` — `jip2p.data.latents.LatentSource` over a latent cache: ``input`` and
    ``edited`` are then VAE moments [B_local, h, w, 2C] and ``input_ids`` the cached text
    (embeddings [B_local, L, D] float32, or token ids), for a step built with the cache's
    stand-ins of the VAE and text encoder.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from jip2p.data import synthetic
from jip2p.tokenizer import CLIPTokenizer


class SyntheticSource:
  """Batches drawn with replacement from a fixed list of procedural examples.

  Position: the number of batches already taken.
  """

  def __init__(self, *, num_examples: int, res: int, seed: int, global_batch: int, flip: bool,
               tokenizer: CLIPTokenizer, process_index: int = 0, process_count: int = 1,
               micro_conditioning: bool = False):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                       "processes")
    self._res, self._micro = res, micro_conditioning
    examples = [synthetic.example_at(i, seed=seed, size=res) for i in range(num_examples)]
    to_float = lambda im: im.astype(np.float32) / 127.5 - 1.0
    self._input = np.stack([to_float(e.input_image) for e in examples])
    self._edited = np.stack([to_float(e.edited_image) for e in examples])
    self._ids = np.asarray(tokenizer([e.instruction for e in examples]), np.int32)
    self.instructions = [e.instruction for e in examples]
    self._seed, self._flip = seed, flip
    self._global_batch = global_batch
    local = global_batch // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, self.position])
    index = rng.integers(0, len(self._input), self._global_batch)[self._rows]
    flip = (rng.random(self._global_batch) < 0.5)[self._rows] & self._flip
    self.position += 1
    pick = lambda a: np.where(flip[:, None, None, None], a[index][:, :, ::-1], a[index])
    return {"input": pick(self._input), "edited": pick(self._edited),
            "input_ids": self._ids[index], **self._geometry(len(index))}

  def _geometry(self, n: int) -> dict[str, np.ndarray]:
    """The micro-conditioning arrays of ``n`` examples drawn whole at the training size."""
    if not self._micro:
      return {}
    return {"original_size": np.full((n, 2), self._res, np.int32),
            "crop_top_left": np.zeros((n, 2), np.int32)}

  def get_position(self) -> Any:
    return self.position

  def set_position(self, position: Any) -> None:
    self.position = int(position)

  def validation_batch(self, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` examples (cycled), unflipped: the same on every process."""
    index = np.arange(n) % len(self._input)
    return {"input": self._input[index], "edited": self._edited[index],
            "input_ids": self._ids[index], **self._geometry(n)}


class TFRecordSource:
  """`jip2p.data.reader` over this process's part of the shards; position: its `ReaderState`."""

  def __init__(self, *, path: str, res: int, resize_min: int, resize_max: int, flip: bool,
               shuffle_buffer: int, seed: int, global_batch: int, tokenizer: CLIPTokenizer,
               process_index: int = 0, process_count: int = 1, micro_conditioning: bool = False):
    from jip2p.data import reader  # TensorFlow: only processes that read shards import it.
    self._reader = reader
    self._path, self._tokenizer = path, tokenizer
    self._config = reader.ReaderConfig(
        batch_size=reader.per_host_batch_size(global_batch, process_count), resolution=res,
        min_resize=resize_min, max_resize=resize_max, flip_prob=0.5 if flip else 0.0, seed=seed,
        shuffle_buffer=shuffle_buffer, include_geometry=micro_conditioning)
    self._hosts = dict(process_index=process_index, process_count=process_count)
    damaged = damaged_shards(path)
    if damaged:  # The reader counts their lost records only when it reaches the epoch's end.
      logging.warning("data: %d damaged shard(s), records past the damage will be skipped and "
                      "counted as unreadable: %s", len(damaged), "; ".join(damaged))
    self._it = reader.make_iterator(path, self._config, tokenize=tokenizer, **self._hosts)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_position(self) -> Any:
    return self._it.state().to_dict()

  def set_position(self, position: Any) -> None:
    self._it = self._reader.make_iterator(self._path, self._config, tokenize=self._tokenizer,
                                          state=position, **self._hosts)

  def validation_batch(self, n: int) -> dict[str, np.ndarray]:
    """The first ``n`` records in storage order, resized without augmentation: the same batch on
    every process."""
    config = dataclasses.replace(self._config, batch_size=n, augment=False, shuffle=False,
                                 drop_remainder=False, num_epochs=1)
    batch = next(self._reader.make_iterator(self._path, config, tokenize=self._tokenizer,
                                            process_index=0, process_count=1))
    index = np.arange(n) % len(batch["input_ids"])
    return {k: v[index] for k, v in batch.items()}


def damaged_shards(path: str, split: str = "train") -> list[str]:
  """The shards of the jip2p dataset at ``path`` whose file is missing or not of the size its
  manifest lists, each as "file (why)": one stat per shard, so a truncated shard shows at the
  start of a run, not only when the reader reaches the cut."""
  from jip2p.data import writer
  from jip2p.data.tf_setup import import_tf
  tf = import_tf()
  if not tf.io.gfile.exists(f"{path}/{writer.MANIFEST}"):
    return []  # TFDS metadata: no sizes to compare
  out = []
  for shard in writer.read_manifest(path)["splits"].get(split, {}).get("shards", []):
    file = f"{path.rstrip('/')}/{shard['file']}"
    size = tf.io.gfile.stat(file).length if tf.io.gfile.exists(file) else None
    if size != shard["num_bytes"]:
      why = "missing" if size is None else f"{size} of {shard['num_bytes']} bytes"
      out.append(f"{file} ({why})")
  return out


class CaptionSource:
  """Text-to-image batches of the procedural world: scene ``i`` of the first ``num_examples``
  (`synthetic.drawing_at`), drawn with replacement, its caption worded afresh at every use with a
  training template. Rendering 32-px scenes costs far less than a step, so nothing is stored.

  Position: the number of batches already taken; the global batch of step s is a pure function
  of (seed, s), as for `SyntheticSource`.
  """

  def __init__(self, *, num_examples: int, res: int, seed: int, global_batch: int, flip: bool,
               tokenizer: CLIPTokenizer, process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                       "processes")
    if flip:
      raise ValueError("a caption names places ('on the left'): flipping would contradict it")
    self._num, self._res, self._seed = num_examples, res, seed
    self._tokenizer, self._global_batch = tokenizer, global_batch
    local = global_batch // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, self.position])
    index = rng.integers(0, self._num, self._global_batch)[self._rows]
    wording = rng.integers(0, 2 ** 31, self._global_batch)[self._rows]
    self.position += 1
    drawings = [synthetic.drawing_at(int(i), seed=self._seed, size=self._res) for i in index]
    wordings = synthetic.templates("caption", "train")
    captions = [synthetic.caption(d.scene, wordings[w % len(wordings)].id)
                for d, w in zip(drawings, wording)]
    images = np.stack([d.image for d in drawings]).astype(np.float32) / 127.5 - 1.0
    return {"edited": images, "input_ids": np.asarray(self._tokenizer(captions), np.int32)}

  def get_position(self) -> Any:
    return self.position

  def set_position(self, position: Any) -> None:
    self.position = int(position)


def make_source(config, *, tokenizer, process_index: int, process_count: int,
                micro_conditioning: bool = False):
  """The source ``config.data`` names, for ``config.batch_size`` global examples per step;
  ``micro_conditioning``: an SDXL run's (the examples' original sizes and crops)."""
  d = config.data
  common = dict(res=d.res, flip=d.flip, seed=config.seed, global_batch=config.batch_size,
                tokenizer=tokenizer, process_index=process_index, process_count=process_count)
  if config.task == "text_to_image":
    return CaptionSource(num_examples=d.num_examples, **common)
  common["micro_conditioning"] = micro_conditioning
  if d.source == "synthetic":
    return SyntheticSource(num_examples=d.num_examples, **common)
  if d.latents:
    from jip2p.data import latents  # TensorFlow, as for the shards.
    return latents.LatentSource(d.path, global_batch=config.batch_size, seed=config.seed,
                                flip=d.flip, shuffle_buffer=d.shuffle_buffer, tokenizer=tokenizer,
                                process_index=process_index, process_count=process_count)
  return TFRecordSource(path=d.path, resize_min=d.resize_min, resize_max=d.resize_max,
                        shuffle_buffer=d.shuffle_buffer, **common)
