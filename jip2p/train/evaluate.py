"""The validation image grid: fixed pairs edited with the current EMA weights during training.

The edit is the Editor's own program (`jip2p.diffusion.editing.edit`): Euler ancestral on
k-diffusion's discrete grid, two-scale guidance, example j drawn from seed ``seed + j``. Grids of
successive evaluations therefore differ only by the weights, and each output is what
`jip2p.edit.Editor` gives for that pair with those weights at that seed. An SDXL run's pairs are
edited with their own micro-conditioning (`step.micro_conditioning`) and the run's null text
(``zero_null_text``, the folder's, as its editor).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from jip2p import grids
from jip2p.diffusion import editing
from jip2p.diffusion.schedules import Schedule
from jip2p.models import clip_text
from jip2p.train import sharding
from jip2p.train import step as step_lib


def make_edit_fn(unet_def, vae_def, text_def, *, schedule: Schedule, scaling_factor: float,
                 text_scale: float, image_scale: float, prediction_type: str = "epsilon",
                 zero_null_text: bool = True) -> Callable:
  """edit(params, frozen, batch) → float32 [B, H, W, 3] in [-1, 1].

  ``frozen`` holds the "vae" and "text_encoder" states; ``batch`` holds "input" float32
  [B, H, W, 3] in [-1, 1], "input_ids" int32 [B + 1, L] (the last row is ""; SDXL: [B + 1, 2, L]
  and "time_ids" float32 [B, 6]) and "seeds" uint32 [B]. ``zero_null_text``: an SDXL model's
  null text (`editing.text_conditioning`).
  """

  def edit(params, frozen, batch):
    unet = nnx.merge(unet_def, params)
    vae = nnx.merge(vae_def, frozen["vae"])
    text = nnx.merge(text_def, frozen["text_encoder"])
    ids = batch["input_ids"]
    sdxl = {}
    if isinstance(text, clip_text.SDXLTextEncoders):
      sdxl = dict(text_encoder_2=text.text_encoder_2, input_ids_2=ids[:, 1],
                  time_ids=batch["time_ids"], zero_null_text=zero_null_text)
      text, ids = text.text_encoder, ids[:, 0]
    pixels, _ = editing.edit(unet, vae, text, batch["input"], ids, None, batch["seeds"],
                             schedule, text_scale, image_scale, method="euler_ancestral",
                             scaling_factor=scaling_factor, prediction_type=prediction_type,
                             **sdxl)
    return pixels

  return edit


class ValidationGrid:
  """Edits the same ``num_images`` validation pairs at every call and writes their image grid
  to TensorBoard and, when ``folder`` is given (process 0), as ``folder/step_<step>.png``.

  The pairs are read from ``source`` at the first call (the same on every process); example j is
  drawn from seed ``seed + j``. ``edit_fn`` is a jitted `make_edit_fn` program; ``tokenizer``
  the run's (`Pipeline.text_tokenizer`).
  """

  def __init__(self, edit_fn: Callable, source, *, num_images: int, seed: int,
               tokenizer, mesh: jax.sharding.Mesh, writer, folder: epath.Path | None):
    self._edit_fn, self._source, self._n, self._seed = edit_fn, source, num_images, seed
    self._null_ids = np.asarray(tokenizer([""]), np.int32)
    self._mesh, self._writer, self._folder = mesh, writer, folder

  @functools.cached_property
  def _pairs(self) -> dict[str, np.ndarray]:
    return self._source.validation_batch(self._n)

  @functools.cached_property
  def _batch(self) -> dict[str, jax.Array]:
    pairs = self._pairs
    batch = {"input": pairs["input"],
             "input_ids": np.concatenate([pairs["input_ids"], self._null_ids]).astype(np.int32),
             "seeds": (self._seed + np.arange(self._n)).astype(np.uint32)}
    time_ids = step_lib.micro_conditioning(pairs, pairs["input"].shape[1:3])
    if time_ids is not None:
      batch["time_ids"] = np.asarray(time_ids)
    return sharding.replicate(batch, self._mesh)

  def __call__(self, step: int, params, frozen) -> None:
    edited = self._edit_fn(params, frozen, self._batch)
    grid = grids.image_grid(zip(*map(grids.to_uint8, (
        self._pairs["input"], self._pairs["edited"], edited.addressable_data(0)))))
    self._writer.images(step, {"validation/input|target|ema_output": grid})
    if self._folder is not None:
      self._folder.mkdir(parents=True, exist_ok=True)
      with (self._folder / f"step_{step:08d}.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
