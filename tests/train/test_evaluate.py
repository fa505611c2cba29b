"""The validation grid edits with the Editor's own program: its outputs are what `jip2p.edit.Editor`
gives for the same weights, pairs and seeds."""

from __future__ import annotations

import jax
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from jip2p import edit
from jip2p.diffusion import schedules
from jip2p.train import config as config_lib
from jip2p.train import evaluate, metrics, models, sharding

INSTRUCTIONS = ["make it blue", "add a red square", "remove the circle"]


class _Pairs:
  """A source whose validation pairs are fixed arrays."""

  def __init__(self, pixels: np.ndarray, input_ids: np.ndarray):
    self.pixels, self.input_ids = pixels, input_ids

  def validation_batch(self, n: int) -> dict[str, np.ndarray]:
    images = self.pixels[:n].astype(np.float32) / 127.5 - 1.0
    return {"input": images, "edited": -images, "input_ids": self.input_ids[:n]}


def test_validation_grid_shows_the_editors_edits(micro_folder, tmp_path):
  config = config_lib.base_config()
  config.model.init = micro_folder
  config.model.compute_dtype = "float32"
  pipeline = models.build_pipeline(config)
  editor = edit.Editor(pipeline)
  size, n, steps, text_scale, image_scale, seed = editor.size_multiple, 3, 3, 4.0, 1.5, 11
  pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  want = np.stack(editor(list(pixels), INSTRUCTIONS, steps=steps, text_guidance=text_scale,
                         image_guidance=image_scale, resolution=None, seed=seed, batch_size=n,
                         output_type="np"))

  unet_def, params = nnx.split(pipeline.unet, nnx.Param)
  vae_def, vae_state = nnx.split(pipeline.vae)
  text_def, text_state = nnx.split(pipeline.text_encoder)
  scheduler = schedules.from_scheduler_config(pipeline.scheduler_config)
  edit_fn = evaluate.make_edit_fn(
      unet_def, vae_def, text_def,
      schedule=schedules.make("discrete", steps, scheduler),
      scaling_factor=pipeline.vae.config.scaling_factor, text_scale=text_scale,
      image_scale=image_scale, prediction_type=scheduler.prediction_type)
  source = _Pairs(pixels, np.asarray(pipeline.tokenizer(INSTRUCTIONS), np.int32))
  folder = epath.Path(tmp_path) / "samples"
  grid = evaluate.ValidationGrid(
      jax.jit(edit_fn), source, num_images=n, seed=seed, tokenizer=pipeline.tokenizer,
      mesh=sharding.make_mesh(1, 1, jax.devices()[:1]),
      writer=metrics.MetricWriter(str(tmp_path / "tensorboard"), enabled=False), folder=folder)
  grid(7, params, {"vae": vae_state, "text_encoder": text_state})

  image = np.asarray(Image.open(folder / "step_00000007.png"), np.int32)
  assert image.shape == (n * size, 3 * size, 3)  # input | target | output, one row per pair
  np.testing.assert_array_equal(image[:, :size].reshape(pixels.shape), pixels)
  outputs = image[:, 2 * size:].reshape(pixels.shape)
  # The same numbers up to rounding to 8 bits (the grid rounds (x + 1)·127.5, the editor x·255).
  assert np.abs(outputs - np.round(want * 255)).max() <= 1
  assert np.abs(outputs - pixels.astype(np.int32)).mean() > 10  # edits, not the inputs copied
