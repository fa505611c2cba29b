"""The validation image grid: fixed pairs edited with the current EMA weights during training.

The edit is the Editor's own program (`jip2p.diffusion.editing.edit`): Euler ancestral on
k-diffusion's discrete grid, two-scale guidance, example j drawn from seed ``seed + j``. Grids of
successive evaluations therefore differ only by the weights, and each output is what
`jip2p.edit.Editor` gives for that pair with those weights at that seed.
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
from jip2p.tokenizer import CLIPTokenizer
from jip2p.train import sharding


def make_edit_fn(unet_def, vae_def, text_def, *, schedule: Schedule, scaling_factor: float,
                 text_scale: float, image_scale: float,
                 prediction_type: str = "epsilon") -> Callable:
  """edit(params, frozen, batch) → float32 [B, H, W, 3] in [-1, 1].

  ``frozen`` holds the "vae" and "text_encoder" states; ``batch`` holds "input" float32
  [B, H, W, 3] in [-1, 1], "input_ids" int32 [B + 1, L] (the last row is "") and "seeds" uint32
  [B].
  """

  def edit(params, frozen, batch):
    unet = nnx.merge(unet_def, params)
    vae = nnx.merge(vae_def, frozen["vae"])
    text_encoder = nnx.merge(text_def, frozen["text_encoder"])
    pixels, _ = editing.edit(unet, vae, text_encoder, batch["input"], batch["input_ids"],
                             None, batch["seeds"], schedule, text_scale, image_scale,
                             method="euler_ancestral", scaling_factor=scaling_factor,
                             prediction_type=prediction_type)
    return pixels

  return edit


class ValidationGrid:
  """Edits the same ``num_images`` validation pairs at every call and writes their image grid
  to TensorBoard and, when ``folder`` is given (process 0), as ``folder/step_<step>.png``.

  The pairs are read from ``source`` at the first call (the same on every process); example j is
  drawn from seed ``seed + j``. ``edit_fn`` is a jitted `make_edit_fn` program.
  """

  def __init__(self, edit_fn: Callable, source, *, num_images: int, seed: int,
               tokenizer: CLIPTokenizer, mesh: jax.sharding.Mesh, writer,
               folder: epath.Path | None):
    self._edit_fn, self._source, self._n, self._seed = edit_fn, source, num_images, seed
    self._null_ids = np.asarray(tokenizer([""]), np.int32)
    self._mesh, self._writer, self._folder = mesh, writer, folder

  @functools.cached_property
  def _pairs(self) -> dict[str, np.ndarray]:
    return self._source.validation_batch(self._n)

  @functools.cached_property
  def _batch(self) -> dict[str, jax.Array]:
    pairs = self._pairs
    return sharding.replicate({
        "input": pairs["input"],
        "input_ids": np.concatenate([pairs["input_ids"], self._null_ids]).astype(np.int32),
        "seeds": (self._seed + np.arange(self._n)).astype(np.uint32)}, self._mesh)

  def __call__(self, step: int, params, frozen) -> None:
    edited = self._edit_fn(params, frozen, self._batch)
    grid = grids.image_grid(zip(*map(grids.to_uint8, (
        self._pairs["input"], self._pairs["edited"], edited.addressable_data(0)))))
    self._writer.images(step, {"validation/input|target|ema_output": grid})
    if self._folder is not None:
      self._folder.mkdir(parents=True, exist_ok=True)
      with (self._folder / f"step_{step:08d}.png").open("wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
